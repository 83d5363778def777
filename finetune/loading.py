"""The one line a model load leaves in the run's log: the task's head, new by design, at info level; as a warning
when anything else was missing from the checkpoint or held there in another shape.

transformers logs its own load report (a table with terminal colour codes) as a warning of the
`transformers.modeling_utils` logger; the same facts come back from `from_pretrained(output_loading_info=True)`,
so that logger's warnings are filtered out for the call and the report is told here in plain words.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any, Iterable, Iterator

log = logging.getLogger("finetune.load")
_REPORTER = "transformers.modeling_utils"  # where transformers' log_state_dict_report writes


def _above_warning(record: logging.LogRecord) -> bool:
    return record.levelno > logging.WARNING


@contextlib.contextmanager
def quiet_load_report() -> Iterator[None]:
    """transformers' load report is not logged inside this block (its errors still raise). A filter, not the
    logger's level: from_pretrained checks a tensor-parallel plan, and warns about it, when that level is raised."""
    logger = logging.getLogger(_REPORTER)
    logger.addFilter(_above_warning)
    try:
        yield
    finally:
        logger.removeFilter(_above_warning)


def _modules(keys: Iterable[str]) -> str:
    return ", ".join(sorted({k.rsplit(".", 1)[0] for k in keys}))


def describe(model: Any, info: dict[str, Any], head: str | None, labels: int | None = None) -> tuple[int, str]:
    """(log level, line) for a load of `model` whose loading info is `info`. `head`: what the task adds on top of a
    pretrained body ("classification head"), so its weights are new by design; None: every missing weight is news.
    Weights of the checkpoint the model has no place for (a pretraining head, BERT's pooler) are a note: transformers
    drops them by design when a checkpoint is loaded for another task."""
    body = getattr(model, "base_model_prefix", "")
    in_body = (lambda key: key.startswith(f"{body}.")) if body and hasattr(model, body) else (lambda key: True)
    missing, head_line, news, unused_line = set(info["missing_keys"]), [], [], []
    if head:
        new_head = {k for k in missing if not in_body(k)}
        missing -= new_head
        new_head |= {k for k, _, _ in info.get("mismatched_keys", ()) if not in_body(k)}
        counted = f": {labels} labels" if labels else ""
        head_line.append(f"new {head}{counted} ({_modules(new_head)})" if new_head
                         else f"{head}{counted} from the checkpoint")
    if unused := info["unexpected_keys"]:
        parts = sorted({".".join(k.split(".")[:2]) for k in unused})
        unused_line.append(f"not used from the checkpoint: {', '.join(parts)}")
    if missing:
        news.append(f"not in the checkpoint, initialized new and trained: {_modules(missing)}")
    if mismatched := info.get("mismatched_keys"):
        shapes = ", ".join(f"{key} {tuple(old)} -> {tuple(new)}" for key, old, new in sorted(mismatched))
        news.append(f"another shape in the checkpoint, initialized new: {shapes}")
    return (logging.WARNING if news else logging.INFO), "; ".join(head_line + news + unused_line)


def report(model: Any, info: dict[str, Any], head: str | None, labels: int | None = None) -> None:
    level, line = describe(model, info, head, labels)
    if line:
        log.log(level, line)
