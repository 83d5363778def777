"""Push a finished run to the Hugging Face Hub (hub=push, or later with `python -m finetune.push`).

One commit holds model/ at the repo root (weights, tokenizer, config, model card, shipped pipeline code,
adapter/), so `pipeline(model="<repo id>")` loads it, plus the run's metrics.json and learning_curve.png:
create_repo(exist_ok=True), create_branch when hub.revision names one, upload_folder.

The token is huggingface_hub's own (HF_TOKEN, then the `hf auth login` cache): finetune only checks that one
is there and lets huggingface_hub send it; it never reads it into a config, log, metrics file or pushed file.
After a push, the local metrics.json gains hub_repo / hub_url / hub_revision / hub_commit (the pushed copy is
the one written before the push: a file cannot name the commit that contains it).

A push that fails or is killed midway leaves the Hub repo as it was (upload_folder's commit is all or nothing) and
is retried with the same command, nothing to clean up: the hard-link folder a killed push left beside the run is
removed by the next push from this machine, and files the Hub already holds are not sent again (a push killed after
its commit, before recording it, makes no second commit: the retry records the first).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from finetune import disk, report
from finetune.errors import FinetuneError
from finetune.interrupt import pid_alive

log = logging.getLogger("finetune.hub")
logging.getLogger("httpx2").setLevel(logging.WARNING)  # huggingface_hub's HTTP client logs every request at INFO

RUN_FILES = ("metrics.json", "learning_curve.png")  # pushed beside the model's files


def files(run_dir: Path) -> list[tuple[str, Path]]:
    """(path in the repo, local file) of everything a push uploads."""
    model = run_dir / "model"
    if not (model / "config.json").is_file() or not (run_dir / "metrics.json").is_file():
        raise FinetuneError(f"{run_dir} is not a finished run (it needs model/ and metrics.json); pass the run "
                            "directory that `python -m finetune` wrote")
    out = [(p.relative_to(model).as_posix(), p) for p in sorted(model.rglob("*")) if p.is_file()]
    return out + [(name, run_dir / name) for name in RUN_FILES if (run_dir / name).is_file()]


def push(run_dir: Path, hub_cfg) -> dict[str, str]:
    """Push the run (or with hub.dry_run list what would be pushed; validate.hub checked hub_cfg); returns what it
    recorded in metrics.json."""
    run_dir = Path(run_dir)
    listing = files(run_dir)
    repo, revision = hub_cfg.repo_id, hub_cfg.revision
    target = f"{repo}" + (f" (branch {revision})" if revision else "")
    sizes = [(name, path.stat().st_size) for name, path in listing]
    total = disk.size(sum(s for _, s in sizes))
    if hub_cfg.dry_run:
        log.info("dry run: would push %d files (%s) to %s, %s:", len(sizes), total, target,
                 "private" if hub_cfg.private else "public")
        for name, size in sizes:
            log.info("  %10s  %s", disk.size(size), name)
        return {}
    message = hub_cfg.commit_message or default_message(run_dir)
    from huggingface_hub import HfApi, constants

    api = HfApi()
    _remove_stale_staging(run_dir)
    log.info("pushing %d files (%s) to %s", len(sizes), total, target)
    try:
        url = api.create_repo(repo, private=hub_cfg.private, exist_ok=True)
        if revision:
            api.create_branch(repo, branch=revision, exist_ok=True)
        with _staged(listing, run_dir) as folder:
            commit = api.upload_folder(repo_id=repo, folder_path=folder, revision=revision, commit_message=message)
    except Exception as e:  # noqa: BLE001 - every failure becomes one line naming the fix; the run stays intact
        raise FinetuneError(_explain(e, repo, run_dir, hub_cfg, constants.ENDPOINT)) from e
    result = {"hub_repo": repo, "hub_url": str(url) + (f"/tree/{revision}" if revision else ""),
              "hub_revision": revision or "main", "hub_commit": commit.oid, "hub_commit_url": commit.commit_url}
    metrics = json.loads((run_dir / "metrics.json").read_text())
    report.write_json(run_dir / "metrics.json", {**metrics, **result})
    log.info("pushed to %s (commit %s)", result["hub_url"], commit.oid)
    return result


def default_message(run_dir: Path) -> str:
    """'finetune run <task>/<run>: test_<main metric>=<value>' from the run's exported model and metrics."""
    from finetune.export import read_record

    key = f"test_{read_record(run_dir / 'model')['main_metric']}"
    value = json.loads((run_dir / "metrics.json").read_text()).get(key)
    score = f": {key}={value:.4f}" if isinstance(value, (int, float)) else ""
    return f"finetune run {run_dir.parent.name}/{run_dir.name}{score}"


@contextmanager
def _staged(listing: list[tuple[str, Path]], run_dir: Path) -> Iterator[Path]:
    """The files laid out as the repo will hold them (hard links, beside the run): upload_folder takes one folder."""
    folder = Path(tempfile.mkdtemp(prefix=f"{_staging_prefix(run_dir)}{os.getpid()}@{socket.gethostname()}-",
                                   dir=run_dir.parent))
    try:
        for name, path in listing:
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(path, folder / name)
            except OSError:  # a filesystem without hard links
                shutil.copy2(path, folder / name)
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _staging_prefix(run_dir: Path) -> str:
    return f".{run_dir.name}-push-"


def _remove_stale_staging(run_dir: Path) -> None:
    """Remove the staging folders of pushes of this run that were killed on this machine (their process is gone)."""
    host = socket.gethostname()
    for folder in run_dir.parent.glob(f"{_staging_prefix(run_dir)}*@*"):
        owner = folder.name.removeprefix(_staging_prefix(run_dir)).rsplit("-", 1)[0]
        pid, _, owner_host = owner.partition("@")
        if owner_host == host and pid.isdigit() and not pid_alive(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)



def _explain(e: Exception, repo: str, run_dir: Path, hub_cfg, endpoint: str) -> str:
    retry = f"python -m finetune.push {run_dir} --repo-id {repo}" + (
        f" --revision {hub_cfg.revision}" if hub_cfg.revision else "")
    response = getattr(e, "response", None)
    status = getattr(response, "status_code", None)
    if status == 401:
        why = "the Hub rejected the token (401 Unauthorized): set HF_TOKEN to a valid token or run `hf auth login`"
    elif status == 403:
        why = (f"the token may not write to {repo} (403 Forbidden): use a token with write access to "
               f"'{repo.split('/')[0]}'")
    elif status is not None:
        reason = str(e).strip().splitlines()[0][:200]
        why = f"the Hub answered {status} ({reason}): check the repository and try again later"
    elif isinstance(e, ValueError):  # huggingface_hub's own checks, e.g. of the model card's metadata
        why = f"the Hub refused the upload ({str(e).strip().splitlines()[0][:200]})"
    else:
        reason = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        why = f"could not reach the Hub at {endpoint} ({reason}): check the network (and HF_ENDPOINT, proxies)"
    return f"push to {repo} failed: {why}; the run in {run_dir} is intact, retry with {retry}"
