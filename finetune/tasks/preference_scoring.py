"""How task=preference scores pairs: a batch of pairs, each sequence's answer log-probs through the chunked output
layer, a whole split scored in evaluation's batches, and the reference log-probs stored beside the pairs.

    batch = collate(rows, pad)                        # chosen sequences, then rejected ones; targets: the answers
    log_probs(model, batch, concatenate, chunked)     # [2 x pairs], with gradients in training
    score(model, ds, how)                             # [pairs, 2] in inference mode (adapter_off: LoRA's base)
    with_reference(model, ds, split, how, digest)     # ds + ref_chosen, ref_rejected: computed once, then cached

Torch and datasets are imported inside the functions (the task registry imports this module to read schemas).
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass
from typing import Any

from finetune import adapters

log = logging.getLogger("finetune.tasks.preference")


@dataclass
class Scoring:
    """How a split is scored: as evaluation batches it (longest first, batch_size pairs), padded with `pad`."""

    batch_size: int = 8
    pad: int = 0
    concatenate: bool = True  # chosen and rejected in one forward pass (task.concatenate)
    chunked: bool = True  # the model has the chunked output layer (lm_loss.attach)


def collate(rows: list[dict[str, Any]], pad: int) -> dict[str, Any]:
    """The pairs' chosen sequences, then their rejected ones (right-padded); targets: the answer tokens (-100
    elsewhere); reference: stored reference log-probs, in the same order; labels: which answer of a pair is preferred,
    0 (the Trainer hands evaluation's scores to the metrics only when labels come with them)."""
    import torch

    answers = [r["chosen_ids"] for r in rows] + [r["rejected_ids"] for r in rows]
    prompts = [r["prompt_ids"] for r in rows] * 2
    width = max(len(p) + len(a) for p, a in zip(prompts, answers))
    ids = torch.full((len(answers), width), pad, dtype=torch.long)
    mask, targets = torch.zeros_like(ids), torch.full_like(ids, -100)
    for i, (p, a) in enumerate(zip(prompts, answers)):
        ids[i, : len(p) + len(a)] = torch.tensor(p + a)
        mask[i, : len(p) + len(a)] = 1
        targets[i, len(p): len(p) + len(a)] = torch.tensor(a)
    batch = {"input_ids": ids, "attention_mask": mask, "targets": targets,
             "labels": torch.zeros(len(rows), dtype=torch.long)}
    if "ref_chosen" in rows[0]:
        batch["reference"] = torch.tensor([r["ref_chosen"] for r in rows] + [r["ref_rejected"] for r in rows])
    return batch


def log_probs(model, batch: dict[str, Any], concatenate: bool, chunked: bool):
    """[2 x pairs]: each sequence's summed answer log-probs (chosen sequences first)."""
    import torch

    from finetune.lm_loss import nll_sums

    n = len(batch["input_ids"]) // 2
    parts = []
    for rows in [slice(None)] if concatenate else [slice(0, n), slice(n, 2 * n)]:
        width = int(batch["attention_mask"][rows].sum(1).max())  # a half pads only to its own longest
        ids, mask, targets = (batch[k][rows, :width] for k in ("input_ids", "attention_mask", "targets"))
        if chunked:
            parts.append(model(input_ids=ids, attention_mask=mask, labels=targets, per_sequence=True,
                               use_cache=False).sequence_log_probs)
        else:  # a model whose logits are not its output layer's (lm_loss.attach warned): its own logits
            logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
            parts.append(-nll_sums(logits[:, :-1], targets[:, 1:])[:, 0])
    return torch.cat(parts)


def reference_log_probs(model, batch: dict[str, Any], how: Scoring):
    """The reference's log-probs of a batch on the fly: the LoRA model with its adapter disabled, without dropout."""
    import torch

    inner = unwrap(model)
    with torch.no_grad(), eval_mode(inner), inner.disable_adapter():
        return log_probs(inner, batch, how.concatenate, how.chunked)


def score(model, ds, how: Scoring, adapter_off: bool = False):
    """[pairs, 2]: the answers' summed log-probs under `model` (adapter_off: the base of a LoRA model), in inference
    mode, in the batches evaluation makes (longest first), so the base model scored against its stored log-probs
    ties exactly."""
    import numpy as np
    import torch
    from accelerate import PartialState

    inner = unwrap(model)
    device = PartialState().device
    if next(inner.parameters()).device != device:  # (before the engine moves it: on a GPU, score there)
        inner.to(device)
    order = np.argsort(-np.asarray(ds["length"]), kind="stable")
    rows = ds.select_columns(["prompt_ids", "chosen_ids", "rejected_ids"])
    values = np.zeros((len(ds), 2))
    off = inner.disable_adapter() if adapter_off and adapters.is_adapted(inner) else contextlib.nullcontext()
    with eval_mode(inner), torch.inference_mode(), off:
        for start in range(0, len(order), how.batch_size):
            chunk = order[start:start + how.batch_size]
            batch = {k: v.to(device) for k, v in collate([rows[int(i)] for i in chunk], how.pad).items()}
            values[chunk] = log_probs(inner, batch, how.concatenate, how.chunked).view(2, -1).T.double().cpu().numpy()
    return values


def with_reference(model, ds, split: str, how: Scoring, digest: str):
    """ds with the reference's log-probs of its answers (ref_chosen, ref_rejected): computed in one pass of the
    model as it is now (adapter disabled), or read from datasets' cache, whose key is the pairs', the weights'
    (digest: weights_digest(model)) and the batching's."""
    from accelerate import PartialState
    from datasets.fingerprint import Hasher

    fingerprint = Hasher.hash(("reference log-probs", ds._fingerprint, digest, how.batch_size, how.concatenate))
    computed: dict[str, Any] = {}

    def add(rows, indices):
        if not computed:  # datasets calls this only when its cache does not hold the result
            start = time.perf_counter()
            computed["values"] = score(model, ds, how, adapter_off=True)
            log.info("reference log-probs of the %s split: %d pairs in %.1fs", split, len(ds),
                     time.perf_counter() - start)
        values = computed["values"][indices]
        return {"ref_chosen": values[:, 0].tolist(), "ref_rejected": values[:, 1].tolist()}

    with PartialState().main_process_first():  # the other processes read what the first one stored
        out = ds.map(add, batched=True, with_indices=True, new_fingerprint=fingerprint)
    if not computed:
        log.info("reference log-probs of the %s split: read from the cache", split)
    return out


def stored(ds):
    """[pairs, 2]: the reference log-probs stored in ds."""
    import numpy as np

    return np.column_stack([ds["ref_chosen"], ds["ref_rejected"]])


def unwrap(model):
    """The model inside DDP / accelerate wrappers (a PeftModel stays one: its adapter can be disabled)."""
    from accelerate.utils import extract_model_from_parallel

    return extract_model_from_parallel(model)


@contextlib.contextmanager
def eval_mode(model):
    """The model without dropout for a while (a reference pass), then back in the mode it was in."""
    training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(training)


def weights_digest(model) -> str:
    """A hash of the model's pretrained weights (LoRA's own left out, names as without peft): what stored reference
    log-probs were computed with."""
    import hashlib

    import torch

    digest = hashlib.blake2b(digest_size=16)
    params = {n.replace(".base_layer", ""): p for n, p in adapters.base_model(unwrap(model)).named_parameters()
              if "lora_" not in n}
    for name in sorted(params):
        digest.update(name.encode())
        digest.update(params[name].detach().contiguous().view(torch.uint8).cpu().numpy())
    return digest.hexdigest()
