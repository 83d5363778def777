"""finetune's Optuna sweeper (hydra/sweeper=finetune_optuna; settings in configs/hydra/sweeper/finetune_optuna.yaml).

A Hydra Sweeper on Optuna's ask-and-tell API: each batch of n_jobs trials is asked of the study with the search space
of hydra.sweeper.params and the command line (_space.py maps Hydra's sweep syntax to Optuna distributions), launched
as Hydra jobs numbered by their Optuna trial number (trial directory = trial number), and told back: the job's
objective (COMPLETE), None (FAIL: the trial recorded why), or an optuna.TrialPruned it returns (PRUNED: the pruner
stopped it; the job reported to its trial, see finetune/sweep.py). The study lives in `storage`; launching into the
same sweep directory continues it: n_trials counts the whole study, the trials a killed launch left running are
marked failed, and the seeded sampler is reseeded (it would replay the first launch's draws). Several launches may
continue one study at once (the same sweep directory, or one storage URL): each trial records the launch that asked
it (user attribute finetune_launch), the count and the asking happen under a lock beside an sqlite file, and each
launch runs trials until the study holds n_trials, finished or running. Hydra loads plugins
from `hydra_plugins.*` only; optuna is imported when a sweep starts, not when Hydra scans its plugins.
"""

# (no `from __future__ import annotations`: Hydra's plugin scanner runs this module before it is in sys.modules, where
# dataclasses would look its string annotations up)
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Dict, Optional

from hydra.core.config_store import ConfigStore
from hydra.core.plugins import Plugins
from hydra.plugins.sweeper import Sweeper

log = logging.getLogger(__name__)


@dataclass
class TPESettings:  # optuna.samplers.TPESampler
    seed: Optional[int] = None
    n_startup_trials: int = 10  # random trials before TPE models the results
    n_ei_candidates: int = 24
    multivariate: bool = False


@dataclass
class MedianSettings:  # optuna.pruners.MedianPruner: stop a trial worse than the median of earlier ones at a step
    n_startup_trials: int = 5  # finished trials before any trial is pruned
    n_warmup_steps: int = 0  # a trial's evaluations before it can be pruned


@dataclass
class HyperbandSettings:  # optuna.pruners.HyperbandPruner; its resource is the trial's evaluations
    min_resource: int = 1
    max_resource: Any = "auto"  # evaluations of the longest trial; auto: Optuna estimates it from finished trials
    reduction_factor: int = 3


@dataclass
class FinetuneOptunaConf:
    _target_: str = "hydra_plugins.finetune_sweeper.FinetuneOptunaSweeper"
    direction: str = "maximize"
    study_name: str = "search"
    storage: Optional[str] = None  # an RDB URL (sqlite:///...); None: in memory, nothing to resume or prune
    n_trials: int = 16  # trials in the whole study, counting those of earlier launches
    n_jobs: int = 1  # trials asked per batch, launched together
    max_failure_rate: float = 1.0  # the search stops once more than this fraction of its trials failed
    sampler: TPESettings = field(default_factory=TPESettings)
    pruner: str = "none"  # none | median | hyperband
    median: MedianSettings = field(default_factory=MedianSettings)
    hyperband: HyperbandSettings = field(default_factory=HyperbandSettings)
    params: Optional[Dict[str, Any]] = None  # the search space: key -> Hydra sweep syntax (or a fixed value)


# a name of its own: hydra-optuna-sweeper, if installed too, registers hydra/sweeper=optuna
ConfigStore.instance().store(group="hydra/sweeper", name="finetune_optuna_schema", node=FinetuneOptunaConf,
                             provider="finetune")


