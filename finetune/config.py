"""Typed schema of the Hydra config tree (configs/) and the checks Hydra cannot do."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


@dataclass
class TaskConfig:
    """Keys every task has. Each task's schema below adds its own; configs/task/<name>.yaml names it."""

    name: str = MISSING  # key in finetune.tasks.TASKS


@dataclass
class ClassificationTaskConfig(TaskConfig):
    max_seq_length: int = 128


@dataclass
class TokenClassificationTaskConfig(TaskConfig):
    max_seq_length: int = 128
    label_all_tokens: bool = False  # label every sub-token, not only a word's first
    tag_scheme: str = "auto"  # auto | IOB1 | IOB2 | BIOES: the data's tags (the model uses IOB2)


@dataclass
class QATaskConfig(TaskConfig):
    max_seq_length: int = 384
    doc_stride: int = 128  # overlap between context windows
    max_answer_length: int = 30
    n_best_size: int = 20
    null_score_diff_threshold: float = 0.0
    version_2_with_negative: bool = False


@dataclass
class GenerationSettings:
    """Decoding defaults, written to the exported generation_config.json (the pipeline uses them)."""

    max_new_tokens: int = 64
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    num_beams: int = 1
    repetition_penalty: float = 1.0


@dataclass
class CausalLMTaskConfig(TaskConfig):
    block_size: int = 512  # plain text is cut into blocks of this many tokens; the longest example otherwise
    eval_prompts: int = 32  # test prompts generated from (scored, and checked through the exported pipeline)
    generation: GenerationSettings = field(default_factory=GenerationSettings)


@dataclass
class MaskedLMTaskConfig(TaskConfig):
    max_seq_length: int = 128  # longer texts are truncated (one row = one sequence)
    mlm_probability: float = 0.15  # fraction of tokens to predict (80% -> [MASK], 10% random, 10% unchanged)
    whole_word_mask: bool = False  # mask all pieces of a word together (every chosen word becomes [MASK])
    eval_mask_seed: int = 0  # fixes the validation / test masks (with each text) and the fill-mask check's words


@dataclass
class Seq2SeqTaskConfig(TaskConfig):
    max_source_length: int = 128  # source tokens kept (the rest is cut, in training, evaluation and the pipeline)
    max_target_length: int = 128  # target tokens trained on
    prefix: Optional[str] = None  # encoder-decoder input prefix (T5 style); None: the checkpoint's own, if any
    # decoder-only models: the prompt, in which {source}, {source_lang}, {target_lang} are replaced; rendered as a
    # user turn with the tokenizer's chat template when it has one and chat_template is true
    prompt_template: str = "{source}"
    chat_template: bool = True
    generation: GenerationSettings = field(default_factory=GenerationSettings)


@dataclass
class TranslationTaskConfig(Seq2SeqTaskConfig):
    source_lang: str = "en"  # the data's language keys: train.en / train.de files, {"translation": {"en", "de"}} rows
    target_lang: str = "de"
    source_lang_code: Optional[str] = None  # the tokenizer's language code (mBART en_XX, NLLB eng_Latn); None: found
    target_lang_code: Optional[str] = None


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
    """Keys of every data source. Each data shape below adds the columns it reads."""

    # "bundled:<asset>", a Hub dataset id, a file (csv/tsv/json/jsonl/parquet) or a directory of such files
    source: Optional[str] = None
    hub_config: Optional[str] = None  # Hub dataset configuration name
    train_file: Optional[str] = None
    validation_file: Optional[str] = None
    test_file: Optional[str] = None
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
class LabelledTextData(DataConfig):
    text_column: str = "text"
    text_pair_column: Optional[str] = None
    label_column: str = "label"
    label_names: Optional[list[str]] = None  # keep only these labels, in this order


@dataclass
class TaggedTokensData(DataConfig):
    text_column: str = "tokens"  # a list of words per row
    label_column: str = "tags"  # a list of tags per row
    label_names: Optional[list[str]] = None  # names of integer tags, in id order


@dataclass
class QAData(DataConfig):
    question_column: str = "question"
    context_column: str = "context"
    answers_column: str = "answers"  # {text: [...], answer_start: [...]}


@dataclass
class TextData(DataConfig):
    text_column: str = "text"  # .txt files: one row per line


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


@dataclass
class GenerationData(DataConfig):
    format: str = "auto"  # auto | text | prompt_completion | messages (auto: from the columns present)
    text_column: str = "text"  # plain text: continued pre-training on packed blocks
    prompt_column: str = "prompt"  # prompt / completion: the loss is on the completion only
    completion_column: str = "completion"
    messages_column: str = "messages"  # chat: a list of {role, content}; the loss is on the assistant turns only


@dataclass
class Seq2SeqData(DataConfig):
    source_column: str = "source"  # text, or a list of sentences (joined with spaces)
    target_column: str = "target"  # text, or a list of references
    references: str = "first"  # several references per example: train on the first, or on each (metrics use all)


@dataclass
class TranslationData(Seq2SeqData):
    translation_column: str = "translation"  # Hub rows {"translation": {"<source_lang>": ..., "<target_lang>": ...}}


# one schema per task and per data shape; configs/task/<name>.yaml selects its two in its defaults list
TASK_SCHEMAS = {"classification": ClassificationTaskConfig, "token_classification": TokenClassificationTaskConfig,
                "qa": QATaskConfig, "causal_lm": CausalLMTaskConfig, "masked_lm": MaskedLMTaskConfig,
                "translation": TranslationTaskConfig, "summarization": Seq2SeqTaskConfig}
DATA_SCHEMAS = {"labelled_text": LabelledTextData, "tagged_tokens": TaggedTokensData, "qa": QAData,
                "generation": GenerationData, "text": TextData, "seq2seq": Seq2SeqData, "translation": TranslationData}


def register_configs() -> None:
    store = ConfigStore.instance()
    store.store(name="base_config", node=Config)
    for group, schemas in (("schema/task", TASK_SCHEMAS), ("schema/data", DATA_SCHEMAS)):
        for name, node in schemas.items():
            store.store(group=group, name=name, node=node)
