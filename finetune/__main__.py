"""`python -m finetune task=sentiment model=... data=... trainer.learning_rate=...` (Hydra CLI).

Input errors print one line and exit with code 2 (debug=true shows the traceback); a run that
fails on bad input leaves nothing behind in runs/.

One launch writes one run directory, runs/<task>/<time> (<time>_2, ... when another launch took it in the
same second). `resume=true|<run dir>` continues an unfinished run in its own directory; under
`accelerate launch` / `torchrun` rank 0 picks the directory and the other processes follow it (they log
warnings only, to the console, and write no files of their own).
"""

from __future__ import annotations

import itertools
import logging
import os
import re
import shlex
import shutil
import string
import sys
import textwrap
import time
import traceback
from pathlib import Path
from typing import NoReturn

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import HydraException
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from finetune import compose, disk, leaderboard, resume, sources, sweep, validate
from finetune.engines import last_checkpoint
from finetune.config import CONFIG_DIR, config_options, did_you_mean
from finetune.errors import FinetuneError
from finetune.interrupt import Interrupted
from finetune.tasks import registry

# `model=<Hub id or dir>` / `data=<file, dir or Hub id>` select the generic config and set its source
_FREE_GROUPS = {"model": "name_or_path", "data": "source"}
_FREE_HELP = {"model": "<a Hub id or a checkpoint directory>", "data": "<a file, a directory or a Hub dataset id>"}
_CHECKED_GROUPS = ("task", "trainer", "peft", "hub", "hparams_search")
_SWEEP = re.compile(r"^(choice|range|interval|tag|glob)\(|,")
_job_started = False
_resumed_dir: Path | None = None  # the existing run directory this launch continues
_new_dir: tuple[Path, Path] | None = None  # the run directory this launch created, and runs_dir
_user_args: list[str] = []  # the command line as given (for the command that resumes an interrupted run)
_GRACE_S = 30.0  # long enough for a loaded machine: rank 0 reports first, and its exit ends the launch