class FinetuneOptunaSweeper(Sweeper):
    def __init__(self, **settings: Any) -> None:
        self.settings = settings
        self.launcher = None

    def setup(self, *, hydra_context, task_function, config) -> None:
        self.launcher = Plugins.instance().instantiate_launcher(hydra_context=hydra_context,
                                                                task_function=task_function, config=config)

    def sweep(self, arguments) -> None:
        from hydra_plugins.finetune_sweeper import _space as space, _study as parts

        s = SimpleNamespace(**self.settings)
        _check(s)
        params = [f"{k}={v}" for k, v in (s.params or {}).items()]
        distributions, fixed = space.search_space(params + list(arguments))
        if s.storage and s.storage.startswith("sqlite:///"):
            Path(s.storage.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        with parts.storage_errors(s.storage):
            self._search(s, distributions, fixed)

    def _search(self, s: SimpleNamespace, distributions: dict, fixed: list) -> None:
        from optuna.trial import TrialState

        from finetune.trials import this_launch
        from hydra_plugins.finetune_sweeper import _study as parts

        with parts.asking(s.storage):  # (a new sqlite file gets its tables once)
            rdb = parts.storage(s.storage)
            study, existed = parts.open_study(s, rdb, parts.sampler(s.sampler), parts.pruner(s))
            interrupted = parts.fail_interrupted(study, rdb) if existed else 0
        if existed:
            trials = study.get_trials(deepcopy=False)
            finished = sum(t.state.is_finished() and parts.counted(t) for t in trials)
            running = sum(t.state == TrialState.RUNNING for t in trials)
            log.info("continuing study '%s': %d trials finished, %d running in other launches, %d interrupted, %d to "
                     "go", s.study_name, finished, running, interrupted, max(0, s.n_trials - finished - running))
        launched, failed = 0, 0
        while True:
            with parts.asking(s.storage):  # count and ask at once: another launch may be asking too
                room = s.n_trials - sum(parts.counted(t) for t in study.get_trials(deepcopy=False))
                if room > 0 and launched and failed / launched > s.max_failure_rate:
                    log.error("stopping the search: %d of %d trials failed (hydra.sweeper.max_failure_rate=%s)",
                              failed, launched, s.max_failure_rate)
                    break
                batch = [study.ask(fixed_distributions=distributions) for _ in range(min(s.n_jobs, room))]
                for trial in batch:
                    trial.set_user_attr(parts.OWNER, this_launch())
            if not batch:
                break
            for run in _consecutive(batch):  # job number = trial number = its directory
                overrides = [tuple(f"{k}={v}" for k, v in t.params.items()) + tuple(fixed) for t in run]
                returns = self.launcher.launch(overrides, initial_job_idx=run[0].number)
                for trial, ret in zip(run, returns):
                    failed += _tell(study, trial.number, ret) == TrialState.FAIL
            launched += len(batch)
        if study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
            best = study.best_trial
            log.info("best trial %d: value %s, %s", best.number, best.value, best.params)


def _consecutive(trials: list) -> list[list]:
    """The trials in runs of consecutive numbers (another launch's asks can fall between them on a server storage)."""
    runs: list[list] = []
    for t in trials:
        if runs and t.number == runs[-1][-1].number + 1:
            runs[-1].append(t)
        else:
            runs.append([t])
    return runs


def _check(s: SimpleNamespace) -> None:
    from finetune.errors import FinetuneError
    from hydra_plugins.finetune_sweeper._study import PRUNERS

    if s.direction not in ("maximize", "minimize"):
        raise FinetuneError(f"hydra.sweeper.direction must be maximize or minimize (got '{s.direction}')")
    if s.n_trials < 0 or s.n_jobs < 1:
        raise FinetuneError(f"hydra.sweeper.n_trials must be >= 0 and n_jobs >= 1 (got {s.n_trials}, {s.n_jobs})")
    if s.pruner not in PRUNERS:
        raise FinetuneError(f"unknown hydra.sweeper.pruner '{s.pruner}': choose one of {', '.join(PRUNERS)}")
    if s.pruner != "none" and not s.storage:
        raise FinetuneError(f"hydra.sweeper.pruner={s.pruner} needs the study in a storage the trials can reach "
                            "(hydra.sweeper.storage=sqlite:///<file>), not in memory")


def _tell(study, number: int, ret) -> Any:
    """Tell the study how the job of trial `number` ended; returns the trial's state."""
    import optuna
    from hydra.core.utils import JobStatus
    from optuna.trial import TrialState

    value = None
    if ret.status == JobStatus.COMPLETED:
        value = ret.return_value
    else:
        try:
            ret.return_value  # raises the job's exception
        except Exception as e:
            log.error("trial %d failed: %s: %s", number, type(e).__name__, e)
    if isinstance(value, optuna.TrialPruned):
        study.tell(number, state=TrialState.PRUNED)  # its value: the last one it reported
        return TrialState.PRUNED
    if isinstance(value, (int, float)) and math.isfinite(value):
        study.tell(number, float(value))
        return TrialState.COMPLETE
    study.tell(number, state=TrialState.FAIL)  # the trial's own record (trial.json) says why
    return TrialState.FAIL
