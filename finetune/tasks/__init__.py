"""The task registry, derived from the classes: every subclass of Task that sets `name`, found by importing the modules
of this package and those a distribution declares under the entry-point group "finetune.tasks" (a task defined
elsewhere registers by being imported; its configs/task/<name>.yaml comes on hydra.searchpath).

    get_task(cfg.task)        # the task of a composed config, or of a config an earlier release saved
    task_class("ner")         # a class by its name (or a name an earlier release used: token_classification)
    registry()                # {name: class}
"""

from __future__ import annotations

import pkgutil
from importlib import import_module
from importlib.metadata import entry_points
from typing import Any

from omegaconf import DictConfig, OmegaConf

from finetune.errors import FinetuneError
from finetune.tasks.base import Task


def registry() -> dict[str, type[Task]]:
    """{name: task class} of every concrete task."""
    for module in pkgutil.iter_modules(__path__):
        import_module(f"{__name__}.{module.name}")
    for entry in entry_points(group="finetune.tasks"):
        entry.load()
    found: dict[str, type[Task]] = {}
    pending = list(Task.__subclasses__())
    while pending:
        cls = pending.pop()
        pending += cls.__subclasses__()
        if "name" in vars(cls):
            found[cls.name] = cls
    return dict(sorted(found.items()))


def task_class(name: str) -> type[Task]:
    """The task class named `name` (its own name, or one of its aliases)."""
    tasks = registry()
    by_alias = {alias: cls for cls in tasks.values() for alias in cls.aliases}
    if name not in tasks and name not in by_alias:
        raise FinetuneError(f"unknown task '{name}': choose one of {', '.join(tasks)}")
    return tasks.get(name) or by_alias[name]


def task_config(cfg: Any) -> DictConfig:
    """A task config (composed, or a dict an earlier release saved) on its task's current schema: an old name mapped
    to the task's name, and keys added since then at their defaults."""
    values = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
    cls = task_class(values["name"])
    return OmegaConf.merge(OmegaConf.structured(cls.schema), {**values, "name": cls.name})


def get_task(cfg: Any) -> Task:
    """Instantiate the task of a task config (see task_config)."""
    cfg = task_config(cfg)
    return task_class(cfg.name)(cfg)
