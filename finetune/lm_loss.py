"""A language-model loss that never holds the whole tokens x vocabulary logits (trainer.lm_loss_chunk_size).

    lm_loss.attach(model, shift=1, chunk_size=512)    # task=generation; shift=0: MLM, encoder-decoders
    out = model(**batch)                                # batch with labels: out.loss, and outside autograd
                                                        # out.token_nll / out.token_top1 (labels' shape)
    out = model(**batch, per_sequence=True)             # out.sequence_log_probs: each row's summed label log-probs

The model runs up to its output layer (the input of get_output_embeddings(), after any head transform: an MLM head's
dense + norm, T5's rescaling); the positions whose label is -100 are dropped there, before the output layer; the
output layer and the cross-entropy then run `chunk_size` labelled tokens at a time, each chunk's gradients taken as soon
as its logits exist, so at most one chunk's logits exist. The loss is the sum over the tokens divided by their
number (or by the Trainer's num_items_in_batch, as transformers' own loss does): the model's own loss, to float
rounding. The wrapped forward is the model's own `forward`, so engines, LoRA (peft calls it), DDP and FSDP (it runs
inside the root module's forward, where the sharded output layer is gathered) see an ordinary model.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from transformers.utils import ModelOutput

from finetune.adapters import base_model

log = logging.getLogger(__name__)


@dataclass
class LMLossOutput(ModelOutput):
    """The chunked loss's output. Outside autograd (evaluation) also, per label position (labels' shape): the NLL of
    the label (0 where none is predicted) and the top-1 predicted token (-100 where none is predicted)."""

    loss: torch.Tensor | None = None
    token_nll: torch.Tensor | None = None
    token_top1: torch.Tensor | None = None
    sequence_log_probs: torch.Tensor | None = None  # per_sequence=True: [rows], with gradients under autograd


def attach(model, shift: int, chunk_size: int, label_smoothing: float = 0.0) -> bool:
    """Make the model compute its LM loss chunk by chunk whenever it is given labels (in place); shift=1: a token's
    label is predicted from the position before (causal LMs), 0: from its own position. False, with a warning, when
    the model's logits are not its output layer's (then it keeps its own loss)."""
    model = base_model(model)
    head = model.get_output_embeddings()
    if head is None or getattr(model.forward, "_chunked_lm_loss", False):
        if head is None:
            log.warning("%s has no output embedding layer: trainer.lm_loss_chunk_size does not apply, it computes "
                        "its own loss", type(model).__name__)
        return head is not None
    head_fn = _head_function(model, head)
    if not _reproduces_logits(model, head, head_fn):
        log.warning("%s changes its logits after the output layer (%s): trainer.lm_loss_chunk_size does not apply, "
                    "it computes its own loss", type(model).__name__, type(head).__name__)
        return False
    own = model.forward

    @functools.wraps(own)
    def forward(*args, labels=None, num_items_in_batch=None, per_sequence=False, **kwargs):
        if labels is None:
            return own(*args, **kwargs)
        hidden = _up_to_head(own, head, *args, labels=labels, **kwargs)  # labels: encoder-decoders shift them
        if per_sequence:
            return LMLossOutput(sequence_log_probs=sequence_log_probs(hidden, head_fn, labels, shift, chunk_size))
        return _loss(hidden, head, head_fn, labels, shift, chunk_size, label_smoothing, num_items_in_batch)

    forward._chunked_lm_loss = True
    model.forward = forward
    return True


def chunked_cross_entropy(hidden: torch.Tensor, head: Callable, targets: torch.Tensor, chunk_size: int,
                          label_smoothing: float = 0.0, params: list[torch.Tensor] = ()) -> torch.Tensor:
    """The summed cross-entropy of head(row) against its target, over the rows of hidden ([N, H]) and targets ([N]),
    chunk_size rows at a time; params: head's trainable parameters. Under autograd each chunk's gradients are taken as
    soon as its logits exist, then the logits are freed: one chunk's logits at a time, none recomputed in backward."""
    if torch.is_grad_enabled():
        return _ChunkedCrossEntropy.apply(hidden, targets, head, chunk_size, label_smoothing, *params)
    return sum((F.cross_entropy(head(hidden[i:i + chunk_size]).float(), targets[i:i + chunk_size], reduction="sum",
                                label_smoothing=label_smoothing) for i in range(0, len(targets), chunk_size)),
               hidden.new_zeros((), dtype=torch.float32))


