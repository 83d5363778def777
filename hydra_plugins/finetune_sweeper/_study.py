"""The study's storage, sampler and pruner, built alike by the sweeper and by each trial's job (which attaches to its
trial to report the validation metric to the pruner), from the settings of hydra.sweeper."""

from __future__ import annotations

import logging

import optuna

from finetune.errors import FinetuneError

PRUNERS = ("none", "median", "hyperband")
_SQLITE_TIMEOUT_S = 120  # trials in other processes (joblib) write to one sqlite file: wait for its lock, don't fail


def storage(url: str | None):
    """The RDB storage at url (None: in memory). sqlite gets a long lock timeout for trials writing side by side."""
    if not url:
        return None
    logging.getLogger("alembic").setLevel(logging.WARNING)  # its set-up lines would fill the log
    kwargs = {"connect_args": {"timeout": _SQLITE_TIMEOUT_S}} if url.startswith("sqlite") else {}
    return optuna.storages.RDBStorage(url, engine_kwargs=kwargs)


def sampler(settings) -> optuna.samplers.TPESampler:
    return optuna.samplers.TPESampler(seed=settings.seed, n_startup_trials=settings.n_startup_trials,
                                      n_ei_candidates=settings.n_ei_candidates, multivariate=settings.multivariate)


def pruner(sweeper) -> optuna.pruners.BasePruner:
    """hydra.sweeper.pruner (none | median | hyperband) with its settings hydra.sweeper.<median|hyperband>.*"""
    name = sweeper.pruner
    if name == "median":
        m = sweeper.median
        return optuna.pruners.MedianPruner(n_startup_trials=m.n_startup_trials, n_warmup_steps=m.n_warmup_steps)
    if name == "hyperband":
        h = sweeper.hyperband
        return optuna.pruners.HyperbandPruner(min_resource=h.min_resource, max_resource=h.max_resource,
                                              reduction_factor=h.reduction_factor)
    if name == "none":
        return optuna.pruners.NopPruner()
    raise FinetuneError(f"unknown hydra.sweeper.pruner '{name}': choose one of {', '.join(PRUNERS)}")


def attach(sweeper, number: int) -> optuna.trial.Trial:
    """Trial `number` of the sweep's study, for the job that runs it (in this process or another)."""
    rdb = storage(sweeper.storage)
    study = optuna.load_study(study_name=sweeper.study_name, storage=rdb, pruner=pruner(sweeper),
                              sampler=optuna.samplers.RandomSampler())  # the job asks nothing: no TPE set-up
    trial_id = rdb.get_trial_id_from_study_id_trial_number(rdb.get_study_id_from_name(sweeper.study_name), number)
    return optuna.trial.Trial(study, trial_id)
