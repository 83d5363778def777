"""Training engines. Each takes the same task objects (model, features, collator, objective, metrics) and knows
nothing about which task it trains.

    engine = make_engine(cfg, task, model, tokenizer, features, output_dir, on_evaluate=None)
    engine.train(resume_from=None) -> train metrics;  engine.evaluate("test") -> {"test_<metric>": ..., "test_loss": ...}
    engine.model (best checkpoint restored), engine.log_history (Trainer-style list of dicts),
    engine.best_validation(): the validation metrics ("validation_*") of the evaluation that chose engine.model,
        from the log history (None when the model it holds was never evaluated): no second pass over validation
    engine.step_times (seconds of each optimizer step: forward, backward, update; for benchmarks)
    engine.full_state_dict(): a model sharded over the processes (FSDP, DeepSpeed) gathered whole on the main
        process (a collective: every process calls it); None when each process holds the whole model
    on_evaluate(value): called with the main metric of each validation evaluation during training (a sweep's pruner
        listens there); an exception it raises stops the training and leaves engine.train()

The loss of every batch, in training and evaluation, is task.loss(model, batch, num_items) (the task owns its
objective). How a step's loss is normalised is said once, here, for both engines (step_items, process_scale): the
micro-batches of a step add up their items' losses and divide by the items of the whole step on every process, so
gradient accumulation and several processes train on the same mean as one large batch would.

Evaluation runs each split longest first (batches.eval_order), in inference mode, and every evaluation scores the
split's predictions (put back in dataset order) with task.compute_metrics and adds task.evaluate_model(model, split)
(metrics of the model itself, e.g. of text it generates), so the main metric can be either kind.

Both engines write checkpoints to <output_dir>/checkpoints/checkpoint-<step>/, with `trainer_state.json` written last,
and train on the same seeded-per-epoch sampler, so a resumed run replays the data order. Both report the same scalars
to the trackers of trainer.report_to (finetune/engines/tracking.py).
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
from importlib import import_module
from pathlib import Path
from typing import Any, Callable

from finetune import adapters, disk
from finetune.cpu import release_freed_memory
from finetune.engines.tracking import TENSORBOARD, TRACKERS  # noqa: F401  (the engines' names, for their users)

log = logging.getLogger("finetune.train")

ENGINES = {"hf": "finetune.engines.hf:HFEngine", "accelerate": "finetune.engines.accelerate:AccelerateEngine"}
CHECKPOINTS = "checkpoints"
STATE_FILE = "trainer_state.json"  # the last file of a checkpoint: without it (or cut short) a checkpoint is incomplete
CHECKPOINTING = {"use_reentrant": False}  # torch.utils.checkpoint's arguments for trainer.gradient_checkpointing


def make_engine(cfg, task, model, tokenizer, features, output_dir, on_evaluate: Callable[[float], None] | None = None):
    """The engine of trainer.engine, its task's objective set up on `model` (finetune/validate.py checked both)."""
    features = task.prepare_training(model, cfg.trainer, features)
    module, _, cls = ENGINES[cfg.trainer.engine].partition(":")
    return getattr(import_module(module), cls)(cfg, task, model, tokenizer, features, Path(output_dir), on_evaluate)


# --- a step's loss: the same normalisation in both engines -------------------------------------------------
def step_items(task, batches: list[dict], accelerator) -> Any:
    """The items a step's loss averages over: task.items of each of its micro-batches, summed over every process."""
    import torch

    items = sum(torch.as_tensor(task.items(batch)) for batch in batches).to(accelerator.device)
    return accelerator.gather(items).sum() if accelerator.num_processes > 1 else items


def step_size(batches: list[dict]) -> int:
    """A step's size for the heap (cpu.StepHeap): its largest micro-batch's largest tensor (rows x padded length)."""
    return max((v.numel() for batch in batches for v in batch.values() if hasattr(v, "numel")), default=0)


def process_scale(loss, processes: int):
    """A micro-batch's share of the step's loss for its process: DDP, FSDP and DeepSpeed average the processes'
    gradients, and the loss already divides by the items of every process (step_items)."""
    return loss * processes if processes > 1 else loss


