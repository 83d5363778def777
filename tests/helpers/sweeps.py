"""Sweeps (python -m finetune -m ...) on the tiny BERT: a few optimizer steps a trial, the trial records a sweep
writes, hand-made ones for the leaderboard, the config one trial sees, and the Optuna sweeper's loop with a stand-in
launcher (no training)."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

SWEEP_ROWS = 96  # 76 train / 10 validation / 10 test
# a trial: a few steps on reviews.csv (helpers.data.write_sentiment_csv) in the working directory
TINY = ["task=sentiment", "data=reviews.csv", "data.text_column=review", "data.label_column=sentiment",
        "trainer.max_steps=3", "trainer.per_device_train_batch_size=16", "trainer.warmup_ratio=0"]


def trial_record(sweep: Path, n: int) -> dict:
    """Trial n's record (trial.json)."""
    return json.loads((sweep / str(n) / "trial.json").read_text())


def fake_trial(sweep: Path, n: int, overrides: list[str], record: dict | None, metrics: dict | None = None):
    """What trial n of a sweep leaves: its overrides, its record (none: killed before it wrote one) and, given
    metrics, metrics.json and a model directory."""
    d = sweep / str(n)
    (d / ".hydra").mkdir(parents=True)
    (d / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    if record is not None:
        (d / "trial.json").write_text(json.dumps({"trial": n, "overrides": overrides, **record}))
    if metrics is not None:
        (d / "metrics.json").write_text(json.dumps(metrics))
        (d / "model").mkdir()


def trial_config(*hydra_overrides: str, num: int = 7):
    """The config a sweep's trial `num` sees, HydraConfig included."""
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    from finetune.compose import register_configs
    from finetune.config import CONFIG_DIR

    register_configs()
    with initialize_config_dir(version_base=None, config_dir=str(CONFIG_DIR)):
        cfg = compose("config", overrides=["task=sentiment", "trainer.learning_rate=0.5", *hydra_overrides],
                      return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.job.num = num
    HydraConfig.instance().set_config(cfg)
    return cfg


class FakeLauncher:
    """Runs each job as outcome(its overrides as a dict): a value, None (the trial failed and said so), an
    optuna.TrialPruned (returned, as a pruned trial does), or an exception it raises (Hydra marks the job FAILED)."""

    def __init__(self, outcome, numbered=False):
        self.outcome, self.numbered, self.calls = outcome, numbered, []

    def launch(self, job_overrides, initial_job_idx):
        from hydra.core.utils import JobReturn, JobStatus

        self.calls.append((initial_job_idx, [list(o) for o in job_overrides]))
        returns = []
        for number, overrides in enumerate(job_overrides, initial_job_idx):
            try:
                params = dict(o.split("=", 1) for o in overrides)
                value = self.outcome(params, number) if self.numbered else self.outcome(params)
                returns.append(JobReturn(status=JobStatus.COMPLETED, _return_value=value))
            except Exception as e:
                returns.append(JobReturn(status=JobStatus.FAILED, _return_value=e))
        return returns


def run_sweeper(tmp_path, outcome, arguments=(), numbered=False, **settings):
    """The sweeper on the study in tmp_path/sweep/optuna.db, its jobs run by outcome(params[, job number])."""
    from omegaconf import OmegaConf

    from hydra_plugins.finetune_sweeper import FinetuneOptunaConf, FinetuneOptunaSweeper

    cfg = OmegaConf.merge(OmegaConf.structured(FinetuneOptunaConf), {
        "storage": f"sqlite:///{tmp_path / 'sweep' / 'optuna.db'}", "n_trials": 4, "n_jobs": 2,
        "sampler": {"seed": 0}, "params": {"x": "interval(0.0, 1.0)", "seed": 3}, **settings})
    sweeper = FinetuneOptunaSweeper(**{k: v for k, v in cfg.items() if k != "_target_"})
    sweeper.launcher = FakeLauncher(outcome, numbered)
    sweeper.sweep(list(arguments))
    return sweeper.launcher.calls
