"""Loading a checkpoint with the run's model settings (revision, remote code, dropouts, offline cache), and the one
line a load leaves in the run's log: the task's head, new by design, at info level; as a warning when anything else
was missing from the checkpoint or held there in another shape.

transformers logs its own load report (a table with terminal colour codes) as a warning of the
`transformers.modeling_utils` logger; the same facts come back from `from_pretrained(output_loading_info=True)`,
so that logger's warnings are filtered out for the call and the report is told here in plain words.
"""

from __future__ import annotations

import contextlib
import logging
from typing import TYPE_CHECKING, Any, Iterable, Iterator

from finetune import sources

if TYPE_CHECKING:
    from finetune.config import ModelConfig

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


def position_limit(model: Any) -> int | None:
    """The longest input the model's learned absolute position embeddings cover; None when its positions are
    relative or rotary (DeBERTa-v2, T5, Llama: no table to run past). RoBERTa-style tables start after the
    padding index, BART-style ones after an offset."""
    from torch import nn

    for name, module in model.named_modules():
        if isinstance(module, nn.Embedding) and name.rsplit(".", 1)[-1] in ("position_embeddings", "wpe",
                                                                            "embed_positions"):
            start = getattr(module, "offset", 0) + (module.padding_idx + 1 if module.padding_idx is not None else 0)
            return module.num_embeddings - start
    return None


def load(auto_cls: Any, path: str, model_cfg: ModelConfig, **kwargs: Any) -> Any:
    """auto_cls.from_pretrained(path) with model.revision, model.trust_remote_code and the dropouts (models only); a
    Hub id that cannot be reached loads from the cache or fails in one line."""
    name = str(model_cfg.name_or_path)
    offline = sources.hub_offline(name, path)
    if offline:
        kwargs["local_files_only"] = True  # a Hub model downloaded before still loads from the cache
    if hasattr(auto_cls, "from_config"):  # a model, not its tokenizer
        kwargs.update(dropouts(path, model_cfg, kwargs.get("local_files_only", False)))
    try:
        return auto_cls.from_pretrained(
            path, revision=model_cfg.revision, trust_remote_code=model_cfg.trust_remote_code, **kwargs
        )
    except (OSError, ValueError, KeyError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise sources.model_error(name, first, offline) from e


def load_pretrained(auto_cls: Any, path: str, model_cfg: ModelConfig, head: str | None, **kwargs: Any) -> tuple:
    """(model, loading info) from_pretrained, its load told in one plain line."""
    with quiet_load_report():
        model, info = load(auto_cls, path, model_cfg, output_loading_info=True, **kwargs)
    report(model, info, head, kwargs.get("num_labels"))
    return model, info


# the names checkpoints give their dropouts. Attention probabilities: BERT-likes, BART/Llama-likes, GPT-2. Hidden
# states: BERT-likes, BART-likes/DistilBERT, GPT-2 (residual and embeddings), T5, BLOOM/Falcon
DROPOUT_KEYS = {
    "attention_dropout": ("attention_probs_dropout_prob", "attention_dropout", "attn_pdrop"),
    "hidden_dropout": ("hidden_dropout_prob", "dropout", "resid_pdrop", "embd_pdrop", "dropout_rate", "hidden_dropout"),
}


def dropouts(path: str, model_cfg: ModelConfig, local_files_only: bool = False) -> dict[str, float]:
    """model.attention_dropout and model.hidden_dropout as the config keys of the checkpoint at `path`
    (from_pretrained's keyword arguments); {} when both are null (the checkpoint's own)."""
    from transformers import AutoConfig

    wanted = {name: getattr(model_cfg, name) for name in DROPOUT_KEYS if getattr(model_cfg, name) is not None}
    if not wanted:
        return {}
    config = AutoConfig.from_pretrained(path, revision=model_cfg.revision, trust_remote_code=model_cfg.trust_remote_code,
                                        local_files_only=local_files_only)
    kwargs = {}
    for name, p in wanted.items():
        keys = [k for k in DROPOUT_KEYS[name] if hasattr(config, k)]
        if not keys:  # a warning, not an error: a task's default (task=qa) must not stop a model without the setting
            log.warning("model.%s=%s is not applied: model '%s' (%s) has no %s setting", name, p,
                        model_cfg.name_or_path, config.model_type, name.replace("_", " "))
        kwargs.update({k: float(p) for k in keys})
    return kwargs
