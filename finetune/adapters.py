"""Optional parameter-efficient fine-tuning (peft=lora): wrap the task's model before training, merge after.

    model = adapters.wrap(model, cfg.peft, task)     # a peft.PeftModel, or the model itself for peft=none
    ... any engine trains it like any other model ...
    adapters.save_adapter(model, model_dir / "adapter", base_model)   # the adapter alone, for sharing
    model = adapters.merge(model)                    # a plain transformers model: model/ loads without peft

Pretrained linear layers get low-rank adapters (peft.target_modules: by default the feed-forward layers). Modules the
checkpoint does not provide -- the task head, or any layer newly initialized at load time -- are trained in
full and saved with the adapter (peft's modules_to_save), so a reloaded head can never be random.
"""

from __future__ import annotations

import logging
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from finetune.errors import FinetuneError

log = logging.getLogger(__name__)

def base_model(model):
    """The transformers model inside a peft wrapper (the model itself otherwise)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def wrap(model, peft_cfg, task) -> Any:
    """The model with LoRA adapters (and its head trainable), or unchanged for peft.method=none (peft.* values are
    checked by finetune/validate.py)."""
    if peft_cfg.method == "none":
        return model
    from peft import LoraConfig, get_peft_model
    from peft.utils import ModulesToSaveWrapper

    targets = peft_cfg.target_modules
    targets = feed_forward_layers(model) if targets == "ffn" else targets if isinstance(targets, str) else list(targets)
    explicit = peft_cfg.modules_to_save is not None
    to_save = list(peft_cfg.modules_to_save) if explicit else trainable_modules(model)
    config = LoraConfig(r=peft_cfg.r, lora_alpha=peft_cfg.alpha, lora_dropout=peft_cfg.dropout,
                        target_modules=targets, modules_to_save=list(to_save) or None)
    try:
        # the generic PeftModel passes every input on; peft's PeftModelForQuestionAnswering drops token_type_ids
        # and position_ids, so BERT-style QA would train without its segment ids
        wrapped = get_peft_model(model, config)
        wrapped.peft_config[wrapped.active_adapter].task_type = task.peft_task_type  # adapter_config.json metadata
    except ValueError as e:
        import torch

        linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
        raise FinetuneError(f"peft.target_modules={targets} does not fit this model ({str(e).splitlines()[0][:200]}); "
                            f"use all-linear or names of its linear layers: {', '.join(linear)}") from e
    lora_config = wrapped.peft_config[wrapped.active_adapter]
    if lora_config.modules_to_save:  # peft appends its own guesses (classifier, score) to ours: drop repeats
        lora_config.modules_to_save = list(dict.fromkeys(lora_config.modules_to_save))
    saved = [n for n, m in wrapped.named_modules() if isinstance(m, ModulesToSaveWrapper)]
    missing = [name for name in to_save if not any(n.endswith(name) for n in saved)]
    if missing:
        raise FinetuneError(f"peft.modules_to_save names no module of this model: {', '.join(missing)}; "
                            f"name top-level modules such as {', '.join(n for n, _ in model.named_children())}")
    log.info("LoRA r=%d alpha=%g dropout=%g on %s; trained in full and saved with the adapter: %s",
             peft_cfg.r, peft_cfg.alpha, peft_cfg.dropout, targets, ", ".join(sorted(to_save)) or "nothing")
    return wrapped


def feed_forward_layers(model) -> list[str]:
    """The linear layers of the transformer blocks' feed-forward networks: inside a numbered block, outside attention
    (BERT intermediate/output.dense, Llama mlp.*_proj, GPT-2 mlp.c_fc/c_proj, T5 DenseReluDense.wi/wo, BART fc1/fc2)."""
    import re

    import torch
    from transformers.pytorch_utils import Conv1D

    # peft has no such selector; matching names keeps it one rule for every architecture
    names = [n for n, m in model.named_modules() if isinstance(m, (torch.nn.Linear, Conv1D))
             and re.search(r"\.\d+\.", n) and not re.search(r"attn|attention", n, re.IGNORECASE)]
    if not names:
        raise FinetuneError("peft.target_modules=ffn finds no feed-forward layer in this model's blocks; use "
                            "all-linear or a list of its linear layers' names")
    return names


def trainable_modules(model) -> list[str]:
    """Modules to train in full: the head beside the pretrained backbone, and any newly initialized module."""
    backbone = model.base_model
    embeddings = [m for m in (_embeddings(model, "input"), _embeddings(model, "output")) if m is not None]
    heads = set()
    if backbone is not model:  # e.g. BertForSequenceClassification: bert + classifier (+ dropout, no weights)
        for name, child in model.named_children():
            holds_embeddings = any(e is m for m in child.modules() for e in embeddings)  # an LM head is pretrained
            if child is not backbone and not holds_embeddings and any(True for _ in child.parameters()):
                heads.add(name)
    return sorted(heads | set(_new_modules(model)))


def _embeddings(model, which: str):
    try:
        return getattr(model, f"get_{which}_embeddings")()
    except (AttributeError, NotImplementedError):
        return None


def _new_modules(model) -> list[str]:
    """The largest modules whose parameters all were newly initialized by from_pretrained (not in the checkpoint)."""
    params = [n for n, _ in model.named_parameters(remove_duplicate=False)]
    new = _initialized(model)
    found = set()
    for name in new:
        parts = name.split(".")[:-1]
        for i in range(1, len(parts) + 1):
            prefix = ".".join(parts[:i])
            if all(p in new for p in params if p.startswith(prefix + ".")):
                found.add(prefix)
                break
    return sorted(found)


def _initialized(model) -> set[str]:
    """Names of the parameters that from_pretrained initialized (empty for a model not loaded from a checkpoint)."""
    # transformers marks each tensor it loaded with `_is_hf_initialized`; no public API reports this after loading.
    # Tied weights are listed under every name, so a module holding a loaded tied weight (an MLM head's decoder,
    # tied to the input embeddings) is not new, and only its new parts (the head transform) are trained in full
    named = list(model.named_parameters(remove_duplicate=False))
    new = {n for n, p in named if not getattr(p, "_is_hf_initialized", False)}
    return set() if len(new) == len(named) else new  # no flags at all: not loaded from a checkpoint, nothing to tell


def new_parameters(model) -> set[str]:
    """The trainable parameters (named as model.named_parameters() names them) that from_pretrained initialized:
    a new head, a warm start's cross-attention. Under LoRA: the fully trained copies of such modules, no adapters."""
    import re

    new = _initialized(model)
    # peft trains a copy of each modules_to_save module (<m>.modules_to_save.<adapter>.*, unflagged) beside the
    # original (<m>.original_module.*, flags kept): a copy is new when its original is
    def original(name: str) -> str:
        return re.sub(r"\.modules_to_save\.[^.]+\.", ".original_module.", name)

    adapter = f".{model.base_model.prefix}" if is_adapted(model) else None  # LoRA's own weights: lora_A, lora_B
    return {n for n, p in model.named_parameters()
            if p.requires_grad and original(n) in new and not (adapter and adapter in n)}


