"""Typed schema of the Hydra config tree (configs/): the groups every run has. Each task's own schema (its task.* keys
and the data columns it reads) is a dataclass in its module, finetune/tasks/<name>.py; finetune/compose.py registers
them all. The checks no type can express are in finetune/validate.py."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from omegaconf import MISSING, DictConfig

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


@dataclass
class TaskConfig:
    """Keys every task has. Each task's schema (in its module) adds its own; configs/task/<name>.yaml names it."""

    name: str = MISSING  # the task's name: finetune/tasks/<name>.py, configs/task/<name>.yaml, docs/tasks/<name>.md


@dataclass
class ModelConfig:
    name_or_path: str = MISSING  # "bundled:<asset>", a Hub id, or a local directory
    revision: Optional[str] = None
    trust_remote_code: bool = False
    # the dtype the weights are loaded in: auto | float32 | bfloat16 | float16. auto: float32 (full fine-tuning keeps
    # fp32 master weights; a GPU trains in bf16 through trainer.mixed_precision), bfloat16 for a LoRA base on a GPU
    dtype: str = "auto"
    # attention-probability dropout while training; None: the checkpoint's own (BERT: 0.1). 0 lets PyTorch's fused
    # attention kernel run, which keeps no attention matrices for backward (faster, less memory on long inputs)
    attention_dropout: Optional[float] = None
    # dropout on hidden states (residual branches, embeddings) while training; None: the checkpoint's own (BERT: 0.1).
    # On a CPU, drawing its masks is a sizeable part of a small encoder's step (docs/benchmarks.md#dropout)
    hidden_dropout: Optional[float] = None
    # a warm-started encoder-decoder (EncoderDecoderModel, e.g. BERT2BERT) from two checkpoints sharing a vocabulary
    encoder: Optional[str] = None
    decoder: Optional[str] = None
    # model-card facts about the base checkpoint
    base_model: Optional[str] = None  # Hub id for the card; defaults to name_or_path when that is a Hub id
    license: Optional[str] = None


@dataclass
class DataConfig:
    """Keys of every data source. Each task's data schema (in its module) adds the columns it reads."""

    # "bundled:<asset>", a Hub dataset id, a file (csv/tsv/json/jsonl/parquet) or a directory of such files
    source: Optional[str] = None
    hub_config: Optional[str] = None  # Hub dataset configuration name
    train_file: Optional[str] = None
    validation_file: Optional[str] = None
    test_file: Optional[str] = None
    # headerless csv/tsv files: the names of their columns, in order (a file with a header row must not set it)
    column_names: Optional[list[str]] = None
    group_column: Optional[str] = None  # split so that no group is in two splits
    deduplicate: bool = False  # drop rows whose inputs repeat an earlier row
    validation_size: float = 0.1  # fraction held out when the data has no validation split
    test_size: float = 0.1  # fraction held out when the data has no test split
    keep_column: Optional[str] = None  # keep only the rows whose value in this column is one of data.keep_values
    keep_values: Optional[list[str]] = None
    split_seed: int = 42  # the held-out splits do not move with the training seed
    max_train_samples: Optional[int] = None
    max_eval_samples: Optional[int] = None
    max_test_samples: Optional[int] = None
    dataset_name: Optional[str] = None  # name for the model card (Hub id when known)
    license: Optional[str] = None


