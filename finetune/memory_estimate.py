"""A run's peak memory, estimated before it trains, and the refusal of a run that would not fit.

    estimate = memory_estimate.check(cfg, model, features)   # FinetuneError (exit 2) when it would not fit
    metrics.update(estimate.figures())                      # memory_estimate_mb, beside peak_memory_mb

The estimate (`estimate()`: the model, the config's settings, the largest micro-batch of the data) adds up:
- weights: every parameter and buffer in its own dtype (a LoRA base loaded in bf16: 2 bytes a parameter);
- gradients and AdamW's two moments: of the trainable parameters only, in their dtype;
- activations: what autograd keeps for backward, counted on the model itself on two short probe batches
  (finetune/memory_probe.py), scaled to the largest micro-batch (micro-batch x the longest example); with gradient
  checkpointing, each layer's input plus one layer's activations;
- the loss: one chunk of the output layer's logits and their gradients (trainer.lm_loss_chunk_size), or all of them;
- on a CPU, the heap's slack: glibc keeps holes between what a step allocates and frees (with a frozen base, a part
  of the activations held in blocks the heap serves, below cpu.MMAP_FROM; and bytes a trained parameter not in
  bfloat16);
- what the process holds besides the model when it is measured (libraries, tokenizer, data): its memory now less the
  weights' resident bytes (on a GPU: torch's allocated bytes less the weights).
A step peaks at the end of the forward pass (activations, the loss, and the gradients when micro-batches accumulate)
or of the backward pass (every gradient); the optimizer states are held from the first update on, so a run within its
first epoch, whose longest micro-batch comes first (finetune/training_order.py), peaks there or at the largest one
after. Evaluation keeps no activations and one chunk of logits (docs/memory.md): below a training step.
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path

from finetune.cpu import MMAP_FROM, release_freed_memory
from finetune.errors import FinetuneError
from finetune.memory_probe import Activations, probe, unique_tensors

log = logging.getLogger(__name__)

MB, GB = 2**20, 2**30
# bytes of optimizer state a trained parameter's value keeps (finetune/optim.py; states in float32, also for a
# bfloat16 weight); adafactor keeps a row and a column a matrix (_optimizer_bytes)
STATE_BYTES = {"adamw": 8, "adamw_fused": 8, "adamw_8bit": 2, "sgd": 4}
# a CPU run's peak resident memory exceeds its live bytes: glibc's heap keeps holes between the blocks a step allocates
# and frees: with a frozen base (LoRA, whose backward pass allocates no weight gradients to fill them) this many times
# the activations held in blocks below cpu.MMAP_FROM (larger ones are mapped, and unmapped when freed), plus these
# bytes a trained parameter not in bfloat16 (its gradient and update blocks), fitted on the bench rows
# (docs/benchmarks.md#memory-estimate). A GPU's max_memory_allocated counts live bytes only.
HEAP_SLACK_FROZEN, HEAP_SLACK_PER_PARAMETER = 1.2, 1.9
# a column a task's tokenized data may have: the tokens of each example its loss scores, where they are not `labels`
# (preference pairs: both answers, not the prompt); the loss's logits are sized by them
SCORED = "scored"


@dataclass(frozen=True)
class Settings:
    """The config's settings the estimate depends on."""

    micro_batch: int
    accumulation: int = 1
    checkpointing: bool = False
    loss_chunk: int = 512  # tokens a chunk of a vocabulary head's loss; 0: the whole logits
    autocast: str | None = None  # the dtype activations are computed in under mixed precision (GPU), else None
    shards: int = 1  # processes a sharded model (FSDP, DeepSpeed ZeRO-3) is split over
    optim: str = "adamw"  # trainer.optim
    in_backward: bool = False  # trainer.optimizer_in_backward: each gradient is freed as its weight steps
    # the training order (finetune/training_order.py): which micro-batch comes first, and which follow it
    seed: int = 42
    grouped: bool = True  # trainer.group_by_length
    max_steps: int = -1
    epochs: float = 1.0

    @classmethod
    def from_config(cls, cfg) -> Settings:
        import torch

        t = cfg.trainer
        autocast = None
        if torch.cuda.is_available() and t.mixed_precision != "no":
            bf16 = t.mixed_precision == "bf16" or (t.mixed_precision == "auto" and torch.cuda.is_bf16_supported())
            autocast = "bfloat16" if bf16 else "float16" if t.mixed_precision == "fp16" else None
        sharded = t.fsdp or os.environ.get("ACCELERATE_USE_FSDP") == "true" or \
            os.environ.get("ACCELERATE_USE_DEEPSPEED") == "true"
        return cls(micro_batch=t.per_device_train_batch_size, accumulation=t.gradient_accumulation_steps,
                   checkpointing=t.gradient_checkpointing, loss_chunk=t.lm_loss_chunk_size, autocast=autocast,
                   shards=int(os.environ.get("WORLD_SIZE", "1")) if sharded else 1, optim=t.optim,
                   in_backward=t.optimizer_in_backward, seed=cfg.seed, grouped=t.group_by_length,
                   max_steps=t.max_steps, epochs=t.num_train_epochs)


