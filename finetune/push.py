"""`python -m finetune.push <run dir> --repo-id <namespace>/<name> [--private|--public] [--revision BRANCH]
[--commit-message TEXT] [--dry-run]`: push a finished run to the Hub, as hub=push does at the end of a run.

The token comes from HF_TOKEN or `hf auth login` (never from the command line). Errors print one line and
exit with code 2; the run directory is left as it was, so the same command can be retried.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from finetune.config import HubConfig
from finetune.errors import FinetuneError


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m finetune.push", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path, help="a finished run directory (with model/ and metrics.json)")
    parser.add_argument("--repo-id", required=True, help="<namespace>/<name> of the model repository")
    visibility = parser.add_mutually_exclusive_group()
    visibility.add_argument("--private", dest="private", action="store_true", default=True,
                            help="a repository this push creates is private (the default)")
    visibility.add_argument("--public", dest="private", action="store_false", help="... or public")
    parser.add_argument("--revision", help="a branch to push to (created from main when missing)")
    parser.add_argument("--commit-message", help="default: names the run and its test metric")
    parser.add_argument("--dry-run", action="store_true", help="list what would be pushed, without network calls")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    cfg = HubConfig(push=True, repo_id=args.repo_id, private=args.private, revision=args.revision,
                    commit_message=args.commit_message, dry_run=args.dry_run)
    from finetune import validate
    from finetune.hub import push

    try:
        validate.hub(cfg)
        push(args.run_dir, cfg)
    except FinetuneError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
