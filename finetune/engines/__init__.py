"""Training engines. Each takes the same task objects (model, features, collator, metrics) and knows
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

Evaluation runs each split longest example first (see eval_order), in inference mode, and every evaluation
scores the split's predictions (put back in dataset order) with task.compute_metrics and adds task.evaluate_model(model,
split) (metrics of the model itself, e.g. of text it generates), so the main metric can be either kind.

Both engines write checkpoints to <output_dir>/checkpoints/checkpoint-<step>/, with `trainer_state.json`
written last, and train on the same seeded-per-epoch sampler, so a resumed run replays the data order.
Both report the same scalars to the trackers of trainer.report_to, under the names the Trainer's callbacks use:
TensorBoard event files in <output_dir>/tensorboard/ (train/loss, train/learning_rate, train/grad_norm,
train/samples_per_second, train/epoch, eval/loss, eval/<metric>, ...), MLflow runs in the experiment
"finetune" (loss, learning_rate, ..., eval_<metric>).
"""

from __future__ import annotations

import difflib
import json
import logging
import os
from importlib import import_module
from pathlib import Path
from typing import Any, Callable

from finetune.cpu import release_freed_memory
from finetune.errors import FinetuneError

log = logging.getLogger("finetune.train")

ENGINES = {"hf": "finetune.engines.hf:HFEngine", "accelerate": "finetune.engines.accelerate:AccelerateEngine"}
CHECKPOINTS = "checkpoints"
STATE_FILE = "trainer_state.json"  # the last file of a checkpoint: without it (or cut short) a checkpoint is incomplete
_PRECISIONS = ("auto", "no", "fp16", "bf16")
TENSORBOARD = "tensorboard"  # event files of the run, beside model/
TRACKERS = ("tensorboard", "mlflow")


def make_engine(cfg, task, model, tokenizer, features, output_dir, on_evaluate: Callable[[float], None] | None = None):
    from finetune.checks import check_task

    check_trainer_config(cfg.trainer)
    check_task(cfg)
    _check_scheduler(cfg.trainer.lr_scheduler_type)
    check_fsdp(cfg.trainer)
    check_checkpointing(cfg.trainer, model)
    if task.label_shift is not None and cfg.trainer.lm_loss_chunk_size:  # a head over a vocabulary
        from finetune import lm_loss

        lm_loss.attach(model, task.label_shift, cfg.trainer.lm_loss_chunk_size, cfg.trainer.label_smoothing)
    module, _, cls = ENGINES[cfg.trainer.engine].partition(":")
    return getattr(import_module(module), cls)(cfg, task, model, tokenizer, features, Path(output_dir), on_evaluate)


def check_trainer_config(t) -> None:
    """The trainer values no schema type can check; the CLI runs this before anything is written."""
    if t.engine not in ENGINES:
        raise FinetuneError(f"unknown trainer.engine '{t.engine}': choose one of {', '.join(sorted(ENGINES))}")
    for key in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps",
                "logging_steps", "save_total_limit"):
        if getattr(t, key) < 1:
            raise FinetuneError(f"trainer.{key} must be at least 1 (got {getattr(t, key)})")
    if not t.new_parameters_lr_scale > 0:
        raise FinetuneError(f"trainer.new_parameters_lr_scale must be above 0 (got {t.new_parameters_lr_scale}): the "
                            "learning rate of newly initialized parameters is this times trainer.learning_rate")
    if not 0 <= t.label_smoothing < 1:
        raise FinetuneError(f"trainer.label_smoothing must be at least 0 and below 1 (got {t.label_smoothing}); 0.1 "
                            "is usual")
    if not t.learning_rate >= 0:  # (0 is allowed: it evaluates the base model through the whole loop)
        raise FinetuneError(f"trainer.learning_rate must be at least 0 (got {t.learning_rate})")
    if t.max_steps == 0 or t.max_steps < -1:
        raise FinetuneError(f"trainer.max_steps must be a positive number of optimizer steps, or -1 to train "
                            f"trainer.num_train_epochs epochs (got {t.max_steps})")
    if t.max_steps == -1 and not t.num_train_epochs > 0:
        raise FinetuneError(f"trainer.num_train_epochs must be above 0 (got {t.num_train_epochs}): it is the number "
                            "of passes over the training data (or set trainer.max_steps=<steps>)")
    if not 0 <= t.warmup_ratio < 1:
        raise FinetuneError(f"trainer.warmup_ratio must be at least 0 and below 1 (got {t.warmup_ratio}): the "
                            "fraction of the training steps that warm the learning rate up")
    for key in ("weight_decay", "max_grad_norm", "dataloader_num_workers"):
        if getattr(t, key) < 0:
            raise FinetuneError(f"trainer.{key} must be at least 0 (got {getattr(t, key)})")
    if t.eval_strategy not in ("epoch", "steps", "no"):
        raise FinetuneError(f"trainer.eval_strategy must be epoch, steps or no (got '{t.eval_strategy}')")
    if t.eval_strategy == "steps" and not (t.eval_steps and t.eval_steps > 0):
        raise FinetuneError("trainer.eval_strategy=steps needs trainer.eval_steps=<positive number of steps>")
    if (t.early_stopping_patience or 0) < 0 or t.early_stopping_threshold < 0:
        raise FinetuneError("trainer.early_stopping_patience and trainer.early_stopping_threshold must be >= 0")
    if t.early_stopping_patience and t.eval_strategy == "no":
        raise FinetuneError("trainer.early_stopping_patience counts evaluations: it needs trainer.eval_strategy=epoch "
                            "or steps (not no)")
    if t.lm_loss_chunk_size < 0:
        raise FinetuneError(f"trainer.lm_loss_chunk_size must be a number of tokens, or 0 for the model's own loss "
                            f"(got {t.lm_loss_chunk_size})")
    if t.mixed_precision not in _PRECISIONS:
        raise FinetuneError(f"trainer.mixed_precision must be {', '.join(_PRECISIONS[:-1])} or {_PRECISIONS[-1]} "
                            f"(got '{t.mixed_precision}')")