@dataclass(frozen=True)
class Batch:
    """A micro-batch of the training data: its rows and padded length."""

    rows: int
    tokens: int  # its length, padded
    padded: bool = False  # its rows differ in length: the model gets an attention mask
    labelled: int | None = None  # its tokens with a label (part of each example: a prompt has none); None: all

    @classmethod
    def of(cls, train, micro_batch: int) -> Batch:
        """The micro-batch of the longest examples of a tokenized split (a `length` column): length grouping puts
        them together, and without it a batch may hold them."""
        import numpy as np

        return cls.made(train, np.argsort(-np.asarray(train["length"]), kind="stable")[:micro_batch].tolist())

    @classmethod
    def made(cls, train, rows: list[int]) -> Batch:
        """The micro-batch of these examples (and of `labels`, when the loss covers part of each example)."""
        picked = {"length": [train["length"][i] for i in rows]} if isinstance(train, dict) else train.select(rows)
        lengths, columns = picked["length"] or [1], getattr(picked, "column_names", ())
        labelled = None
        if SCORED in columns:
            labelled = sum(picked[SCORED])
        elif "labels" in columns:
            labels = picked["labels"]
            if all(isinstance(x, list) for x in labels):  # per token (a classifier's are one per example)
                labelled = sum(sum(1 for t in x if t != -100) for x in labels)
        return cls(rows=len(lengths), tokens=int(max(lengths)), padded=min(lengths) != max(lengths), labelled=labelled)

    @classmethod
    def phases(cls, train, settings: Settings) -> tuple[Batch, Batch | None]:
        """(the first micro-batch the run trains, the largest one after it). A run within its first epoch, in one
        process, trains the order finetune/training_order.py replays, the longest examples first (grouped by length),
        before the optimizer holds any state; otherwise (None) any step may hold the longest examples."""
        import numpy as np

        from finetune.training_order import first_epoch

        order = first_epoch(train, settings.micro_batch, settings.accumulation, settings.seed, settings.grouped,
                            settings.max_steps, settings.epochs)
        if not order:
            return cls.of(train, settings.micro_batch), None
        lengths = np.asarray(train["length"])
        later = max(order[1:], key=lambda rows: (len(rows) * lengths[rows].max(), lengths[rows].max()), default=None)
        return cls.made(train, order[0]), cls(0, 0) if later is None else cls.made(train, later)


