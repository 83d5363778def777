"""Training engines. Each takes the same task objects (model, features, collator, metrics) and knows
nothing about which task it trains.

    engine = make_engine(cfg, task, model, tokenizer, features, output_dir)
    engine.train() -> train metrics;  engine.evaluate("test") -> {"test_<metric>": ...}
    engine.model (best checkpoint restored), engine.log_history (Trainer-style list of dicts)
"""

from __future__ import annotations

from importlib import import_module
from typing import Any, Callable

from finetune.errors import FinetuneError

ENGINES = {"hf": "finetune.engines.hf:HFEngine"}


def make_engine(cfg, task, model, tokenizer, features, output_dir):
    name = cfg.trainer.engine
    if name not in ENGINES:
        raise FinetuneError(f"unknown trainer.engine '{name}': choose one of {', '.join(sorted(ENGINES))}")
    module, _, cls = ENGINES[name].partition(":")
    return getattr(import_module(module), cls)(cfg, task, model, tokenizer, features, output_dir)


def without_length(collator: Callable) -> Callable:
    """The `length` column feeds the length-grouped sampler only; the model must not see it."""

    def collate(features: list[dict[str, Any]]) -> Any:
        return collator([{k: v for k, v in f.items() if k != "length"} for f in features])

    return collate


def mixed_precision(setting: str) -> str:
    """'auto' -> bf16 on a GPU that supports it, else fp32 (fp16/bf16 on CPU is slow or unsupported)."""
    import torch

    if setting == "auto":
        return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
    if setting not in ("no", "fp16", "bf16"):
        raise FinetuneError(f"trainer.mixed_precision must be auto, no, fp16 or bf16 (got '{setting}')")
    if setting != "no" and not torch.cuda.is_available():
        raise FinetuneError(f"trainer.mixed_precision={setting} needs a GPU; use auto or no on CPU")
    return setting