def _quote(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def rewrite_overrides(argv: list[str]) -> list[str]:
    out = []
    for arg in argv:
        key, sep, value = arg.partition("=")
        if not sep or not value or _SWEEP.search(value) or key not in (*_FREE_GROUPS, *_CHECKED_GROUPS):
            out.append(arg)
        elif value in config_options(key) or (key == "task" and value in registry()):
            out.append(arg)  # (a task registered from elsewhere brings its yaml on hydra.searchpath)
        elif key in _FREE_GROUPS:
            out += [f"{key}=custom", f"{key}.{_FREE_GROUPS[key]}={_quote(value)}"]
        else:
            choices = ", ".join(config_options(key))
            raise FinetuneError(f"unknown {key} '{value}': {did_you_mean(key, value)}choose one of {choices}")
    return out


def _is_main_process() -> bool:
    return os.environ.get("RANK", "0") == "0"


def pin_run_dir(argv: list[str], cfg: DictConfig) -> list[str]:
    """Overrides that make every process of this launch write into one run directory: the resumed one, or a
    fresh one that rank 0 creates here (so two launches in the same second get two)."""
    global _resumed_dir, _new_dir
    wanted = resume.target(cfg.resume)
    decision: dict = {}
    if _is_main_process():
        try:
            if wanted:
                decision = {"dir": str(resume.find_run_dir(cfg, wanted)), "resumed": True}
            elif not any(a.startswith("hydra.run.dir=") for a in argv):
                decision = {"dir": str(_create_run_dir(cfg))}
        except FinetuneError as e:
            decision = {"error": str(e)}
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        decision = _broadcast(decision)
    if "error" in decision:
        raise FinetuneError(decision["error"])
    extra = []
    if "dir" in decision:
        if decision.get("resumed"):
            _resumed_dir = Path(decision["dir"]).resolve()
        elif _is_main_process():
            _new_dir = (Path(decision["dir"]).resolve(), Path(cfg.runs_dir).expanduser().resolve())
        extra.append(f"hydra.run.dir={_quote(decision['dir'])}")
    if not _is_main_process():  # no .hydra/ or log file of its own; warnings still reach the console
        extra += ["hydra.output_subdir=null", "hydra/job_logging=none", "hydra/hydra_logging=none"]
    return extra


def _create_run_dir(cfg: DictConfig) -> Path:
    """hydra.run.dir (runs_dir/<task>/<time>), made atomically: a launch that finds it taken takes <time>_2, ..."""
    runs = Path(cfg.runs_dir).expanduser()
    if runs.exists() and not runs.is_dir():
        raise FinetuneError(f"runs_dir={cfg.runs_dir} is a file, not a directory; pass runs_dir=<directory for the runs>")
    base = Path(cfg.hydra.run.dir).expanduser()
    for n in itertools.count(1):
        path = base if n == 1 else base.with_name(f"{base.name}_{n}")
        try:
            path.mkdir(parents=True)
            return path
        except FileExistsError:
            continue
        except OSError as e:
            raise FinetuneError(f"cannot create the run directory {path} ({e.strerror}); "
                                "pass runs_dir=<a writable directory>") from e
    raise AssertionError("unreachable")


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


def usage() -> str:
    """--help: configs/config.yaml's hydra.help template, its groups those of the config's defaults list with their
    options in configs/ (Hydra's own listing adds the schemas and the accelerate launch configs in configs/)."""
    config = OmegaConf.load(CONFIG_DIR / "config.yaml")
    lines = []
    for entry in config.defaults:
        if not isinstance(entry, DictConfig):  # base_config, _self_
            continue
        ((group, default),) = entry.items_ex(resolve=False)
        per_task = "${task}" in str(default)  # data: each task's default data is configs/data/<task>.yaml
        options = [o for o in config_options(group) if o != "custom" and not (per_task and o in config_options("task"))]
        options += [_FREE_HELP[group]] if group in _FREE_HELP else []
        chosen = "none" if default is None else "the task's own" if per_task else default
        # a long list of options wraps, so the help stays one screen wide
        lines.append(textwrap.fill(f"  {group}: {', '.join(options)} (default: {chosen})", 120,
                                   subsequent_indent="    ", break_on_hyphens=False))
    help_cfg = OmegaConf.to_container(config.hydra.help, resolve=True)
    return string.Template(help_cfg["template"]).substitute(APP_CONFIG_GROUPS="\n".join(lines)).rstrip()


@hydra.main(version_base=None, config_path=str(CONFIG_DIR), config_name="config")
def _hydra_main(cfg: DictConfig) -> float | None:
    global _job_started
    _job_started = True
    sys.stderr = sys.__stderr__
    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    if hydra_cfg.mode == RunMode.MULTIRUN:  # a sweep's trial: a failure is recorded and the sweep goes on
        return sweep.run_trial(cfg, run_dir)
    try:
        from finetune.run import run

        run(cfg, run_dir)
    except (FinetuneError, OSError) as e:
        if isinstance(e, OSError) and not (e := disk.fault(e)):
            raise
        message = str(e)
        if _is_main_process():
            # never delete a run being resumed, a finished one (a failed push is retried with finetune.push), nor
            # one with checkpoints (the work to resume, when a disk filled up midway or the export found no room)
            if last_checkpoint(run_dir) is not None:
                message += f"; resume with resume={run_dir} once it is fixed"
            elif run_dir.resolve() != _resumed_dir and not (run_dir / "model").is_dir():
                _remove_run_dir(run_dir, Path(cfg.runs_dir).resolve())
            if cfg.debug:
                traceback.print_exc()
        _fail(message)
    except Interrupted as e:
        _stopped(e, run_dir)
    except KeyboardInterrupt:  # a second signal: stopped at once
        print("error: stopped at once; outputs are written whole or not at all, checkpoints stay as they were",
              file=sys.stderr)
        sys.exit(130)
    except Exception:
        traceback.print_exc()
        sys.exit(1)
    return None


def _stopped(e: Interrupted, run_dir: Path) -> NoReturn:
    """A signal stopped the run: one line saying where, and the command that resumes it (rank 0); exit 128 + signal."""
    if _is_main_process():
        if (run_dir / "model").is_dir() and not (run_dir / "metrics.json").is_file():
            shutil.rmtree(run_dir / "model")  # exported but not verified: the resumed run exports again
        checkpoint = last_checkpoint(run_dir)
        if checkpoint is None:
            print(f"error: {e}, with no checkpoint to resume from (trainer.eval_strategy=no saves none before the "
                  "end of training); run it again", file=sys.stderr)
        else:
            args = [a for a in _user_args if not a.startswith("resume=")] + [f"resume={run_dir}"]
            launcher = " (under the same launcher)" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""
            print(f"error: {e}; {checkpoint.name} is in {run_dir}; resume with{launcher}: python -m finetune "
                  f"{shlex.join(args)}", file=sys.stderr)
    sys.exit(e.exit_code)


def main() -> None:
    global _job_started, _resumed_dir, _new_dir, _user_args
    _job_started, _resumed_dir, _new_dir = False, None, None
    _user_args = sys.argv[1:]
    logging.raiseExceptions = False  # a log file on a full disk: its lines are lost, not a traceback printed for each
    leaderboard.failed_trials.clear()
    compose.register_configs()
    debug, argv = False, sys.argv[1:]
    if "--help" in argv or "-h" in argv:
        print(usage())
        return
    try:
        argv = rewrite_overrides(argv)
        if any(a.startswith("-") for a in argv):  # --cfg/--help/--multirun (sweep syntax): Hydra composes
            os.environ.setdefault("HYDRA_FULL_ERROR", "1")  # it raises its errors instead of printing them: one line
        else:
            cfg = compose.compose(argv)  # a bad key or value fails here, before anything is written
            debug = cfg.debug
            validate.config(cfg)
            sources.check(cfg)  # a missing path or an unreachable model fails in a second, not after the imports
            argv += pin_run_dir(argv, cfg)
        sys.argv[1:] = argv
        if not _is_main_process():
            sys.stderr = open(os.devnull, "w")  # Hydra's own report of a bad config comes from rank 0 only
        _hydra_main()
    except (FinetuneError, HydraException, OmegaConfBaseException) as e:
        if debug:
            traceback.print_exc()
        _fail(str(e) if isinstance(e, FinetuneError) else compose.config_error(e, argv))
    except SystemExit as e:
        if e.code == 1 and not _job_started:  # Hydra rejected the command line or the config
            _fail(None)
        raise
    finally:
        if _new_dir is not None and not _job_started:  # (once the job runs, it removes its directory on failure)
            _remove_run_dir(*_new_dir)
    if leaderboard.failed_trials:  # this launch's sweep had failed trials: their trial.json and the leaderboard say why
        failed = leaderboard.failed_trials
        print(f"error: {len(failed)} trial(s) failed (see their trial.json): {', '.join(failed)}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