@dataclass
class Estimate:
    """Bytes of each part of the peak; `total` is what the process is expected to reach."""

    weights: float
    gradients: float
    optimizer: float
    activations: float
    loss: float
    overhead: float
    step: float  # the training step's own peak above weights + optimizer states: activations + loss, or gradients
    slack: float = 0.0  # the heap's room beyond its live bytes (HEAP_SLACK_FROZEN, HEAP_SLACK_PER_PARAMETER)
    tokens: tuple[int, int] = (0, 0)  # the micro-batch it was sized for: rows x tokens
    first: bool = False  # it peaks at the first micro-batch, before the optimizer holds states (optimizer: 0)
    available: float | None = None  # what the process may use (set by measure() and check())
    settings: Settings | None = None
    train: object = field(default=None, repr=False)  # the training split it was sized for

    @property
    def total(self) -> float:
        return self.overhead + self.weights + self.optimizer + self.step + self.slack

    def figures(self) -> dict:
        """metrics.json's entries: the estimate beside the measured peak_memory_mb, its parts, what was available."""
        return {"memory_estimate_mb": round(self.total / MB, 1),
                "memory_estimate_parts_mb": {k: round(v / MB, 1) for k, v in self.breakdown().items()},
                "memory_available_mb": None if self.available is None else round(self.available / MB, 1)}

    def breakdown(self) -> dict[str, float]:
        return {"weights": self.weights, "optimizer states": self.optimizer, "training step": self.step,
                "activations": self.activations, "loss": self.loss, "gradients": self.gradients,
                "heap slack": self.slack, "libraries and data": self.overhead}

    def describe(self) -> str:
        """The parts, in words: weights + optimizer states + the training step's peak + libraries and data = total."""
        inside = ", ".join(f"{name} {_gb(value)}" for name, value in (("activations", self.activations),
                                                                       ("loss", self.loss),
                                                                       ("gradients", self.gradients)) if value)
        slack = f", heap slack {_gb(self.slack)}" if self.slack else ""
        states = "no optimizer states yet at the first micro-batch" if self.first else \
            f"optimizer states {_gb(self.optimizer)}"
        return (f"weights {_gb(self.weights)}, {states}, a training step {_gb(self.step)} ({inside}){slack}, "
                f"libraries and data {_gb(self.overhead)}")


def estimate(model, settings: Settings, batch: Batch, overhead: float = 0.0,
             activations: Activations | None = None, heap: bool = True, later: Batch | None = None) -> Estimate:
    """The run's peak in bytes: the model (weights, and what training adds), its micro-batches, plus `overhead` (the
    process's memory besides the model). `batch`: the first micro-batch; `later`: the largest after it, which meets
    the optimizer's states (None: `batch` may come at any step). `activations`: a probe of this model already taken
    (see probe()); `heap`: the memory is a process's heap (a CPU run), which keeps room beyond its live bytes."""
    import torch

    if activations is None:
        activations = probe(model, padded=batch.padded, autocast=settings.autocast)
    trained = [p for p in unique_tensors(model, parameters=True) if p.requires_grad]
    weights = sum(p.nbytes for p in unique_tensors(model, parameters=None)) / settings.shards
    trainable = sum(p.nbytes for p in trained) / settings.shards
    optimizer = _optimizer_bytes(trained, settings.optim, cpu=heap) / settings.shards
    # stepped inside backward, a weight's gradient is freed as soon as it is complete: one is held at a time
    gradients = max((p.nbytes for p in trained), default=0) if settings.in_backward else trainable
    slack = HEAP_SLACK_FROZEN if heap and trainable < weights / 2 else 0.0
    # (a bfloat16 parameter steps in float32 buffers reused for every parameter, finetune/optim.py: no new blocks)
    new_blocks = sum(p.numel() for p in trained if p.dtype != torch.bfloat16)
    held_slack = HEAP_SLACK_PER_PARAMETER * new_blocks / settings.shards if heap else 0.0

    def step(b: Batch, accumulated: bool) -> Estimate:
        kept = activations.kept(b.rows, b.tokens, settings.checkpointing)
        recomputed = activations.recomputed(b.rows, b.tokens, settings.checkpointing)
        labelled = b.rows * b.tokens if b.labelled is None else b.labelled
        loss, held = _loss_bytes(model, labelled, settings.loss_chunk, settings.autocast)
        # the forward pass's end (its activations and the loss), the backward pass's start under checkpointing (the
        # top layer recomputed beside what the loss left for backward), or its end (every gradient; gradients grow
        # as activations are freed); the earlier micro-batches' gradients are held through each when they accumulate
        passes = max(kept + loss, kept + recomputed + held)
        peak = gradients + passes if accumulated else max(passes, gradients)
        return Estimate(weights, gradients, optimizer, kept + recomputed, loss, overhead, peak,
                        slack * activations.heaped(b.rows, b.tokens, MMAP_FROM) + held_slack, (b.rows, b.tokens))

    steady = step(later or batch, settings.accumulation > 1)
    if later is None or settings.in_backward:  # (stepped inside backward, states appear while activations are held)
        return steady
    # the first micro-batch: no optimizer state yet, nor gradients of earlier micro-batches
    first = replace(step(batch, False), optimizer=0.0, first=True)
    return max(first, steady, key=lambda e: e.total)