def is_adapted(model) -> bool:
    peft = sys.modules.get("peft")  # a model can only be a PeftModel if peft was imported
    return peft is not None and isinstance(model, peft.PeftModel)


def parameter_counts(model) -> dict[str, int]:
    """Trainable and total parameters of the model as trained (adapters and the head copy included)."""
    params = list(model.parameters())
    return {"trainable_params": sum(p.numel() for p in params if p.requires_grad),
            "total_params": sum(p.numel() for p in params)}


def save_adapter(model, directory: Path, base_model: str | None = None) -> bool:
    """Write the adapter (LoRA weights + fully trained modules) to `directory`; False if the model has none."""
    if not is_adapted(model):
        return False
    from huggingface_hub import ModelCard, ModelCardData

    config = model.peft_config[model.active_adapter]
    if base_model:  # a Hub id beats the local cache path peft records
        config.base_model_name_or_path = base_model
    model.save_pretrained(directory)
    # peft writes a template card with the local base path: replace it with what the adapter really is
    data = ModelCardData(library_name="peft", base_model=base_model, tags=["finetune", "lora"])
    ModelCard(f"---\n{data.to_yaml()}\n---\n\n# LoRA adapter\n\n{describe(config)}. The merged model is the parent "
              "directory; the parent's README.md shows how to load this adapter onto the base model.\n"
              ).save(directory / "README.md")
    return True


def describe(config) -> str:
    """One line about a peft.LoraConfig or the run's peft config."""
    r = config.r
    alpha = getattr(config, "lora_alpha", getattr(config, "alpha", None))
    dropout = getattr(config, "lora_dropout", getattr(config, "dropout", None))
    targets = config.target_modules
    if isinstance(targets, str):
        where = {"all-linear": "all linear layers", "ffn": "the feed-forward layers"}.get(targets,
                                                                                        f"modules matching {targets}")
    else:  # peft stores all-linear as the full module names: name their kinds
        where = f"{len(targets)} modules ({', '.join(sorted({t.rsplit('.', 1)[-1] for t in targets}))})"
    return f"LoRA (rank r={r}, alpha={alpha}, dropout={dropout}) on {where}"


@contextmanager
def merged_for_inference(model, sharded: bool = False):
    """Evaluation with the adapters folded into the frozen weights: one matmul a layer instead of three. Unfolded
    afterwards (peft's merge_adapter / unmerge_adapter, as TRL does around generation; the weights come back within
    fp32 rounding). Sharded (FSDP) weights are left alone, and so are 16-bit base weights (model.dtype=bfloat16):
    W + d - d does not give W back in bfloat16."""
    import torch

    if sharded or not is_adapted(model) or model.get_base_model().dtype != torch.float32:
        yield
        return
    model.merge_adapter()
    try:
        yield
    finally:
        model.unmerge_adapter()


def merge(model):
    """A plain transformers model with the adapters folded into its weights (the model itself without adapters). On a
    16-bit base peft adds the float32 adapter product in place, which PyTorch computes in float32 and rounds once to
    the base's dtype: merged in fp32, then cast (tests/test_memory.py checks it)."""
    return model.merge_and_unload() if is_adapted(model) else model


def card_section(cfg, task, base_model: str | None) -> str:
    """Model-card paragraph about the adapter ('' for full fine-tuning)."""
    if cfg.peft.method == "none":
        return ""
    base = base_model or cfg.model.name_or_path
    return f"""
## LoRA

Trained with {describe(cfg.peft)}; the task head was trained in full. The adapters are merged into the
weights of this directory, so it loads without peft. The adapter alone (LoRA weights + head) is in `adapter/`:

```python
from peft import PeftModel
{task.adapter_base_code(cfg, base)}
model = PeftModel.from_pretrained(base, "path/to/this/directory/adapter")
```
"""