CHECKPOINTING = {"use_reentrant": False}  # torch.utils.checkpoint's arguments for trainer.gradient_checkpointing


def check_checkpointing(t, model) -> None:
    """trainer.gradient_checkpointing=true needs a model whose blocks can recompute their activations."""
    from finetune.adapters import base_model

    base = base_model(model)
    if t.gradient_checkpointing and not getattr(base, "supports_gradient_checkpointing", False):
        raise FinetuneError(f"trainer.gradient_checkpointing=true: {type(base).__name__} does not support gradient "
                            "checkpointing; set trainer.gradient_checkpointing=false")


def _check_scheduler(name: str) -> None:
    from transformers.trainer_utils import SchedulerType  # (imports torch: checked when the engine is made)

    names = [s.value for s in SchedulerType]
    if name not in names:
        close = difflib.get_close_matches(name, names, n=1)
        hint = f"did you mean {close[0]}? " if close else ""
        raise FinetuneError(f"unknown trainer.lr_scheduler_type '{name}': {hint}choose one of {', '.join(names)}")


def check_fsdp(t) -> None:
    """accelerate shards with FSDP only on GPUs; trainer.fsdp=true is finetune's FSDP2 for CPU processes."""
    from accelerate import PartialState
    from accelerate.utils import DistributedType

    kind = PartialState().distributed_type
    on_cpus = kind == DistributedType.MULTI_CPU
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true" and on_cpus and not t.fsdp:
        raise FinetuneError("accelerate applies an FSDP config on GPUs only and would train this CPU launch unsharded; "
                            "add trainer=accelerate trainer.fsdp=true to shard over the CPU processes with FSDP2")
    if not t.fsdp:
        return
    if t.engine != "accelerate":
        raise FinetuneError("trainer.fsdp=true (FSDP2 over CPU processes) needs trainer=accelerate")
    if kind == DistributedType.NO:
        raise FinetuneError("trainer.fsdp=true shards over several CPU processes, but this is a single process: "
                            "launch several (torchrun --nproc_per_node 2 -m finetune ...)")
    if not on_cpus:
        raise FinetuneError("trainer.fsdp=true shards CPU processes; on GPUs launch with accelerate's FSDP config "
                            "instead (accelerate launch --config_file configs/accelerate/fsdp.yaml ...) without it")


def smoothed_by_task(model, t) -> float:
    """The trainer.label_smoothing an engine applies through task.loss: none when the chunked LM loss the model was
    given (finetune/lm_loss.py) smooths it inside the forward already."""
    from finetune.adapters import base_model

    return 0.0 if getattr(base_model(model).forward, "_chunked_lm_loss", False) else t.label_smoothing


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
    from finetune import adapters

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


