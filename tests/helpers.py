"""Compose the real config tree the way the CLI does, for in-process tests."""

from __future__ import annotations

from hydra import compose, initialize_config_dir

from finetune.__main__ import rewrite_overrides
from finetune.config import CONFIG_DIR, register_configs


def compose_cfg(*overrides: str):
    register_configs()
    with initialize_config_dir(version_base=None, config_dir=str(CONFIG_DIR)):
        return compose("config", overrides=rewrite_overrides(list(overrides)))
