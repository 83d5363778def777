"""Which run directory a resumed launch continues.

`resume=true` picks the newest unfinished run (no model/ yet, at least one complete checkpoint) under
<runs_dir>/<task>/ whose config equals this launch's; `resume=<run dir>` names the run. The comparison covers the
resolved config minus the keys that do not change what is trained (VOLATILE). A run's config.yaml is read as this
version would have written it: a task name an earlier release used is the task's name now, and keys added since then
take their defaults, so a run started before an upgrade still resumes after it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict

from finetune.engines import last_checkpoint
from finetune.errors import FinetuneError
from finetune.tasks import task_config

VOLATILE = ("resume", "debug")
CONFIG_FILE = "config.yaml"
LATEST = "latest"


def target(value: Any) -> str | None:
    """resume=true -> LATEST, resume=<dir> -> the dir, resume=false/null/absent -> None."""
    text = "" if value is None else str(value).strip()
    if text.lower() in ("", "false", "none", "null", "0", "no"):
        return None
    return LATEST if text.lower() in ("true", "1", "yes", LATEST) else text


def _trained(cfg: DictConfig) -> dict:
    out = OmegaConf.to_container(cfg, resolve=True)
    for key in (*VOLATILE, "hydra"):
        out.pop(key, None)
    return out


def config_hash(values: dict) -> str:
    return hashlib.sha256(json.dumps(values, sort_keys=True, default=str).encode()).hexdigest()[:16]


def find_run_dir(cfg: DictConfig, wanted: str) -> Path:
    """The run directory to continue; `cfg` is this launch's composed config including its hydra node."""
    with open_dict(cfg):
        task_choice = cfg.hydra.runtime.choices.task
        del cfg["hydra"]
    digest = config_hash(_trained(cfg))
    if wanted == LATEST:
        root = Path(cfg.runs_dir) / task_choice
        runs = sorted((d for d in root.glob("*") if d.is_dir()), key=lambda d: d.stat().st_mtime, reverse=True)
        for run in runs:
            if not (run / "model").exists() and _stored_hash(run, cfg) == digest and last_checkpoint(run):
                return run
        raise FinetuneError(f"nothing to resume: no unfinished run of this config with a checkpoint in {root}; "
                            "run it without resume=true, or pass resume=<run dir>")
    run = Path(wanted).expanduser()
    if (run / "model").exists():
        raise FinetuneError(f"resume={wanted}: that run already finished (it has model/); nothing to resume")
    if not (run / CONFIG_FILE).is_file():
        raise FinetuneError(f"resume={wanted}: not a run directory (no {CONFIG_FILE}); pass resume=true or a runs/ "
                            "dir")
    if _stored_hash(run, cfg) != digest:
        raise FinetuneError(f"resume={wanted}: that run had a different config ({_difference(run, cfg)}); "
                            "resume with the overrides it was started with")
    if not last_checkpoint(run):
        raise FinetuneError(f"resume={wanted}: the run has no complete checkpoint yet; start it again without resume")
    return run


def _stored_hash(run: Path, cfg: DictConfig) -> str | None:
    stored = stored_config(run, cfg)
    return config_hash(stored) if stored is not None else None


def stored_config(run: Path, cfg: DictConfig) -> dict | None:
    """A run's config.yaml as this version writes `cfg`'s: the task's current name for one an earlier release used,
    and a group's keys added since then at their schema's defaults (keys since removed are dropped)."""
    path = run / CONFIG_FILE
    if not path.is_file():
        return None
    stored = _trained(OmegaConf.load(path))
    top = OmegaConf.get_type(cfg)
    if top is not dict:  # a top-level key added since then: at its default
        defaults = OmegaConf.structured(top)
        stored.update({k: defaults[k] for k in _trained(cfg) if k not in stored and k in defaults.keys()})
    for key, values in stored.items():
        node = cfg.get(key)
        if not isinstance(values, dict) or not isinstance(node, DictConfig) or OmegaConf.get_type(node) is dict:
            continue
        defaults = OmegaConf.structured(OmegaConf.get_type(node))
        if key == "task":
            values = OmegaConf.to_container(task_config(values))
        known = set(defaults.keys())  # (a key `in` a config is False while its value is missing: ???)
        merged = OmegaConf.merge(defaults, {k: v for k, v in values.items() if k in known})
        stored[key] = OmegaConf.to_container(merged, resolve=True)
    return stored


def _difference(run: Path, cfg: DictConfig) -> str:
    """The first few keys whose values differ between the stored run config and this launch's."""
    old = _flatten(stored_config(run, cfg) or {})
    new = _flatten(_trained(cfg))
    keys = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
    shown = ", ".join(f"{k}: {old.get(k)} -> {new.get(k)}" for k in keys[:3])
    return shown + (f" and {len(keys) - 3} more" if len(keys) > 3 else "") if keys else "config hash differs"


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(tree, dict):
        return {prefix[:-1]: tree}
    out: dict[str, Any] = {}
    for key, value in tree.items():
        out.update(_flatten(value, f"{prefix}{key}."))
    return out
