"""finetune's Optuna sweeper: hydra-optuna-sweeper's, made resumable (configs/hydra/sweeper/finetune_optuna.yaml).

The plugin already re-opens a study that exists in its storage (load_if_exists), but each launch numbers its
trials from 0 again -- overwriting the trial directories of the launch before -- runs n_trials more trials, and
cannot create its sqlite file before the sweep directory exists. This subclass continues the study instead: trials
are numbered after those already there (trial directory = Optuna trial number), n_trials counts the whole study,
the trials a killed launch left running are marked failed, and the sampler is reseeded (a seeded sampler would
repeat the first launch's trials). Hydra only loads plugins from `hydra_plugins.*`.
"""

from __future__ import annotations

import logging
from pathlib import Path

from hydra_plugins.hydra_optuna_sweeper.optuna_sweeper import OptunaSweeper

log = logging.getLogger(__name__)


class ResumableOptunaSweeper(OptunaSweeper):
    def sweep(self, arguments):
        impl = self.sweeper
        if isinstance(impl.storage, str) and impl.storage:
            if impl.storage.startswith("sqlite:///"):
                Path(impl.storage.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
            self._continue_study(impl)
        return super().sweep(arguments)

    @staticmethod
    def _continue_study(impl) -> None:
        logging.getLogger("alembic").setLevel(logging.WARNING)  # its set-up lines (on import) would fill the log
        import optuna
        from optuna.trial import TrialState

        try:
            study = optuna.load_study(study_name=impl.study_name, storage=impl.storage)
        except KeyError:  # no such study yet: a new search
            return
        trials = study.get_trials(deepcopy=False)
        finished = sum(t.state.is_finished() for t in trials)
        for t in trials:
            if t.state == TrialState.RUNNING:  # its launch was killed: it will never report
                study.tell(t.number, state=TrialState.FAIL)
        # the seeded sampler would replay the first launch's draws: continue with fresh random numbers instead
        impl.sampler.reseed_rng()
        impl.job_idx = len(trials)
        impl.n_trials = max(0, impl.n_trials - finished)
        log.info("continuing study '%s': %d trials finished, %d interrupted, %d to go", impl.study_name, finished,
                 len(trials) - finished, impl.n_trials)