def sequence_log_probs(hidden: torch.Tensor, head: Callable, labels: torch.Tensor, shift: int,
                       chunk_size: int) -> torch.Tensor:
    """Per row of labels (-100: not scored): the summed log-probability of its labels, [rows] float32, from the output
    layer's input `hidden`; only labelled positions reach the output layer, chunk_size at a time. Under autograd each
    chunk's logits are recomputed in backward (torch.utils.checkpoint) rather than kept: unlike the summed loss, a
    row's gradient is scaled by whatever follows (a preference loss), so it cannot be taken ahead in forward."""
    from torch.utils.checkpoint import checkpoint

    targets = labels[:, shift:].to(hidden.device)
    keep = targets != -100
    h, t = hidden[:, : hidden.shape[1] - shift][keep], targets[keep]
    parts = []
    for start in range(0, len(t), chunk_size):
        chunk = (head, h[start:start + chunk_size], t[start:start + chunk_size])
        parts.append(checkpoint(_label_log_probs, *chunk, use_reentrant=False) if torch.is_grad_enabled()
                     else _label_log_probs(*chunk))
    per_token = torch.cat(parts) if parts else h.new_zeros(0, dtype=torch.float32)
    rows = keep.nonzero(as_tuple=True)[0]
    return torch.zeros(len(labels), dtype=torch.float32, device=h.device).index_add(0, rows, per_token)


def _label_log_probs(head: Callable, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return -F.cross_entropy(head(hidden).float(), targets, reduction="none")


class _ChunkedCrossEntropy(torch.autograd.Function):
    """Forward computes the gradients too (the loss is the last step before backward, so they are only scaled there):
    torch.utils.checkpoint would free a chunk's logits the same way but compute them twice (one more output-layer
    matmul a chunk: docs/benchmarks.md#chunked-loss)."""

    @staticmethod
    def forward(ctx, hidden, targets, head, chunk_size, label_smoothing, *params):
        grad_hidden = torch.empty_like(hidden)
        grad_params = [torch.zeros_like(p) for p in params]
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, len(targets), chunk_size):
            with torch.enable_grad():
                h = hidden[start:start + chunk_size].detach().requires_grad_()
                loss = F.cross_entropy(head(h).float(), targets[start:start + chunk_size], reduction="sum",
                                       label_smoothing=label_smoothing)
                grads = torch.autograd.grad(loss, [h, *params], allow_unused=True)
            grad_hidden[start:start + chunk_size] = grads[0]
            for g, d in zip(grad_params, grads[1:]):
                if d is not None:
                    g += d
            total += loss.detach()
        ctx.save_for_backward(grad_hidden, *grad_params)
        return total

    @staticmethod
    def backward(ctx, grad_output):
        grad_hidden, *grad_params = ctx.saved_tensors
        return grad_hidden.mul_(grad_output), None, None, None, None, *(g.mul_(grad_output) for g in grad_params)


def _loss(hidden, head, head_fn, labels, shift: int, chunk_size: int, label_smoothing: float, num_items) -> LMLossOutput:
    targets = labels[:, shift:].to(hidden.device)
    hidden = hidden[:, : hidden.shape[1] - shift]
    keep = targets != -100
    h, t = hidden[keep], targets[keep]  # the positions without a label never reach the output layer
    count = num_items.to(h.device) if torch.is_tensor(num_items) else num_items or len(t)
    if torch.is_grad_enabled():
        params = [p for p in head.parameters() if p.requires_grad]  # now: FSDP swaps in the gathered ones
        return LMLossOutput(loss=chunked_cross_entropy(h, head_fn, t, chunk_size, label_smoothing, params) / count)
    nll, top1 = [], []  # (evaluation: the loss is not smoothed, as trainer.label_smoothing smooths training only)
    for start in range(0, len(t), chunk_size):
        logits = head_fn(h[start:start + chunk_size]).float()
        nll.append(F.cross_entropy(logits, t[start:start + chunk_size], reduction="none"))
        top1.append(logits.argmax(-1))
    token_nll = torch.zeros(labels.shape, dtype=torch.float32, device=h.device)
    token_top1 = torch.full(labels.shape, -100, dtype=torch.long, device=h.device)
    if nll:  # evaluation reports the NLL itself (perplexity), not a smoothed training loss
        token_nll[:, shift:][keep], token_top1[:, shift:][keep] = torch.cat(nll), torch.cat(top1)
    loss = (torch.cat(nll).sum() if nll else h.new_zeros((), dtype=torch.float32)) / count
    return LMLossOutput(loss=loss, token_nll=token_nll, token_top1=token_top1)


