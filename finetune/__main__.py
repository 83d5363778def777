"""`python -m finetune task=sentiment model=... data=... trainer.learning_rate=...` (Hydra CLI).

Input errors print one line and exit with code 2 (debug=true shows the traceback); a run that
fails on bad input leaves nothing behind in runs/.

One launch writes one run directory. `resume=true|<run dir>` continues an unfinished run in its own
directory; under `accelerate launch` / `torchrun` rank 0 picks the directory and the other processes
follow it (they log warnings only, to the console, and write no files of their own).
"""

from __future__ import annotations

import os
import re
import shutil
import sys
import time
import traceback
from pathlib import Path
from typing import NoReturn

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from finetune import resume
from finetune.config import CONFIG_DIR, config_options, did_you_mean, register_configs
from finetune.errors import FinetuneError

# `model=<Hub id or dir>` / `data=<file, dir or Hub id>` select the generic config and set its source
_FREE_GROUPS = {"model": "name_or_path", "data": "source"}
_CHECKED_GROUPS = ("task", "trainer", "peft", "hub")
_SWEEP = re.compile(r"^(choice|range|interval|tag|glob)\(|,")
_job_started = False
_resumed_dir: Path | None = None  # the existing run directory this launch continues
_GRACE_S = 5.0


def _quote(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def rewrite_overrides(argv: list[str]) -> list[str]:
    out = []
    for arg in argv:
        key, sep, value = arg.partition("=")
        if not sep or not value or _SWEEP.search(value) or key not in (*_FREE_GROUPS, *_CHECKED_GROUPS):
            out.append(arg)
        elif value in config_options(key):
            out.append(arg)
        elif key in _FREE_GROUPS:
            out += [f"{key}=custom", f"{key}.{_FREE_GROUPS[key]}={_quote(value)}"]
        else:
            choices = ", ".join(config_options(key))
            raise FinetuneError(f"unknown {key} '{value}': {did_you_mean(key, value)}choose one of {choices}")
    return out


def _is_main_process() -> bool:
    return os.environ.get("RANK", "0") == "0"


def pin_run_dir(argv: list[str]) -> list[str]:
    """Overrides that make every process of this launch write into one run directory, the resumed one if any."""
    global _resumed_dir
    wanted = resume.target(next((a.partition("=")[2] for a in argv if a.startswith("resume=")), None))
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if any(a.startswith("-") for a in argv) or not (wanted or distributed):
        return []  # --cfg/--help/--multirun, or a plain single-process run: Hydra's timestamped dir
    decision: dict = {}
    if _is_main_process():
        try:
            decision = {"run_id": time.strftime("%Y-%m-%d_%H-%M-%S")}
            if wanted:
                decision["dir"] = str(resume.find_run_dir(_compose(argv), wanted))
        except FinetuneError as e:
            decision = {"error": str(e)}
        except Exception:  # the overrides do not compose: let Hydra report that as it always does
            decision = {}
    if distributed:
        decision = _broadcast(decision)
    if "error" in decision:
        raise FinetuneError(decision["error"])
    if "run_id" in decision:
        os.environ["FINETUNE_RUN_ID"] = decision["run_id"]  # configs/config.yaml names the run dir with it
    extra = []
    if "dir" in decision:
        _resumed_dir = Path(decision["dir"]).resolve()
        extra.append(f"hydra.run.dir={_quote(decision['dir'])}")
    if not _is_main_process():  # no .hydra/ or log file of its own; warnings still reach the console
        extra += ["hydra.output_subdir=null", "hydra/job_logging=none", "hydra/hydra_logging=none"]
    return extra


def _compose(argv: list[str]):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(version_base=None, config_dir=str(CONFIG_DIR)):
        return compose("config", overrides=[a for a in argv if not a.startswith("hydra")], return_hydra_config=True)


def _broadcast(decision: dict) -> dict:
    """Rank 0's decision, for every process of the launch (starts the process group accelerate will use)."""
    import torch
    from accelerate import PartialState
    from accelerate.utils import broadcast_object_list

    has_device = torch.accelerator.is_available() if hasattr(torch, "accelerator") else torch.cuda.is_available()
    if not has_device:  # tell accelerate (and the Trainer) the processes of this launch talk over gloo on CPUs
        os.environ["ACCELERATE_USE_CPU"] = "true"
    PartialState(cpu=not has_device)
    box = [decision]
    broadcast_object_list(box)
    return box[0]


def _remove_run_dir(run_dir: Path, runs_root: Path) -> None:
    shutil.rmtree(run_dir, ignore_errors=True)
    parent = run_dir.parent
    while parent != runs_root and parent.is_dir() and not any(parent.iterdir()):
        parent.rmdir()
        parent = parent.parent


def _fail(message: str | None) -> NoReturn:
    """Exit 2 with one line. All processes of a launch hit the same input error: rank 0 reports it and the
    launcher ends the others when it exits; a process still alive after a grace period reports its own."""
    if not _is_main_process():
        time.sleep(_GRACE_S)
        sys.stderr = sys.__stderr__
        message = message and f"{message} (rank {os.environ.get('RANK')})"
    if message:
        print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


@hydra.main(version_base=None, config_path=str(CONFIG_DIR), config_name="config")
def _hydra_main(cfg: DictConfig) -> float | None:
    global _job_started
    _job_started = True
    sys.stderr = sys.__stderr__
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        from finetune.run import run

        run(cfg, run_dir)
    except FinetuneError as e:
        if _is_main_process():
            # never delete a run being resumed, nor a finished one (a failed push is retried with finetune.push)
            if run_dir.resolve() != _resumed_dir and not (run_dir / "model").is_dir():
                _remove_run_dir(run_dir, Path(cfg.runs_dir).resolve())
            if cfg.debug:
                traceback.print_exc()
        _fail(str(e))
    except Exception:
        traceback.print_exc()
        sys.exit(1)
    return None


def main() -> None:
    register_configs()
    try:
        argv = rewrite_overrides(sys.argv[1:])
        sys.argv[1:] = argv + pin_run_dir(argv)
        if not _is_main_process():
            sys.stderr = open(os.devnull, "w")  # Hydra's own report of a bad config comes from rank 0 only
        _hydra_main()
    except FinetuneError as e:
        _fail(str(e))
    except SystemExit as e:
        if e.code == 1 and not _job_started:  # Hydra rejected the command line or the config
            _fail(None)
        raise


if __name__ == "__main__":
    main()
