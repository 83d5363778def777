"""`python -m finetune task=sentiment model=... data=... trainer.learning_rate=...` (Hydra CLI).

Input errors print one line and exit with code 2 (debug=true shows the traceback); a run that
fails on bad input leaves nothing behind in runs/.
"""

from __future__ import annotations

import re
import shutil
import sys
import traceback
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from finetune.config import CONFIG_DIR, config_options, did_you_mean, register_configs
from finetune.errors import FinetuneError

# `model=<Hub id or dir>` / `data=<file, dir or Hub id>` select the generic config and set its source
_FREE_GROUPS = {"model": "name_or_path", "data": "source"}
_CHECKED_GROUPS = ("task", "trainer", "peft", "hub")
_SWEEP = re.compile(r"^(choice|range|interval|tag|glob)\(|,")
_job_started = False


def rewrite_overrides(argv: list[str]) -> list[str]:
    out = []
    for arg in argv:
        key, sep, value = arg.partition("=")
        if not sep or not value or _SWEEP.search(value) or key not in (*_FREE_GROUPS, *_CHECKED_GROUPS):
            out.append(arg)
        elif value in config_options(key):
            out.append(arg)
        elif key in _FREE_GROUPS:
            quoted = "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
            out += [f"{key}=custom", f"{key}.{_FREE_GROUPS[key]}={quoted}"]
        else:
            choices = ", ".join(config_options(key))
            raise FinetuneError(f"unknown {key} '{value}': {did_you_mean(key, value)}choose one of {choices}")
    return out


def _remove_run_dir(run_dir: Path, runs_root: Path) -> None:
    shutil.rmtree(run_dir, ignore_errors=True)
    parent = run_dir.parent
    while parent != runs_root and parent.is_dir() and not any(parent.iterdir()):
        parent.rmdir()
        parent = parent.parent


@hydra.main(version_base=None, config_path=str(CONFIG_DIR), config_name="config")
def _hydra_main(cfg: DictConfig) -> float | None:
    global _job_started
    _job_started = True
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        from finetune.run import run

        run(cfg, run_dir)
    except FinetuneError as e:
        _remove_run_dir(run_dir, Path(cfg.runs_dir).resolve())
        if cfg.debug:
            traceback.print_exc()
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except Exception:
        traceback.print_exc()
        sys.exit(1)
    return None


def main() -> None:
    register_configs()
    try:
        sys.argv[1:] = rewrite_overrides(sys.argv[1:])
        _hydra_main()
    except FinetuneError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except SystemExit as e:
        if e.code == 1 and not _job_started:  # Hydra rejected the command line or the config
            sys.exit(2)
        raise


if __name__ == "__main__":
    main()