def token_cross_entropy(logits, labels, label_smoothing: float, shift: int, num_items) -> torch.Tensor:
    """The label-smoothed token cross-entropy from a model's own logits (-100: no label), summed and divided by
    num_items; shift 1: a causal LM's position t predicts token t + 1."""
    logits, labels = logits[:, : logits.shape[1] - shift], labels[:, shift:]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), ignore_index=-100,
                           reduction="sum", label_smoothing=label_smoothing) / num_items


def token_outputs(outputs: Any, labels: Any) -> tuple[Any, Any] | None:
    """(token_nll, token_top1) when an evaluation's outputs came from the chunked loss, None when they are logits
    (what the engines pass to a task's preprocess_logits: the outputs other than the loss, bare when only one)."""
    if isinstance(outputs, tuple) and len(outputs) == 2 and labels is not None and outputs[0].shape == labels.shape:
        return outputs
    return None


def lm_sums(outputs, labels, shift: int):
    """Per example of an evaluated batch: the summed NLL of its labels and their number, as [rows, 2], from the
    chunked loss's per-token NLL (finetune/lm_loss.py) or, when the model computed its own loss, from its logits
    (shift: labels are predicted from the position before)."""
    tokens = token_outputs(outputs, labels)
    if tokens is not None:
        nll, top1 = tokens
        return torch.stack([nll.sum(1), (top1 != -100).sum(1).float()], dim=1)
    return nll_sums(outputs[0] if isinstance(outputs, tuple) else outputs, labels[:, shift:])


def nll_sums(logits, targets):
    """Per row of targets (-100: no target): the summed NLL of its targets and their number, as [rows, 2]. Only the
    target positions' logits are scored: a prompt or padding is most of a batch's vocabulary x tokens logits."""
    rows, cols = (targets != -100).nonzero(as_tuple=True)
    nll = F.cross_entropy(logits[rows, cols].float(), targets[rows, cols], reduction="none")
    sums = torch.zeros(len(targets), dtype=torch.float32, device=nll.device).index_add_(0, rows, nll)
    return torch.stack([sums, torch.bincount(rows, minlength=len(targets)).float()], dim=1)


class _HeadReached(Exception):
    """Raised by the output layer's pre-hook: the model's forward stops where its logits would be computed."""


def _up_to_head(forward: Callable, head, *args, **kwargs) -> torch.Tensor:
    """The input of the output layer when `forward` runs (nothing after it runs)."""
    captured = []

    def stop(module, inputs):
        captured.append(inputs[0])
        raise _HeadReached

    handle = head.register_forward_pre_hook(stop)
    try:
        forward(*args, **kwargs)
    except _HeadReached:
        pass
    finally:
        handle.remove()
    if not captured:
        raise RuntimeError(f"the forward of this model never calls its output layer ({type(head).__name__})")
    return captured[0]


def _head_function(model, head) -> Callable:
    """The output layer and what the model adds to its output (BART-family models: final_logits_bias)."""
    bias = getattr(model, "final_logits_bias", None)
    if isinstance(bias, torch.Tensor):
        return lambda h: head(h) + bias.to(h.device)
    return head


def _reproduces_logits(model, head, head_fn: Callable) -> bool:
    """Whether head_fn(the output layer's input) is the model's logits, on 8 tokens (a model that rescales or caps
    its logits after the output layer, e.g. Gemma's soft-capping, is not)."""
    device = next(model.parameters()).device
    ids = (torch.arange(8, device=device) % getattr(model.get_input_embeddings(), "num_embeddings", 8)).unsqueeze(0)
    inputs = {"input_ids": ids, "decoder_input_ids": ids} if model.config.is_encoder_decoder else {"input_ids": ids}
    seen = []
    handle = head.register_forward_pre_hook(lambda module, args: seen.extend(args[:1]))
    training = model.training
    model.eval()
    try:
        with torch.no_grad():
            logits = model(**inputs).logits
            return bool(seen) and torch.allclose(head_fn(seen[-1]), logits, rtol=1e-4, atol=1e-5)
    finally:
        handle.remove()
        model.train(training)
