"""What autograd keeps for backward in a training step of a model, counted on the model itself (the activations part
of finetune/memory_estimate.py's estimate).

    activations = memory_probe.probe(model, padded=True)    # two short training-mode forward passes, counted
    activations.bytes(rows, tokens, checkpointing=False)    # scaled to a micro-batch
    activations.heaped(rows, tokens, below=4 << 20)         # the part in blocks smaller than `below` bytes

The probe runs PROBE_ROWS rows of each length in PROBE_LENGTHS and records the storage of every tensor autograd saves
(saved_tensors_hooks), layer by layer (the blocks gradient checkpointing recomputes, and the rest): two lengths fit a
term per token and one per token squared (attention matrices, kept with attention dropout). The vocabulary head is
not run (the loss's part is estimated on its own), the weights are not counted, and the model's mode and the random
generators are restored.
"""

from __future__ import annotations

from dataclasses import dataclass

PROBE_LENGTHS = (16, 32)  # tokens of the two probe batches: two points fit a per-token and a per-token-squared term
PROBE_ROWS = 2


@dataclass(frozen=True)
class Activations:
    """Bytes autograd keeps for backward, a probe row: rows x (a x tokens + b x tokens^2) for each checkpointable layer
    and for the rest of the model; `inputs`: each layer's input, bytes a token (what checkpointing keeps of it)."""

    layers: list[tuple[float, float]]
    inputs: list[float]
    other: tuple[float, float]
    blocks: tuple[tuple[float, float], ...] = ()  # each kept storage, as a layer is

    def bytes(self, rows: int, tokens: int, checkpointing: bool = False) -> float:
        """Kept through the forward pass, plus (with checkpointing) one layer's recomputed in backward."""
        return self.kept(rows, tokens, checkpointing) + self.recomputed(rows, tokens, checkpointing)

    def kept(self, rows: int, tokens: int, checkpointing: bool = False) -> float:
        """What the forward pass leaves for backward: everything, or with checkpointing each layer's input."""
        if checkpointing and self.layers:
            return _at(self.other, rows, tokens) + rows * tokens * sum(self.inputs)
        return _at(self.other, rows, tokens) + sum(_at(c, rows, tokens) for c in self.layers)

    def recomputed(self, rows: int, tokens: int, checkpointing: bool = False) -> float:
        """With checkpointing, the largest layer's activations, recomputed in backward one layer at a time."""
        return max(_at(c, rows, tokens) for c in self.layers) if checkpointing and self.layers else 0.0

    def heaped(self, rows: int, tokens: int, below: int) -> float:
        """The forward pass's activations in blocks smaller than `below` bytes at this micro-batch (on a CPU, glibc
        serves them from its heap; larger ones it maps, and unmaps when freed)."""
        return sum(size for size in (_at(c, rows, tokens) for c in self.blocks) if size < below)


def _at(coef: tuple[float, float], rows: int, tokens: int) -> float:
    return rows * (coef[0] * tokens + coef[1] * tokens**2)


def probe(model, padded: bool = True, autocast: str | None = None) -> Activations:
    """Count what autograd keeps for backward in a training-mode forward pass of `model` on PROBE_ROWS rows of each
    length in PROBE_LENGTHS (the second row half padding when `padded`), layer by layer, and fit a term per token and
    one per token squared. Nothing of the model changes: its mode and the random generators are restored."""
    layers = checkpoint_layers(model)
    counts = [_saved_bytes(model, layers, n, padded, autocast) for n in PROBE_LENGTHS]
    (t1, t2), rows = PROBE_LENGTHS, PROBE_ROWS

    def fit(y1: float, y2: float) -> tuple[float, float]:
        per1, per2 = y1 / rows / t1, y2 / rows / t2  # bytes a token at each length
        b = (per2 - per1) / (t2 - t1)
        return (max(per1, per2), 0.0) if b < 0 else (per1 - b * t1, b)

    blocks = [c["blocks"] for c in counts]  # the same storages in the same order at both lengths, as a rule
    return Activations(layers=[fit(a, b) for a, b in zip(counts[0]["layers"], counts[1]["layers"])],
                       inputs=[x / rows / t2 for x in counts[1]["inputs"]],
                       other=fit(counts[0]["other"], counts[1]["other"]),
                       blocks=tuple(map(fit, *blocks)) if len(blocks[0]) == len(blocks[1]) else
                       tuple((b / rows / t2, 0.0) for b in blocks[1]))


def checkpoint_layers(model) -> list:
    """The blocks gradient checkpointing recomputes (transformers' GradientCheckpointingLayer), in order."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


def _saved_bytes(model, layers: list, tokens: int, padded: bool, autocast: str | None) -> dict:
    import contextlib

    import torch

    device = next(model.parameters()).device
    weights = {t.untyped_storage().data_ptr() for t in unique_tensors(model, parameters=None)}
    seen: dict[int, tuple[int, int]] = {}  # storage -> (bytes, layer index or -1); alive until the forward ends
    inputs = [0] * len(layers)
    current = [-1]

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in weights and storage.data_ptr() not in seen:
            seen[storage.data_ptr()] = (storage.nbytes(), current[0])
        return t

    def enter(i):
        def hook(module, args, kwargs):
            current[0] = i
            hidden = args[0] if args else kwargs.get("hidden_states")
            if isinstance(hidden, torch.Tensor):
                inputs[i] = hidden.nbytes
        return hook

    def leave(module, args, output):
        current[0] = -1

    def stop(module, args):  # a vocabulary head's logits: the loss's part, estimated on its own (_loss_bytes)
        raise _HeadReached

    handles = [m.register_forward_pre_hook(enter(i), with_kwargs=True) for i, m in enumerate(layers)]
    handles += [m.register_forward_hook(leave) for m in layers]
    head = model.get_output_embeddings()
    if head is not None:
        handles.append(head.register_forward_pre_hook(stop))
    embeddings = model.get_input_embeddings()
    ids = (torch.arange(tokens, device=device) % max(1, getattr(embeddings, "num_embeddings", 2) - 1) + 1)
    ids = ids.expand(PROBE_ROWS, tokens).contiguous()
    mask = torch.ones_like(ids)
    if padded:
        mask[-1, tokens // 2:] = 0
    batch = {"input_ids": ids, "attention_mask": mask}
    if getattr(model.config, "is_encoder_decoder", False):
        batch["decoder_input_ids"] = ids
    training = model.training
    cast = torch.autocast(device.type, dtype=getattr(torch, autocast)) if autocast else contextlib.nullcontext()
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.enable_grad(), cast, \
                torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model.train()
            model(**batch)
    except _HeadReached:
        pass
    finally:
        model.train(training)
        for h in handles:
            h.remove()
    per_layer = [0] * len(layers)
    other = 0
    for size, layer in seen.values():
        if layer < 0:
            other += size
        else:
            per_layer[layer] += size
    return {"layers": per_layer, "inputs": inputs, "other": other, "blocks": [size for size, _ in seen.values()]}


class _HeadReached(Exception):
    """Raised by the vocabulary head's pre-hook: the probe's forward ends where the logits would be computed."""


def unique_tensors(model, parameters: bool | None):
    """Each parameter (True), buffer (False) or both (None) once, however often it is shared (tied embeddings)."""
    import itertools

    seen = set()
    groups = {True: [model.parameters()], False: [model.buffers()], None: [model.parameters(), model.buffers()]}
    for t in itertools.chain(*groups[parameters]):
        key = (t.device, t.untyped_storage().data_ptr(), t.storage_offset())
        if key not in seen:
            seen.add(key)
            yield t
