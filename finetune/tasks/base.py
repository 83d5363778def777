"""The task interface: everything that differs between tasks, and nothing else.

A task turns canonical raw columns into model features, builds the model with its head, scores
predictions, and checks the exported directory through `transformers.pipeline`. Engines, export
and the run only ever talk to this interface.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ClassVar

from datasets import Dataset, DatasetDict
from transformers import AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from finetune.config import config_options, did_you_mean
from finetune.errors import FinetuneError

if TYPE_CHECKING:
    from transformers import EvalPrediction

    from finetune.config import DataConfig, ModelConfig, TaskConfig

MetricsFn = Callable[["EvalPrediction"], dict[str, float]]


class Task:
    pipeline_task: ClassVar[str]  # transformers.pipeline task name (also the model card's pipeline_tag)
    main_metric: ClassVar[str]  # best-model selection and the exported pipeline's check use it
    greater_is_better: ClassVar[bool] = True
    auto_model: ClassVar[Any]  # transformers AutoModelFor... class
    columns: ClassVar[dict[str, str]]  # canonical column -> DataConfig field naming it in the user's data
    optional_columns: ClassVar[frozenset[str]] = frozenset()
    input_columns: ClassVar[tuple[str, ...]] = ()  # what makes two rows duplicates
    stratify_column: ClassVar[str | None] = None  # held-out splits keep its class balance
    peft_task_type: ClassVar[str | None] = None  # peft TaskType for peft=lora (SEQ_CLS, TOKEN_CLS, ...); None: generic
    # the least disagreement verify() must allow between the pipeline and the trainer on the main metric,
    # when the pipeline's decoding inherently differs from the trainer's (cfg.verify_tolerance can add more)
    verify_tolerance: ClassVar[float] = 0.0
    verify_relative_tolerance: ClassVar[float] = 0.0  # the same, as a fraction of the trainer's figure
    pipeline_needs_remote_code: ClassVar[bool] = False  # the exported dir ships its own pipeline code
    report_base_metrics: ClassVar[bool] = False  # also score the test split before training (base_test_*)
    data_hint: ClassVar[str] = ""  # how to pass data, for a task without bundled default data

    def __init__(self, cfg: TaskConfig):
        self.cfg = cfg

    @property
    def max_length(self) -> int:
        """The longest input in tokens."""
        return self.cfg.max_seq_length

    # --- data ---------------------------------------------------------------------------------
    def prepare(self, raw: DatasetDict, data_cfg: DataConfig) -> DatasetDict:
        """Validate and encode labels on all splits at once (before held-out splits are made)."""
        return raw

    def tokenize(self, raw: DatasetDict, tokenizer: PreTrainedTokenizerBase) -> DatasetDict:
        """Model features, with a `length` column for length-grouped batches."""
        raise NotImplementedError

    def collator(self, tokenizer: PreTrainedTokenizerBase) -> Callable:
        raise NotImplementedError

    # --- model --------------------------------------------------------------------------------
    def model_kwargs(self) -> dict[str, Any]:
        """Head configuration passed to from_pretrained (labels, ...)."""
        return {}

    def load_tokenizer(self, path: str, model_cfg: ModelConfig) -> PreTrainedTokenizerBase:
        tokenizer = _load(AutoTokenizer, path, model_cfg)
        tokenizer.model_max_length = self.max_length  # the exported pipeline truncates like training
        return tokenizer

    def load_model(self, path: str, model_cfg: ModelConfig) -> PreTrainedModel:
        if getattr(model_cfg, "encoder", None) or getattr(model_cfg, "decoder", None):
            raise FinetuneError("model.encoder / model.decoder warm-start an encoder-decoder for task=translation or "
                                "task=summarization; this task fine-tunes one checkpoint: pass model=<checkpoint>")
        return _load(self.auto_model, path, model_cfg, ignore_mismatched_sizes=True, **self.model_kwargs())

    # --- evaluation and export ----------------------------------------------------------------
    def compute_metrics(self, split: str, features: Dataset) -> MetricsFn:
        """The metrics function for one evaluated split (QA needs the split's features to post-process)."""
        raise NotImplementedError

    def preprocess_logits(self, logits: Any, labels: Any) -> Any:
        """What evaluation keeps of each batch's logits for compute_metrics (default: all of them). Tasks with
        large outputs (a language model's vocabulary x tokens) reduce them here, on the device, batch by batch."""
        return logits

    def evaluate_model(self, model: PreTrainedModel, split: str) -> dict[str, float]:
        """Metrics that need the model itself at every evaluation of `split` (e.g. scores of generated text), keys
        without prefix. Both engines add them to the split's metrics, so the main metric can be one of them."""
        return {}

    def model_metrics(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, raw: Dataset
                      ) -> dict[str, float]:
        """Metrics that need the model itself after training (e.g. scoring generated text); keys without prefix."""
        return {}

    def samples(self) -> list[dict[str, Any]]:
        """Example outputs to keep with the run (samples.jsonl) and show in the model card."""
        return []

    def card_section(self) -> str:
        """Markdown the task adds to the model card."""
        return ""

    def adapter_base_code(self, cfg, base: str) -> str:
        """Python that rebuilds the pretrained model a LoRA adapter applies to (the model card's LoRA section)."""
        name = self.auto_model.__name__
        return f"""from transformers import AutoConfig, {name}
config = AutoConfig.from_pretrained("path/to/this/directory")  # labels
base = {name}.from_pretrained("{base}", config=config)"""

    def export(self, model_dir: Path) -> None:
        """Add task files to the exported directory (e.g. a custom pipeline)."""

    def verify(self, model_dir: Path, raw: Dataset) -> dict[str, float]:
        """Re-load `model_dir` with transformers.pipeline, score `raw` through it, return the metrics."""
        raise NotImplementedError


def _load(auto_cls: Any, path: str, model_cfg: ModelConfig, **kwargs: Any) -> Any:
    try:
        return auto_cls.from_pretrained(
            path, revision=model_cfg.revision, trust_remote_code=model_cfg.trust_remote_code, **kwargs
        )
    except (OSError, ValueError, KeyError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        name = str(model_cfg.name_or_path)
        raise FinetuneError(
            f"could not load model '{name}' ({first}); {did_you_mean('model', name)}pass model=<config name in "
            f"configs/model ({', '.join(config_options('model'))}), local checkpoint directory or reachable Hub id>"
        ) from e