def _optimizer_bytes(trained, optim: str, cpu: bool = True) -> float:
    import torch

    low = [p.numel() for p in trained if p.dtype == torch.bfloat16]
    # a bfloat16 weight steps in float32 buffers (weight, gradient) the size of the largest, plus rounding noise
    buffers = 8 * max(low) + 4 * min(max(low), 1 << 22) if low else 0
    if optim == "adamw_8bit" and cpu and trained:  # bitsandbytes' CPU step: both moments, the gradient, the
        buffers += 20 * max(p.numel() for p in trained)  # denominator and its root in float32, a tensor at a time
    if optim == "adafactor":  # factored second moments: a row and a column of each matrix, a vector's own size;
        # its step computes in two float32 temporaries the size of the parameter it steps (transformers' Adafactor)
        buffers += 8 * max((p.numel() for p in trained), default=0)
        return float(buffers + sum(4 * (sum(p.shape[-2:]) if p.dim() >= 2 else p.numel()) for p in trained))
    return float(buffers + STATE_BYTES.get(optim, 8) * sum(p.numel() for p in trained))


def _loss_bytes(model, tokens: int, chunk: int, autocast: str | None) -> tuple[float, float]:
    """A vocabulary head's loss (0 for other heads: a classifier's is small): (its peak at the end of the forward pass,
    what it leaves for backward). Chunked: one chunk's logits, their float32 copy, log-softmax and its gradient, beside
    the head's gradients and its input's, which it computes there and hands to backward. The model's own loss: all
    the logits, their log-softmax and gradient (the head's gradients come in backward, with the others)."""
    import torch

    from finetune.adapters import base_model

    head = base_model(model).get_output_embeddings()
    if head is None or not isinstance(getattr(head, "weight", None), torch.Tensor):
        return 0.0, 0.0
    vocab, width = head.weight.shape
    dtype = getattr(torch, autocast) if autocast else head.weight.dtype
    per_logit = (dtype.itemsize + 4 if dtype.itemsize < 4 else 4) + 8  # logits (+ float32 copy), log-softmax, gradient
    if not chunk:
        return tokens * vocab * per_logit, tokens * vocab * per_logit
    held = sum(p.nbytes for p in head.parameters() if p.requires_grad) + tokens * width * dtype.itemsize
    return min(chunk, tokens) * vocab * per_logit + held, held


def resident_weights(model) -> float:
    """Bytes of the weights resident now: weights memory-mapped from a file (safetensors) count only as far as their
    pages are in memory (Linux: /proc/self/smaps), the others in full."""
    tensors = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in unique_tensors(model, None)
               if t.device.type == "cpu"}
    try:
        with open("/proc/self/smaps") as f:
            smaps = f.read().splitlines()
    except OSError:
        return float(sum(tensors.values()))
    total, mapping = 0.0, None
    mapped = set()
    for line in smaps:
        fields = line.split()
        if "-" in fields[0] and len(fields) >= 6 and fields[5].startswith("/"):  # a file-backed mapping
            start, end = (int(x, 16) for x in fields[0].split("-"))
            inside = [p for p in tensors if start <= p < end]
            mapping = inside or None
            mapped.update(inside)
        elif "-" in fields[0] and len(fields) >= 5 and ":" in fields[3]:
            mapping = None
        elif fields[0] == "Rss:" and mapping:
            total += int(fields[1]) * 1024
    return total + sum(size for p, size in tensors.items() if p not in mapped)


def _gb(value: float) -> str:
    return f"{value / GB:.2f} GB" if value >= GB else f"{value / MB:.0f} MB"


def check(cfg, model, features) -> Estimate | None:
    """Estimate this run's peak before it trains and refuse it, in one line naming what lowers it, when the memory
    available to this process (free RAM, or on a GPU machine the GPU's free memory, shared by this machine's
    processes) cannot hold it. Call it with the model built (adapters included) and the data tokenized, before the
    engine. None, with a warning, for a model the probe cannot run (nothing is checked then)."""
    try:
        found, activations = _measure(cfg, model, features)
    except Exception as e:  # an architecture the probe's plain batch does not fit: the run goes on, unchecked
        log.warning("memory check skipped: probing %s failed (%s: %s)", type(model).__name__, type(e).__name__,
                    " ".join(str(e).split())[:200])
        return None
    log.info("memory estimate: %s at the peak (%s); %s available", _gb(found.total), found.describe(),
             _gb(found.available))
    if found.total > found.available:
        raise FinetuneError(refusal(found, cfg, model, activations))
    return found


