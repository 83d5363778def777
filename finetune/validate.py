"""Every check of a run's settings that no schema type can express, in one place; each runs once.

    validate.config(cfg)            the composed config's values: before anything is written (the command line runs
                                    it before it creates the run directory; a sweep's trial before it runs)
    validate.training(cfg, model)   what needs the model and the launch: before the engine is made (run.py)

A failed check raises FinetuneError: one line naming the setting and the fix (the command line exits 2).
A task checks its own task.* and data.* values (Task.check_config); this module calls it.
"""

from __future__ import annotations

import difflib
import os

from finetune import memory, optim
from finetune.adapters import base_model
from finetune.decoding import generation_config
from finetune.engines import ENGINES, TRACKERS
from finetune.errors import FinetuneError
from finetune.loading import DROPOUT_KEYS
from finetune.tasks import registry, task_class

_PRECISIONS = ("auto", "no", "fp16", "bf16")
PEFT_METHODS = ("none", "lora")


def config(cfg) -> None:
    """The values of a composed config (no model, no data loaded)."""
    task = task_class(cfg.task.name)
    trainer(cfg.trainer)
    model(cfg)
    peft(cfg.peft)
    if cfg.trainer.label_smoothing and not task.vocabulary_loss:
        smoothed = ", ".join(name for name, cls in registry().items() if cls.vocabulary_loss)
        raise FinetuneError(f"trainer.label_smoothing smooths language-model losses (tasks {smoothed}); this "
                            f"task's ({cfg.task.name}) is not one: remove it")
    task.check_config(cfg.task, cfg.data)
    if "generation" in cfg.task:
        generation_config(cfg.task.generation)  # as transformers will take the settings when it generates
    hub(cfg.hub)
    card_names(cfg)


def trainer(t) -> None:
    """trainer.* values."""
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
    unknown = [name for name in t.report_to if name not in TRACKERS]
    if unknown:
        raise FinetuneError(f"unknown tracker {unknown[0]} in trainer.report_to: choose from {', '.join(TRACKERS)}, "
                            "or [] for none")
    scheduler(t.lr_scheduler_type)
    optim.check(t, int(os.environ.get("WORLD_SIZE", "1")))


def scheduler(name: str) -> None:
    from transformers.trainer_utils import SchedulerType

    names = [s.value for s in SchedulerType]
    if name not in names:
        close = difflib.get_close_matches(name, names, n=1)
        hint = f"did you mean {close[0]}? " if close else ""
        raise FinetuneError(f"unknown trainer.lr_scheduler_type '{name}': {hint}choose one of {', '.join(names)}")


def model(cfg) -> None:
    """model.* values (and the precisions they combine with)."""
    m = cfg.model
    if m.dtype not in memory.DTYPES:
        raise FinetuneError(f"model.dtype must be one of {', '.join(memory.DTYPES)} (got '{m.dtype}')")
    if m.dtype == "float16" and cfg.peft.method == "none" and cfg.trainer.mixed_precision == "fp16":
        raise FinetuneError("trainer.mixed_precision=fp16 scales float32 master weights' gradients: with full "
                            "fine-tuning use model.dtype=auto (float32), or trainer.mixed_precision=no for pure fp16")
    for name in DROPOUT_KEYS:
        p = getattr(m, name)
        if p is not None and not 0 <= p < 1:
            raise FinetuneError(f"model.{name} must be at least 0 and below 1 (got {p})")
    if bool(m.encoder) != bool(m.decoder):
        raise FinetuneError("a warm-started encoder-decoder needs both model.encoder=<checkpoint> and "
                            "model.decoder=<checkpoint> (e.g. model=bert2bert)")


def peft(p) -> None:
    if p.method not in PEFT_METHODS:
        raise FinetuneError(f"unknown peft.method '{p.method}': choose one of {', '.join(PEFT_METHODS)}")
    if p.method != "none" and (p.r < 1 or p.alpha <= 0 or not 0 <= p.dropout < 1):
        raise FinetuneError(f"peft.r must be >= 1, peft.alpha > 0 and 0 <= peft.dropout < 1 (got r={p.r}, "
                            f"alpha={p.alpha}, dropout={p.dropout})")


def hub(hub_cfg) -> None:
    """What would make a push fail whatever the training does (hub=push), checked before it starts."""
    if not hub_cfg.push:
        return
    from huggingface_hub import constants, get_token
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if not hub_cfg.repo_id:
        raise FinetuneError("hub=push needs a repository: set hub.repo_id=<namespace>/<name>")
    try:
        validate_repo_id(hub_cfg.repo_id)
    except HFValidationError as e:
        raise FinetuneError(f"hub.repo_id '{hub_cfg.repo_id}' is not a valid Hub repository id ({e}); "
                            "use <namespace>/<name> with letters, digits, '-', '_' and '.'") from e
    if "/" not in hub_cfg.repo_id:
        raise FinetuneError(f"hub.repo_id '{hub_cfg.repo_id}' has no namespace; use <your user or org>/"
                            f"{hub_cfg.repo_id}")
    if hub_cfg.dry_run:
        return
    if constants.HF_HUB_OFFLINE:
        raise FinetuneError("HF_HUB_OFFLINE is set, so nothing can be pushed: unset it, or run without hub=push and "
                            "push the finished run later with python -m finetune.push <run dir> --repo-id ...")
    if get_token() is None:
        raise FinetuneError("pushing to the Hub needs a token: set HF_TOKEN or run `hf auth login` (a token with "
                            "write access), or add hub.dry_run=true to only list what would be pushed")


def card_names(cfg) -> None:
    """data.dataset_name and model.base_model go on the model card as Hub ids: a bad one fails now, not at export."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    for key, value in (("data.dataset_name", cfg.data.dataset_name), ("model.base_model", cfg.model.base_model)):
        try:
            if value:
                validate_repo_id(str(value))
        except HFValidationError as e:
            raise FinetuneError(f"{key}='{value}' is not a Hub id, which the model card needs ({e}); use a name "
                                "of letters, digits, '-', '_' and '.' (or <owner>/<name>), or leave it unset") from e


def training(cfg, built_model) -> None:
    """What needs the model and the launch's processes, before the engine is made."""
    base = base_model(built_model)
    if cfg.trainer.gradient_checkpointing and not getattr(base, "supports_gradient_checkpointing", False):
        raise FinetuneError(f"trainer.gradient_checkpointing=true: {type(base).__name__} does not support gradient "
                            "checkpointing; set trainer.gradient_checkpointing=false")
    fsdp(cfg.trainer)
    if cfg.trainer.mixed_precision in ("fp16", "bf16"):
        import torch

        if not torch.cuda.is_available():
            raise FinetuneError(f"trainer.mixed_precision={cfg.trainer.mixed_precision} needs a GPU; use auto or no "
                                "on CPU")


def fsdp(t) -> None:
    """accelerate shards with FSDP only on GPUs; trainer.fsdp=true is finetune's FSDP2 for CPU processes."""
    from accelerate import PartialState
    from accelerate.utils import DistributedType

    kind = PartialState().distributed_type
    if kind == DistributedType.DEEPSPEED and t.engine == "accelerate" and t.gradient_accumulation_steps > 1:
        raise FinetuneError("trainer=accelerate accumulates gradients itself, which DeepSpeed's engine does not take; "
                            "use trainer=hf (the Trainer sets DeepSpeed's accumulation up) or "
                            "trainer.gradient_accumulation_steps=1")
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
