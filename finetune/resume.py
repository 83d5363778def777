"""Which run directory a resumed launch continues.

`resume=true` picks the newest unfinished run (no model/ yet, at least one complete checkpoint) under
<runs_dir>/<task>/ whose config hash equals this launch's; `resume=<run dir>` names the run. The hash
covers the resolved config minus the keys that do not change what is trained (VOLATILE); each run
stores it in <run dir>/config.hash.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict

from finetune.errors import FinetuneError

VOLATILE = ("resume", "debug")
HASH_FILE = "config.hash"
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


def config_hash(cfg: DictConfig) -> str:
    return hashlib.sha256(json.dumps(_trained(cfg), sort_keys=True, default=str).encode()).hexdigest()[:16]


def find_run_dir(cfg: DictConfig, wanted: str) -> Path:
    """The run directory to continue; `cfg` is this launch's composed config including its hydra node."""
    from finetune.engines import last_checkpoint

    with open_dict(cfg):
        task_choice = cfg.hydra.runtime.choices.task
        del cfg["hydra"]
    digest = config_hash(cfg)
    if wanted == LATEST:
        root = Path(cfg.runs_dir) / task_choice
        runs = sorted((d for d in root.glob("*") if d.is_dir()), key=lambda d: d.stat().st_mtime, reverse=True)
        for run in runs:
            if _stored_hash(run) == digest and not (run / "model").exists() and last_checkpoint(run):
                return run
        raise FinetuneError(f"nothing to resume: no unfinished run of this config with a checkpoint in {root}; "
                            "run it without resume=true, or pass resume=<run dir>")
    run = Path(wanted).expanduser()
    if not (run / HASH_FILE).is_file():
        raise FinetuneError(f"resume={wanted}: not a run directory (no {HASH_FILE}); pass resume=true or a runs/ dir")
    if (run / "model").exists():
        raise FinetuneError(f"resume={wanted}: that run already finished (it has model/); nothing to resume")
    if _stored_hash(run) != digest:
        raise FinetuneError(f"resume={wanted}: that run had a different config ({_difference(run, cfg)}); "
                            "resume with the overrides it was started with")
    if not last_checkpoint(run):
        raise FinetuneError(f"resume={wanted}: the run has no complete checkpoint yet; start it again without resume")
    return run


def _stored_hash(run: Path) -> str | None:
    path = run / HASH_FILE
    return path.read_text().strip() if path.is_file() else None


def _difference(run: Path, cfg: DictConfig) -> str:
    """The first few keys whose values differ between the stored run config and this launch's."""
    old = _flatten(_trained(OmegaConf.load(run / "config.yaml"))) if (run / "config.yaml").is_file() else {}
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