@dataclass
class TrainerConfig:
    engine: str = "hf"  # hf | accelerate
    num_train_epochs: float = 2.0
    max_steps: int = -1
    learning_rate: float = 1e-4
    # the parameters from_pretrained initialized (a new head, a warm start's cross-attention) train at this x
    # learning_rate; 1: no difference
    new_parameters_lr_scale: float = 1.0
    # language-model losses (generation, translation, summarization, mlm): the target's probability mass spread to
    # the rest of the vocabulary while training (0: none); evaluation losses and perplexities stay unsmoothed
    label_smoothing: float = 0.0
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1
    lr_scheduler_type: str = "linear"
    per_device_train_batch_size: int = 32
    per_device_eval_batch_size: int = 128
    gradient_accumulation_steps: int = 1
    max_grad_norm: float = 1.0
    group_by_length: bool = True
    eval_strategy: str = "epoch"  # epoch | steps | no (no evaluation or checkpoint while training)
    eval_steps: Optional[int] = None
    logging_steps: int = 25
    save_total_limit: int = 2  # checkpoints kept while training (plus the best one)
    early_stopping_patience: Optional[int] = None  # stop after this many evaluations without improvement; 0/None = off
    early_stopping_threshold: float = 0.0  # an improvement must beat the best main metric by more than this
    mixed_precision: str = "auto"  # auto (bf16 on a GPU that supports it, else fp32) | no | fp16 | bf16
    dataloader_num_workers: int = 0
    # experiment trackers: tensorboard (event files in <run>/tensorboard), mlflow (pip install finetune[mlflow];
    # MLFLOW_TRACKING_URI, else a local store in <runs_dir>/mlruns); [] turns tracking off
    report_to: list[str] = field(default_factory=lambda: ["tensorboard"])
    # recompute each transformer block's activations in backward instead of keeping them (non-reentrant): less
    # memory, more compute (docs/memory.md)
    gradient_checkpointing: bool = False
    fsdp: bool = False  # FSDP2 over a launch's CPU processes (trainer=accelerate); GPUs: configs/accelerate/fsdp.yaml
    # language-model heads (generation, translation, summarization, mlm): the output layer + cross-entropy run on this
    # many labelled tokens at a time (finetune/lm_loss.py), so the tokens x vocabulary logits never exist whole;
    # 0: the model's own loss. 512: less memory than larger chunks, while smaller ones' matmuls run slower
    # (docs/benchmarks.md#chunked-loss)
    lm_loss_chunk_size: int = 512
    # the optimizer (finetune/optim.py): adamw | adamw_fused | adamw_8bit | adafactor | sgd; optim_args: its own
    # settings (betas, eps, momentum, ...); optimizer_in_backward: each weight steps as soon as its gradient is
    # complete, so no whole-model gradient is kept (one process, no accumulation, max_grad_norm=0)
    optim: str = "adamw"
    # (a node open to new keys: trainer.optim_args.betas=[0.9,0.95] adds one, as trainer.optim_args={eps:1e-6} does)
    optim_args: Any = field(default_factory=lambda: DictConfig({}, flags={"struct": False}))
    optimizer_in_backward: bool = False
    # estimate the run's peak memory before it trains and refuse, in one line, a run that would not fit in the memory
    # available (docs/memory.md#estimate); false: train without the check
    memory_check: bool = True


@dataclass
class PeftConfig:
    method: str = "none"  # none | lora
    r: int = 16  # LoRA rank
    alpha: float = 32.0  # LoRA scaling alpha (updates are scaled by alpha / r)
    dropout: float = 0.0
    target_modules: Any = "ffn"  # ffn (feed-forward layers), all-linear, or module names (suffixes): [query, value]
    modules_to_save: Optional[list[str]] = None  # trained in full and saved; None: the task head + new modules


@dataclass
class HubConfig:
    push: bool = False  # push model/ + metrics.json + learning_curve.png after a verified export (hub=push)
    repo_id: Optional[str] = None  # <namespace>/<name>
    private: bool = True  # for a repo this push creates (an existing repo keeps its visibility)
    revision: Optional[str] = None  # a branch to push to (created from main when missing); None: main
    commit_message: Optional[str] = None  # None: names the run and its test metric
    dry_run: bool = False  # list what would be uploaded, and where, without any network call


@dataclass
class Config:
    task: TaskConfig = field(default_factory=TaskConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    peft: PeftConfig = field(default_factory=PeftConfig)
    hub: HubConfig = field(default_factory=HubConfig)
    seed: int = 42
    debug: bool = False  # show tracebacks for input errors
    verify_tolerance: float = 0.005  # exported pipeline vs trainer, main metric
    runs_dir: str = "runs"
    resume: Optional[str] = None  # true: continue the newest unfinished run of this config; or a run directory


def config_options(group: str) -> list[str]:
    """The named configs of a group: configs/<group>/*.yaml."""
    return sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml"))


def did_you_mean(group: str, value: str) -> str:
    from difflib import get_close_matches

    close = get_close_matches(value, config_options(group), n=1)
    return f"did you mean {group}={close[0]}? " if close else ""
