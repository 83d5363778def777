"""The command line's config, composed before anything is written: the schemas registered (the groups of
finetune/config.py, each task's two from its module), the overrides composed, errors told in one line.

Hydra and OmegaConf report a bad override in several lines, and an unknown key without a suggestion;
config_error() turns their exception into one line: the key, the type the schema expects, and for an
unknown key the closest key of the node it was looked up in (read from the composed config, so it
follows whatever schema is registered).
"""

from __future__ import annotations

import dataclasses
import difflib

from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.errors import HydraException, MissingConfigException, OverrideParseException
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import (ConfigAttributeError, ConfigKeyError, MissingMandatoryValue, OmegaConfBaseException,
                              ValidationError)
from omegaconf.nodes import BooleanNode, EnumNode, FloatNode, IntegerNode, StringNode

from finetune.config import CONFIG_DIR, Config
from finetune.errors import FinetuneError
from finetune.tasks import registry

_EXPECTED = ((BooleanNode, "true or false"), (IntegerNode, "an integer"), (FloatNode, "a number"),
             (StringNode, "a string"), (ListConfig, "a list such as [a,b]"), (DictConfig, "a group of keys"))


def register_configs() -> None:
    """The schemas Hydra validates against: base_config, and schema/task/<name> + schema/data/<name> of every task
    (configs/task/<name>.yaml names its two in its defaults list)."""
    store = ConfigStore.instance()
    store.store(name="base_config", node=Config)
    for name, task in registry().items():
        store.store(group="schema/task", name=name, node=task.schema)
        store.store(group="schema/data", name=name, node=task.data_schema)


def compose(overrides: list[str]) -> DictConfig:
    """The config these command-line overrides give, hydra node included; FinetuneError when they do not make one."""
    try:
        with initialize_config_dir(version_base=None, config_dir=str(CONFIG_DIR)):
            cfg = hydra_compose("config", overrides=overrides, return_hydra_config=True)
        _reject_added_keys(cfg, overrides)
        # every value resolves and none is left unset (???): checked now, not when the run first reads it
        OmegaConf.to_container(OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]), resolve=True,
                               throw_on_missing=True)
    except (HydraException, OmegaConfBaseException) as e:
        raise FinetuneError(config_error(e, overrides)) from e
    return cfg


def config_error(exc: BaseException, overrides: list[str]) -> str:
    """One line for a Hydra / OmegaConf error about the config."""
    cause = next((e for e in _causes(exc) if isinstance(e, OmegaConfBaseException) and e.full_key), None)
    if cause is None:
        first = _first_line(exc)
        if isinstance(exc, OverrideParseException):
            return f"cannot parse the command line: {first} (syntax: https://hydra.cc/docs/advanced/override_grammar/basic)"
        if isinstance(exc, MissingConfigException) and exc.options:
            return f"{first}; choose one of {', '.join(exc.options)}"
        return first
    key, parent = cause.full_key, cause.parent_node
    if isinstance(cause, (ConfigAttributeError, ConfigKeyError)) and isinstance(parent, DictConfig) \
            and cause.key not in parent:
        return _unknown_key(key, [str(k) for k in parent.keys()], overrides)
    if isinstance(cause, MissingMandatoryValue):
        return f"{key} is not set; pass {key}=<value>"
    if isinstance(cause, ValidationError) and isinstance(parent, DictConfig) and cause.key in parent:
        given = next((o.partition("=")[2] for o in overrides if o.lstrip("+").partition("=")[0] == key), None)
        got = f" (got '{given}')" if given is not None else ""
        return f"{key} must be {_expected(parent._get_node(cause.key))}{got}"
    return f"{key}: {_first_line(cause.msg)}"


def _reject_added_keys(cfg: DictConfig, overrides: list[str]) -> None:
    """`+key=value` adds a key that struct mode would refuse; outside the schema nothing would read it."""
    for override in overrides:
        key = override.lstrip("+").partition("=")[0]
        if not override.startswith("+") or key.split(".")[0] == "hydra":
            continue
        parent_key, _, name = key.rpartition(".")
        parent = OmegaConf.select(cfg, parent_key) if parent_key else cfg
        schema = OmegaConf.get_type(parent) if isinstance(parent, DictConfig) else None
        if dataclasses.is_dataclass(schema) and name in parent:
            fields = [f.name for f in dataclasses.fields(schema)]
            if name not in fields:
                raise FinetuneError(_unknown_key(key, fields, overrides))


def _unknown_key(key: str, valid: list[str], overrides: list[str]) -> str:
    parent, _, name = key.rpartition(".")
    close = difflib.get_close_matches(name, valid, n=1)
    if not close:
        return f"unknown config key {key}; `python -m finetune --cfg job` shows the keys"
    # the key an override used may go deeper than the unknown part (trainr.learning_rate: suggest trainer.learning_rate)
    given = next((k for k in (o.lstrip("+").partition("=")[0] for o in overrides) if k.startswith(key + ".")), key)
    suggestion = ".".join(filter(None, [parent, close[0]])) + given[len(key):]
    return f"unknown config key {given}: did you mean {suggestion}?"


def _expected(node) -> str:
    if isinstance(node, EnumNode):
        text = "one of " + ", ".join(m.name for m in node._get_metadata().ref_type)
    else:
        text = next((name for cls, name in _EXPECTED if isinstance(node, cls)), "another type")
    return text + " or null" if node._is_optional() else text


def _causes(exc: BaseException):
    while exc is not None:
        yield exc
        exc = exc.__cause__ or exc.__context__


def _first_line(exc) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