def measure(cfg, model, features) -> Estimate:
    """The estimate and the memory available, without refusing anything (the bench compares it with its peaks)."""
    return _measure(cfg, model, features)[0]


def _measure(cfg, model, features) -> tuple[Estimate, Activations]:
    settings = Settings.from_config(cfg)
    batch, later = Batch.phases(features["train"], settings)
    activations = probe(model, padded=batch.padded or bool(later and later.padded), autocast=settings.autocast)
    gpu = _gpu() is not None
    if not gpu:  # what the heap keeps freed (tokenizing the data) is reused by training: counted once, as the slack
        release_freed_memory()
    used, available = _usage_and_available()
    # what the process holds besides the model: on a GPU the engine has not moved the model there yet
    resident = _weights_on_gpu(model) if gpu else resident_weights(model)
    found = estimate(model, settings, batch, max(0.0, used - resident), activations, heap=not gpu, later=later)
    found.available, found.settings, found.train = used + available, settings, features["train"]
    return found, activations


def refusal(found: Estimate, cfg, model, activations: Activations) -> str:
    """The one line of a run that would not fit: the estimate, what is available, and the settings that lower it
    (with the estimate each gives where this model alone tells it)."""
    settings, gpu = found.settings, _gpu() is not None
    options = []
    def lower(changed: Settings) -> str:
        first, later = Batch.phases(found.train, changed)
        return _gb(estimate(model, changed, first, found.overhead, activations, not gpu, later).total)

    if settings.micro_batch > 1:
        half = replace(settings, micro_batch=settings.micro_batch // 2, accumulation=settings.accumulation * 2)
        options.append(f"trainer.per_device_train_batch_size={half.micro_batch} trainer.gradient_accumulation_steps="
                       f"{half.accumulation} ({lower(half)})")
    if not settings.checkpointing and activations.layers:
        options.append(f"trainer.gradient_checkpointing=true ({lower(replace(settings, checkpointing=True))})")
    if cfg.peft.method == "none":
        options.append("peft=lora (no gradients or optimizer states for the frozen weights)")
    if next(model.parameters()).dtype.itemsize > 2:
        options.append("a 16-bit base: peft=lora model.dtype=bfloat16")
    where = "GPU memory" if _gpu() is not None else "memory"
    return (f"this run needs an estimated {_gb(found.total)} of {where} at its peak ({found.describe()}) but "
            f"{_gb(found.available)} is available; lower it with {', '.join(options) or 'a smaller model'}, or skip "
            "this check with trainer.memory_check=false")


def _gpu() -> int | None:
    """The GPU this process trains on (the engines take one when there is one), or None."""
    import torch

    if not torch.cuda.is_available():
        return None
    return int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count()


def _weights_on_gpu(model) -> float:
    return float(sum(t.nbytes for t in unique_tensors(model, None) if t.device.type == "cuda"))


def _usage_and_available() -> tuple[float, float]:
    """(bytes this process uses now, bytes it may still take): on a GPU torch's allocated bytes and the device's free
    memory (and what torch holds unused), on a CPU the resident set size and the free RAM (within a cgroup's limit),
    shared by the processes of this machine on that device."""
    local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    device = _gpu()
    if device is not None:
        import torch

        free, _ = torch.cuda.mem_get_info(device)
        sharing = max(1, local // torch.cuda.device_count())
        allocated = torch.cuda.memory_allocated(device)
        return float(allocated), (free + torch.cuda.memory_reserved(device) - allocated) / sharing
    import psutil

    free = psutil.virtual_memory().available
    limit = _cgroup_room()
    return float(psutil.Process().memory_info().rss), (free if limit is None else min(free, limit)) / local


def _cgroup_room() -> float | None:
    """What the cgroup (v2) of this process may still take, when it has a limit."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        current = int(Path("/sys/fs/cgroup/memory.current").read_text())
    except (OSError, ValueError):
        return None
    return None if limit == "max" else max(0.0, float(int(limit) - current))