class TrainLogs:
    """The scalars a task's loss reports beside it (outputs["metrics"]: batch means, e.g. a preference task's
    rewards), averaged over the steps since the last training log line."""

    def __init__(self):
        self.sums: dict[str, Any] = {}
        self.count = 0

    def add(self, outputs) -> None:
        metrics = outputs.get("metrics") if isinstance(outputs, dict) else None
        if metrics:
            for key, value in metrics.items():
                self.sums[key] = self.sums.get(key, 0.0) + value.detach().float()
            self.count += 1

    def pop(self, accelerator) -> dict[str, float]:
        """The means so far, over every process (a collective when there are several), and start again."""
        if not self.count:
            return {}
        import torch

        keys = sorted(self.sums)
        values = torch.stack([self.sums[k] for k in keys]).to(accelerator.device) / self.count
        if accelerator.num_processes > 1:
            values = accelerator.reduce(values, "mean")
        self.sums, self.count = {}, 0
        return {k: float(v) for k, v in zip(keys, values.tolist())}


def eval_keys(model) -> list[str]:
    """The outputs evaluation does not keep as predictions: the loss, the model's cache, a task's logged scalars."""
    config = getattr(adapters.base_model(model), "config", None)
    return [*getattr(config, "keys_to_ignore_at_inference", ["cache"]), "loss", "metrics"]  # (the Trainer's default)


def eval_step(task, model, batch: dict, ignore: list[str], label_names: list[str]) -> tuple[Any, Any, Any]:
    """One evaluated batch, as both engines score it: (its mean loss, its outputs but `ignore` -- bare when one
    tensor, else a tuple, as task.preprocess_logits takes them --, its labels -- the same way; None when it has none)."""
    import torch

    with torch.inference_mode():
        loss, outputs = task.loss(model, batch, task.items(batch))
    kept = bare(tuple(v for k, v in outputs.items() if k not in ignore))
    labels = tuple(batch[k] for k in label_names) if all(batch.get(k) is not None for k in label_names) else None
    return loss.detach(), kept, bare(labels) if labels else None


def bare(outputs):
    """A single output is passed bare, several as a tuple: what the Trainer gives compute_metrics."""
    return outputs[0] if isinstance(outputs, tuple) and len(outputs) == 1 else outputs


def param_groups(model, decay: set[str], weight_decay: float, new: set[str], new_lr: float) -> list[dict]:
    """AdamW's parameter groups, as the Trainer makes them (weight decay on `decay` only), with the parameters that
    from_pretrained initialized (`new`) in groups of their own at `new_lr`: the schedule scales every group alike."""
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = []
    for fresh in (False, True):
        for decayed in (True, False):
            chosen = [p for n, p in params if (n in decay) == decayed and (n in new) == fresh]
            if chosen or not fresh:
                group = {"params": chosen, "weight_decay": weight_decay if decayed else 0.0}
                groups.append({**group, "lr": new_lr} if fresh else group)
    return groups


def new_parameters(model, t) -> tuple[set[str], float]:
    """The parameters trainer.new_parameters_lr_scale applies to, and their learning rate (none when it is 1)."""
    scale = t.new_parameters_lr_scale
    new = adapters.new_parameters(model) if scale != 1 else set()
    if new:
        modules = sorted({n.rsplit(".", 1)[0] for n in new})
        log.info("%d newly initialized parameter tensors train at %g x the learning rate (%d modules, e.g. %s)",
                 len(new), scale, len(modules), ", ".join(modules[:3]))
    elif scale != 1:
        log.warning("trainer.new_parameters_lr_scale=%g: this model has no newly initialized parameters; every "
                    "parameter trains at trainer.learning_rate", scale)
    return new, t.learning_rate * scale


def drop_training_state(optimizer, model) -> None:
    """Training is over: free the optimizer's states (AdamW: twice the trainable weights) and any gradients, and give
    the memory back to the kernel, so the test evaluation, generation, export and pipeline check do not add to it."""
    optimizer.state.clear()
    model.zero_grad(set_to_none=True)
    release_freed_memory()


