"""Sweeps (`python -m finetune -m ...`): one trial per run directory under one sweep directory.

Each trial runs the normal walk (finetune.run) and hands the sweeper its objective: the task's main metric on
the validation split. It writes `trial.json` into its run directory when it starts ("running") and when it ends
("ok" with the objective, "pruned" with the evaluation and value it stopped at, or "failed" with a one-line error),
so the leaderboard, which can only read what the trials wrote, tells finished, pruned, failed and killed trials
apart. A failed trial -- bad input, an exception such as running out of memory, a non-finite loss or objective --
does not stop the sweep: the task function returns None, which Hydra's grid sweeper ignores and the Optuna sweeper
records as a failed trial. Under the Optuna sweeper with a storage, the trial attaches to its Optuna trial and
reports the validation main metric of every evaluation (step = the evaluation's number: 1, 2, ...); when the pruner
says stop, training ends there, the trial keeps no checkpoints and no export, and the task function returns the
optuna.TrialPruned, which the sweeper records as PRUNED. At the end, the leaderboard callback (finetune/leaderboard.py)
ranks the trials and the CLI exits 1 when any trial of this launch failed (pruned trials are not failures).
"""

from __future__ import annotations

import gc
import logging
import math
import shutil
import time
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from finetune import trials, validate
from finetune.engines import CHECKPOINTS
from finetune.errors import FinetuneError
from finetune.tasks import task_class

log = logging.getLogger("finetune")


def direction(task_name: str) -> str:
    """Whether a sweeper maximizes or minimizes the task's main metric (accuracy: maximize, perplexity: minimize)."""
    return "maximize" if task_class(task_name).greater_is_better else "minimize"


# configs/hydra/sweeper/finetune_optuna.yaml: `direction: ${task_direction:${task.name}}`. Registered on import:
# the launching process and every worker process (joblib, submitit) import this module before resolving it.
OmegaConf.register_new_resolver("task_direction", direction, replace=True)


def run_trial(cfg: DictConfig, run_dir: Path):
    """Run one trial and return its objective, None when it failed, or the optuna.TrialPruned that stopped it
    (recorded in <run_dir>/trial.json)."""
    from finetune.run import run  # (the training libraries: imported when a trial runs, not to resolve a config)

    hydra = HydraConfig.get()
    record: dict = {"trial": hydra.job.num, "status": "running", "overrides": list(hydra.overrides.task),
                    "launch": trials.this_launch()}
    run_dir.mkdir(parents=True, exist_ok=True)
    trials.write(run_dir, record)
    start = time.perf_counter()
    reporter = None
    try:
        task = task_class(cfg.task.name)
        record.update(objective=f"validation_{task.main_metric_of(cfg.task)}", direction=direction(cfg.task.name))
        _check_sweeper_direction(hydra.sweeper, record["direction"], record["objective"])
        validate.config(cfg)
        reporter = Reporter.for_job(hydra)
        metrics = run(cfg, run_dir, on_evaluate=reporter)
        value = metrics.get(record["objective"])
        if not isinstance(value, (int, float)) or not math.isfinite(value):
            raise FinetuneError(f"the objective {record['objective']} is {value}: the trial diverged or scored "
                                "nothing; lower trainer.learning_rate or check the data")
        import torch

        record.update(status="ok", value=float(value), torch_threads=torch.get_num_threads())
        return float(value)
    except Exception as e:  # recorded, and the sweep goes on; Ctrl-C (KeyboardInterrupt) still stops it
        if reporter is not None and reporter.pruned(e):
            record.update(status="pruned", step=reporter.step, value=reporter.value)
            log.info("trial %s pruned at evaluation %d: %s=%.4f", record["trial"], reporter.step,
                     record["objective"], reporter.value)
            shutil.rmtree(run_dir / CHECKPOINTS, ignore_errors=True)  # it will not be resumed
            return e
        record.update(status="failed", error=one_line(e))
        # the traceback of an unexpected error goes to the trial's finetune.log, not only its one line
        log.error("trial %s failed: %s", record["trial"], record["error"],
                  exc_info=cfg.get("debug", False) or not isinstance(e, FinetuneError))
        return None
    finally:
        record["runtime_s"] = round(time.perf_counter() - start, 1)
        trials.write(run_dir, record)
        _free_memory()


class Reporter:
    """engine on_evaluate for a trial of the Optuna sweeper: reports each validation main metric to the trial (step =
    the evaluation's number) and raises optuna.TrialPruned when the study's pruner says so."""

    def __init__(self, trial, storage: str):
        self.trial, self.storage, self.step, self.value = trial, storage, 0, None

    @classmethod
    def for_job(cls, hydra) -> Reporter | None:
        """The reporter of this job's Optuna trial; None outside the Optuna sweeper or without its storage."""
        sweeper = hydra.sweeper
        if not str(sweeper.get("_target_", "")).startswith("hydra_plugins.finetune_sweeper.") or not sweeper.storage:
            return None
        from hydra_plugins.finetune_sweeper._study import attach

        return cls(attach(sweeper, hydra.job.num), sweeper.storage)  # job number = trial number (as launched)

    def __call__(self, value: float) -> None:
        import optuna

        from hydra_plugins.finetune_sweeper._study import storage_errors

        self.step, self.value = self.step + 1, float(value)
        with storage_errors(self.storage):
            self.trial.report(self.value, self.step)
            stop = self.trial.should_prune()
        if stop:
            raise optuna.TrialPruned(f"pruned at evaluation {self.step} ({self.value:.4g})")

    @staticmethod
    def pruned(error: Exception) -> bool:
        import optuna

        return isinstance(error, optuna.TrialPruned)


def one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    if isinstance(error, FinetuneError):
        return text
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def _check_sweeper_direction(sweeper: DictConfig, expected: str, objective: str) -> None:
    configured = sweeper.get("direction") if "direction" in sweeper else None
    if configured is None:  # the grid sweeper does not optimize
        return
    got = str(configured).rsplit(".", 1)[-1]  # "maximize" or Direction.maximize
    if got != expected:
        raise FinetuneError(f"hydra.sweeper.direction={got}, but this task's objective {objective} must be "
                            f"{expected}d; drop the override (finetune_optuna takes the direction from the task)")


def _free_memory() -> None:
    """Trials of the basic launcher share one process: let the next one start without the last one's tensors."""
    gc.collect()
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()
