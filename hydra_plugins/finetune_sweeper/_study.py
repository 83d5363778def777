"""The study's storage, sampler and pruner, built alike by the sweeper and by each trial's job (which attaches to its
trial to report the validation metric to the pruner), from the settings of hydra.sweeper; and what lets several
launches continue one study at once: who asked each trial, a lock around asking, one line when sqlite stays locked."""

from __future__ import annotations

import contextlib
import fcntl
import logging
import socket
from pathlib import Path
from typing import Iterator

import optuna

from finetune.errors import FinetuneError
from finetune.interrupt import pid_alive

PRUNERS = ("none", "median", "hyperband")
_SQLITE_TIMEOUT_S = 120  # trials in other processes (joblib) write to one sqlite file: wait for its lock, don't fail
OWNER = "finetune_launch"  # user attribute of each trial the sweeper asks: "<host>:<pid>" of the launch that asked it
INTERRUPTED = "finetune_interrupted"  # user attribute of a trial failed because the launch that ran it was killed


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
    with storage_errors(sweeper.storage):
        rdb = storage(sweeper.storage)
        study = optuna.load_study(study_name=sweeper.study_name, storage=rdb, pruner=pruner(sweeper),
                                  sampler=optuna.samplers.RandomSampler())  # the job asks nothing: no TPE set-up
        trial_id = rdb.get_trial_id_from_study_id_trial_number(rdb.get_study_id_from_name(sweeper.study_name), number)
    return optuna.trial.Trial(study, trial_id)


def open_study(s, rdb, sampler_: optuna.samplers.BaseSampler, pruner_: optuna.pruners.BasePruner):
    """(the study, whether it existed): a launch that joins an existing study -- resumed, or another launch's running
    now -- reseeds its sampler, which would otherwise replay the draws of the launch that created the study."""
    try:
        return optuna.create_study(study_name=s.study_name, storage=rdb, sampler=sampler_, pruner=pruner_,
                                   direction=s.direction), False
    except optuna.exceptions.DuplicatedStudyError:
        study = optuna.create_study(study_name=s.study_name, storage=rdb, sampler=sampler_, pruner=pruner_,
                                    direction=s.direction, load_if_exists=True)
        sampler_.reseed_rng()
        return study, True


def fail_interrupted(study, rdb) -> int:
    """Mark failed the trials left running by a killed launch -- one of this machine whose process is gone, or one
    that did not say who it was -- so they count for nothing; a live launch's running trials are left to it."""
    failed = 0
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        host, _, pid = str(t.user_attrs.get(OWNER, "")).rpartition(":")
        if host and (host != socket.gethostname() or not pid.isdigit() or pid_alive(int(pid))):
            continue
        trial_id = rdb.get_trial_id_from_study_id_trial_number(rdb.get_study_id_from_name(study.study_name), t.number)
        try:
            rdb.set_trial_user_attr(trial_id, INTERRUPTED, True)
            study.tell(t.number, state=optuna.trial.TrialState.FAIL)
            failed += 1
        except (optuna.exceptions.UpdateFinishedTrialError, ValueError):  # another launch marked it first
            pass
    return failed


def counted(trial) -> bool:
    """Whether a trial counts toward n_trials: finished (but not for a killed launch) or running in a live launch."""
    done = trial.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED,
                           optuna.trial.TrialState.FAIL, optuna.trial.TrialState.RUNNING)
    return done and not trial.user_attrs.get(INTERRUPTED)


@contextlib.contextmanager
def asking(url: str | None) -> Iterator[None]:
    """Held while a launch counts the study's trials and asks its next ones: with an sqlite study on this machine (or a
    shared directory), launches continuing it at once never ask more than n_trials, and a batch's trial numbers follow
    each other. A server storage has no such lock: launches at once may ask a trial or two past n_trials."""
    path = _sqlite_path(url)
    if path is None:
        yield
        return
    with open(f"{path}.lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@contextlib.contextmanager
def storage_errors(url: str | None) -> Iterator[None]:
    """An sqlite study still locked by another process after the storage's wait (sqlite's busy timeout: it retries
    until then) is one line saying what to use instead."""
    try:
        yield
    except Exception as e:
        if _locked(e):
            raise FinetuneError(
                f"the study's sqlite file {_sqlite_path(url)} stayed locked by other processes for "
                f"{_SQLITE_TIMEOUT_S} s; for many launches or trials writing at once use a server storage "
                "(hydra.sweeper.storage=postgresql://<user>:<password>@<host>/<database> or mysql+pymysql://...), "
                "or fewer at once") from e
        raise


def _locked(error: BaseException | None) -> bool:
    while error is not None:
        if "database is locked" in str(error):
            return True
        error = error.__cause__ or error.__context__
    return False


def _sqlite_path(url: str | None) -> Path | None:
    if not url or not url.startswith("sqlite:///"):
        return None
    return Path(url.removeprefix("sqlite:///"))