def gathered_state_dict(accelerator, model) -> dict | None:
    """The whole state dict of a model accelerate sharded (FSDP, DeepSpeed; needs every process), else None."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        return accelerator.get_state_dict(model)  # DeepSpeed ZeRO-3: needs stage3_gather_16bit_weights_on_model_save
    return None


def last_checkpoint(output_dir: Path) -> Path | None:
    """The newest complete checkpoint under output_dir/checkpoints. A run killed while saving leaves a partial one
    (the Trainer writes its state file last, in place, so a kill can leave it missing, empty or cut short); a weights
    or optimizer file cut short (a full disk, a copy stopped midway) makes one incomplete too: skipped, with a warning
    naming it, for the one before."""
    from transformers.trainer_utils import sort_checkpoints

    folder = Path(output_dir) / CHECKPOINTS
    if not folder.is_dir():
        return None
    for path in map(Path, reversed(sort_checkpoints(str(folder)))):
        if not _state_is_whole(path / STATE_FILE):
            continue
        if broken := next((f for f in sorted(path.iterdir()) if not _file_is_whole(f)), None):
            log.warning("skipping %s: %s is cut short or corrupt", path, broken.name)
            continue
        return path
    return None


@contextlib.contextmanager
def checkpoint_write(directory: Path, model, optimizer):
    """A checkpoint written into `directory`: a write that fails for want of space (a full disk, a quota) or of
    permission removes what it had written, leaves the earlier checkpoints as they are, and becomes one line naming
    the path and about how many bytes a checkpoint takes (the weights and the optimizer's states)."""
    try:
        yield
    except Exception as e:
        tensors = [*model.parameters(), *(t for state in optimizer.state.values() for t in state.values()
                                          if hasattr(t, "element_size"))]
        size = sum(t.numel() * t.element_size() for t in tensors)
        free = disk.free_bytes(directory)
        # torch.save's C++ stream reports a full disk as a RuntimeError ("iostream error"): the free space tells
        full = not disk.is_write_fault(e) and free is not None and free < size
        if not (disk.is_write_fault(e) or full):
            raise
        shutil.rmtree(directory, ignore_errors=True)
        shown = directory.with_name(directory.name.removeprefix(".tmp-"))  # (trainer=accelerate writes a temp dir)
        raise disk.write_error(e, shown, size, "the checkpoint", "free that much there, or lower "
                               "trainer.save_total_limit; the earlier checkpoints are kept", full=full or None) from e


def _state_is_whole(path: Path) -> bool:
    try:
        return isinstance(json.loads(path.read_text()), dict)
    except (OSError, ValueError):
        return False


def _file_is_whole(path: Path) -> bool:
    """Whether a checkpoint's file ends where its format says: a safetensors file at its header's last tensor, a
    torch.save file (a zip) at its central directory. Other files, and directories, are not checked."""
    import struct
    import zipfile

    if path.suffix == ".safetensors":
        try:
            with open(path, "rb") as f:
                (length,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(length))
            end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
            return path.stat().st_size == 8 + length + end
        except (OSError, ValueError, struct.error, KeyError, TypeError):
            return False
    if path.suffix in (".bin", ".pt", ".pth", ".pkl"):
        return zipfile.is_zipfile(path)
    return True


def own_precision(model):
    """The model without the mixed-precision (autocast) forward that accelerate gave it for training, in place:
    what must match the exported model (e.g. the greedy outputs the pipeline must reproduce) runs as the export does."""
    from accelerate.utils import extract_model_from_parallel

    return extract_model_from_parallel(model, keep_fp32_wrapper=False)


def logged_validation(log_history: list[dict], step: int | None) -> dict[str, float] | None:
    """The validation metrics logged at `step` (the evaluations during training are logged as eval_*)."""
    for entry in log_history:
        if step is not None and entry.get("step") == step and any(k.startswith("eval_") for k in entry):
            return {**{f"validation_{k[5:]}": v for k, v in entry.items() if k.startswith("eval_")},
                    "epoch": entry["epoch"]}
    return None


def mixed_precision(setting: str) -> str:
    """'auto' -> bf16 on a GPU that supports it, else fp32 (fp16/bf16 on CPU is slow or unsupported)."""
    import torch

    if setting == "auto":
        return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
    return setting