def setup_tracking(cfg) -> None:
    """Check trainer.report_to; for MLflow, a local store (<runs_dir>/mlflow.db) unless MLFLOW_TRACKING_URI names one,
    and the experiment "finetune" (or MLFLOW_EXPERIMENT_NAME) for both engines' runs."""
    import os

    unknown = [name for name in cfg.trainer.report_to if name not in TRACKERS]
    if unknown:
        raise FinetuneError(f"unknown tracker {unknown[0]} in trainer.report_to: choose from {', '.join(TRACKERS)}, "
                            "or [] for none")
    if "mlflow" not in cfg.trainer.report_to:
        return
    try:
        import mlflow
    except ImportError as e:
        raise FinetuneError("trainer.report_to=[mlflow] needs MLflow: pip install 'finetune[mlflow]' (or drop "
                            "mlflow from trainer.report_to)") from e
    runs = Path(cfg.runs_dir).resolve()
    if not os.environ.get("MLFLOW_TRACKING_URI"):
        runs.mkdir(parents=True, exist_ok=True)
        mlflow.set_tracking_uri(f"sqlite:///{runs / 'mlflow.db'}")
    name = os.environ.get("MLFLOW_EXPERIMENT_NAME", "finetune")
    if mlflow.get_experiment_by_name(name) is None:
        mlflow.create_experiment(name, artifact_location=(runs / "mlartifacts").as_uri())
    mlflow.set_experiment(name)


def accelerate_trackers(report_to, output_dir: Path) -> list:
    """accelerate's trackers writing where the Trainer's do (TensorBoard: <output_dir>/tensorboard)."""
    from accelerate.tracking import MLflowTracker, TensorBoardTracker

    made = {"tensorboard": lambda: TensorBoardTracker(TENSORBOARD, str(output_dir)),
            "mlflow": lambda: MLflowTracker("finetune", str(output_dir), run_name=output_dir.name)}
    return [made[name]() for name in report_to]


def last_checkpoint(output_dir: Path) -> Path | None:
    """The newest complete checkpoint under output_dir/checkpoints (a run killed while saving leaves a partial one:
    the Trainer writes its state file last, in place, so a kill can leave it missing, empty or cut short)."""
    from transformers.trainer_utils import sort_checkpoints

    folder = Path(output_dir) / CHECKPOINTS
    if not folder.is_dir():
        return None
    complete = [Path(p) for p in sort_checkpoints(str(folder)) if _state_is_whole(Path(p) / STATE_FILE)]
    return complete[-1] if complete else None


def _state_is_whole(path: Path) -> bool:
    try:
        return isinstance(json.loads(path.read_text()), dict)
    except (OSError, ValueError):
        return False


def without_length(collator: Callable) -> Callable:
    """The `length` column feeds the length-grouped sampler only; the model must not see it."""

    def collate(features: list[dict[str, Any]]) -> Any:
        return collator([{k: v for k, v in f.items() if k != "length"} for f in features])

    return collate


def eval_order(dataset):
    """A split in evaluation order -- longest first, so each batch pads to lengths alike and memory peaks at the
    first batch -- and the permutation that puts its predictions back in dataset order (None: kept as it was)."""
    import numpy as np

    if "length" not in dataset.column_names:
        return dataset, None
    order = np.argsort(-np.asarray(dataset["length"]), kind="stable")
    return dataset.select(order), np.argsort(order)


def restore_order(pred, inverse):
    """An EvalPrediction of a split evaluated in eval_order, in the split's own order (what the metrics expect)."""
    from transformers import EvalPrediction

    if inverse is None:
        return pred

    def put(x):
        return None if x is None else type(x)(put(a) for a in x) if isinstance(x, (tuple, list)) else x[inverse]

    return EvalPrediction(predictions=put(pred.predictions), label_ids=put(pred.label_ids))


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


def train_sampler(train_features, batch_size: int, seed: int, group_by_length: bool):
    """The training order of both engines: drawn from seed + epoch, so a resumed run replays it exactly."""
    import torch
    from transformers.trainer_pt_utils import LengthGroupedSampler

    class EpochSeededSampler(LengthGroupedSampler):
        # transformers' sampler draws from the global RNG, whose state at an epoch's start a resumed run cannot know
        def __init__(self):
            super().__init__(batch_size, lengths=list(train_features["length"]), generator=torch.Generator())
            self.set_epoch(0)

        def set_epoch(self, epoch: int) -> None:
            self.generator.manual_seed(seed + epoch)

        def __iter__(self):
            if group_by_length:
                return super().__iter__()
            return iter(torch.randperm(len(self.lengths), generator=self.generator).tolist())

    return EpochSeededSampler()


def mixed_precision(setting: str) -> str:
    """'auto' -> bf16 on a GPU that supports it, else fp32 (fp16/bf16 on CPU is slow or unsupported)."""
    import torch

    if setting == "auto":
        return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
    if setting != "no" and not torch.cuda.is_available():
        raise FinetuneError(f"trainer.mixed_precision={setting} needs a GPU; use auto or no on CPU")
    return setting
