"""Sweeps (python -m finetune -m ...) on the tiny BERT: a few optimizer steps a trial, the trial records a sweep
writes, hand-made ones for the leaderboard, and the config one trial sees."""

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
