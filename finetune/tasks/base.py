"""The task interface: everything that differs between tasks, and nothing else.

A task turns canonical raw columns into model features, builds the model with its head, owns its objective (the loss
the engines call), scores predictions, and checks the exported directory through `transformers.pipeline`. Engines,
export and the run only ever talk to this interface.

A task is one module, finetune/tasks/<name>.py, holding its class (`name` = the module's name, as in task=<name>,
configs/task/<name>.yaml and docs/tasks/<name>.md) and its two schemas: `schema` (its task.* keys) and `data_schema`
(the data columns it reads). finetune/tasks/__init__.py finds the classes; nothing else lists them.

Every task module is imported to register its schemas, also by the command line before it checks a config, so the
modules import torch, transformers and datasets inside the methods that use them.
"""

from __future__ import annotations

import itertools
import json
import logging
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Iterable, Iterator

from omegaconf import DictConfig, OmegaConf

from finetune import loading
from finetune.config import DataConfig, TaskConfig
from finetune.errors import FinetuneError

if TYPE_CHECKING:
    from datasets import Dataset, DatasetDict
    from transformers import EvalPrediction, PreTrainedModel, PreTrainedTokenizerBase

    from finetune.config import ModelConfig, TrainerConfig

log = logging.getLogger(__name__)
SORT_WINDOW = 16  # batches of pipeline inputs read ahead and ordered by length
MetricsFn = Callable[["EvalPrediction"], dict[str, float]]


class Task:
    name: ClassVar[str]  # the task's one name (a concrete task sets it; the registry collects those that do)
    aliases: ClassVar[tuple[str, ...]] = ()  # names configs saved by earlier releases use (still read)
    schema: ClassVar[type[TaskConfig]] = TaskConfig  # its task.* keys
    data_schema: ClassVar[type[DataConfig]] = DataConfig  # the data columns it reads
    pipeline_task: ClassVar[str]  # transformers.pipeline task name (also the model card's pipeline_tag)
    main_metric: ClassVar[str]  # best-model selection and the exported pipeline's check use it
    greater_is_better: ClassVar[bool] = True
    auto_model: ClassVar[str]  # the transformers AutoModelFor... class, by name
    columns: ClassVar[dict[str, str]]  # canonical column -> DataConfig field naming it in the user's data
    optional_columns: ClassVar[frozenset[str]] = frozenset()
    input_columns: ClassVar[tuple[str, ...]] = ()  # what makes two rows duplicates
    stratify_column: ClassVar[str | None] = None  # held-out splits keep its class balance
    # the exported tokenizer's model_max_length is the training length, so its pipeline truncates like training; False:
    # the checkpoint's own limit is kept (a generated text's prompt is not cut to the training block size)
    truncates_like_training: ClassVar[bool] = True
    head: ClassVar[str | None] = None  # what the task's model adds to a pretrained body, new by design (load line)
    peft_task_type: ClassVar[str | None] = None  # peft TaskType for peft=lora (SEQ_CLS, TOKEN_CLS, ...); None: generic
    # the least disagreement verify() must allow between the pipeline and the trainer on the main metric,
    # when the pipeline's decoding inherently differs from the trainer's (cfg.verify_tolerance can add more)
    verify_tolerance: ClassVar[float] = 0.0
    verify_relative_tolerance: ClassVar[float] = 0.0  # the same, as a fraction of the trainer's figure
    # the metric verify() reproduces through the pipeline, when the pipeline cannot score the main metric: the trainer
    # side is model_metrics()'s value on the test split (test_<name>); None: the main metric
    verify_metric: ClassVar[str | None] = None
    pipeline_needs_remote_code: ClassVar[bool] = False  # the exported dir ships its own pipeline code
    report_base_metrics: ClassVar[bool] = False  # also score the test split before training (base_test_*)
    data_hint: ClassVar[str] = ""  # how to pass data, for a task without bundled default data
    # the exported pipeline: keyword arguments when loading it and of every call, and its batch size
    pipeline_options: ClassVar[dict[str, Any]] = {}
    pipeline_call: ClassVar[dict[str, Any]] = {}
    pipeline_batch_size: ClassVar[int] = 64
    # a head predicting over a vocabulary, trained on a token cross-entropy (finetune/lm_loss.py; trainer.label_smoothing
    # applies), and where its labels are predicted from: 1 = the position before (causal LMs), 0 = their own (MLM,
    # encoder-decoders)
    vocabulary_loss: ClassVar[bool] = False
    label_shift: ClassVar[int] = 0

    def __init__(self, cfg: TaskConfig):
        self.cfg = cfg
        self.label_smoothing = 0.0  # prepare_training() sets the objective's settings
        self.chunked = False

    # datasets fingerprints map() by pickling the function, and so this task: a pickle of the config's values
    # (a DictConfig's own pickle differs between equal configs) lets every trial of a sweep reuse the tokenized cache
    def __getstate__(self) -> dict[str, Any]:
        cfg = OmegaConf.to_container(self.cfg, resolve=True) if isinstance(self.cfg, DictConfig) else self.cfg
        return {**vars(self), "cfg": cfg}

    def __setstate__(self, state: dict[str, Any]) -> None:
        vars(self).update(state)
        self.cfg = OmegaConf.create(state["cfg"]) if isinstance(state["cfg"], dict) else state["cfg"]

    @classmethod
    def check_config(cls, cfg: TaskConfig, data: DataConfig) -> None:
        """The task.* and data.* values no schema type can check (finetune/validate.py runs this before anything is
        written)."""

    @classmethod
    def main_metric_of(cls, cfg: TaskConfig) -> str:
        """The main metric of a run with task config `cfg` (a sweep's objective, before the task is built)."""
        return cls.main_metric

    max_length_key: ClassVar[str] = "task.max_seq_length"  # the config key that sets max_length

    @property
    def max_length(self) -> int:
        """The longest input in tokens."""
        return self.cfg.max_seq_length

    # --- data ---------------------------------------------------------------------------------
    def column_fields(self, data_cfg: DataConfig) -> dict[str, str]:
        """canonical column -> the data config field naming it, for this data config (default: `columns`). A field
        whose value is a list of columns makes a canonical column of lists (finetune/data.py)."""
        return self.columns

    def prepare(self, raw: DatasetDict, data_cfg: DataConfig) -> DatasetDict:
        """Validate and encode labels on all splits at once (before held-out splits are made)."""
        return raw

    def tokenize(self, raw: DatasetDict, tokenizer: PreTrainedTokenizerBase) -> DatasetDict:
        """Model features, with a `length` column for length-grouped batches."""
        raise NotImplementedError

    def collator(self, tokenizer: PreTrainedTokenizerBase) -> Callable:
        raise NotImplementedError

    # --- objective: the engines call loss() for every batch, in training and in evaluation --------------
    def prepare_training(self, model: Any, trainer_cfg: TrainerConfig, features: DatasetDict) -> DatasetDict:
        """Set the objective up before the engines train `model` on `features`, and return the features they train
        and evaluate on (a task may add what its loss needs). Default: a vocabulary head computes its loss chunk by
        chunk (trainer.lm_loss_chunk_size; finetune/lm_loss.py), smoothed by trainer.label_smoothing."""
        from finetune import lm_loss  # (torch: see the module docstring)

        self.label_smoothing = trainer_cfg.label_smoothing
        self.chunked = bool(self.vocabulary_loss and trainer_cfg.lm_loss_chunk_size and lm_loss.attach(
            model, self.label_shift, trainer_cfg.lm_loss_chunk_size, self.label_smoothing))
        return features

    def items(self, batch: dict[str, Any]) -> Any:
        """What a batch's loss averages over: its labelled positions (-100: none), or its rows when it has no labels.
        The engines add up the items of a step's micro-batches on every process (engines.step_items)."""
        labels = batch.get("labels")
        if labels is None:
            return len(next(iter(batch.values())))
        return labels[..., self.label_shift:].ne(-100).sum()

    def loss(self, model: Any, batch: dict[str, Any], num_items: Any) -> tuple[Any, Any]:
        """(loss, outputs): the batch's items' summed loss divided by `num_items`, the items of the whole step (so a
        step's micro-batches add up to its mean); outputs: what evaluation keeps besides the loss (logits), and an
        optional `metrics` entry of scalars the engines log beside the training loss. Default: the model's own loss;
        a vocabulary head's chunked or label-smoothed one."""
        if self.chunked:  # sums its tokens' losses and divides by num_items itself; smoothed while training
            outputs = model(**batch, num_items_in_batch=num_items)
            return outputs.loss, outputs
        outputs = model(**batch)
        if self.label_smoothing and model.training:  # (evaluation losses stay unsmoothed)
            from finetune.lm_loss import token_cross_entropy

            return token_cross_entropy(outputs.logits, batch["labels"], self.label_smoothing, self.label_shift,
                                       num_items), outputs
        return outputs.loss * (self.items(batch) / num_items), outputs

    # --- model --------------------------------------------------------------------------------
    def model_kwargs(self) -> dict[str, Any]:
        """Head configuration passed to from_pretrained (labels, ...)."""
        return {}

    def load_tokenizer(self, path: str, model_cfg: ModelConfig) -> PreTrainedTokenizerBase:
        from transformers import AutoTokenizer

        tokenizer = loading.load(AutoTokenizer, path, model_cfg)
        specials = tokenizer.num_special_tokens_to_add(pair=True)
        key = self.max_length_key
        if self.max_length <= specials:
            raise FinetuneError(f"{key}={self.max_length} leaves no room for text: this tokenizer "
                                f"adds up to {specials} special tokens; set {key}=128 or so")
        if self.max_length > tokenizer.model_max_length:  # (a tokenizer that declares none says 1e30)
            log.warning("%s=%d is more than the %d tokens the tokenizer declares for its model",
                        key, self.max_length, tokenizer.model_max_length)
        if self.truncates_like_training:
            tokenizer.model_max_length = self.max_length
        return tokenizer

    def load_model(self, path: str, model_cfg: ModelConfig, dtype: str = "float32") -> PreTrainedModel:
        """The model with its head, its weights in `dtype` (memory.model_dtype resolves model.dtype)."""
        if getattr(model_cfg, "encoder", None) or getattr(model_cfg, "decoder", None):
            raise FinetuneError("model.encoder / model.decoder warm-start an encoder-decoder for task=translation or "
                                "task=summarization; this task fine-tunes one checkpoint: pass model=<checkpoint>")
        model, _ = loading.load_pretrained(auto_class(self.auto_model), path, model_cfg, self.head,
                                           ignore_mismatched_sizes=True, dtype=dtype, **self.model_kwargs())
        limit = loading.position_limit(model)
        if limit is not None and self.max_length > limit:
            raise FinetuneError(f"{self.max_length_key}={self.max_length} is more than the {limit} positions "
                                f"model '{model_cfg.name_or_path}' has; set {self.max_length_key}={limit} or less")
        return model

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

    def model_metrics(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, raw: Dataset,
                      base: bool = False) -> dict[str, float]:
        """Metrics that need the model itself (e.g. scoring generated text); keys without prefix. base=True: the
        pretrained model before training, scored for comparison only."""
        return {}

    def samples(self) -> list[dict[str, Any]]:
        """Example outputs to keep with the run (samples.jsonl) and show in the model card."""
        return []

    def card_section(self) -> str:
        """Task-specific markdown for the model card (samples, what the base checkpoint lacked); '' for none."""
        return ""

    def adapter_base_code(self, cfg, base: str) -> str:
        """Python that rebuilds the pretrained model a LoRA adapter applies to (the model card's LoRA section)."""
        name = self.auto_model
        return f"""from transformers import AutoConfig, {name}
config = AutoConfig.from_pretrained("path/to/this/directory")  # labels
base = {name}.from_pretrained("{base}", config=config)"""

    def export(self, model_dir: Path) -> None:
        """Add task files to the exported directory (e.g. a custom pipeline)."""

    def verify(self, model_dir: Path, raw: Dataset) -> dict[str, float]:
        """Re-load `model_dir` with transformers.pipeline, score `raw` through it, return the metrics.
        Also what `finetune.evaluate` runs on new labelled data (after `from_export`)."""
        raise NotImplementedError

    # --- the exported pipeline: the check after export, finetune.evaluate, finetune.predict -----------
    def load_pipeline(self, model_dir: Path) -> Any:
        """The exported directory loaded the way its model card tells users to."""
        from transformers import pipeline

        return pipeline(self.pipeline_task, model=str(model_dir), device=device(),
                        trust_remote_code=self.pipeline_needs_remote_code, **self.pipeline_options)

    def recorded_columns(self) -> list[str]:
        """The data config fields naming the columns the model reads (recorded in the export for predict)."""
        return list(self.columns.values())

    def pipeline_inputs(self, rows: dict[str, list]) -> list:
        """The pipeline inputs of a batch of rows (columns: the canonical names of `input_columns`)."""
        raise FinetuneError(f"finetune.predict does not support {type(self).__name__} yet (it has no pipeline_inputs)")

    def prediction_record(self, output: Any) -> dict[str, Any]:
        """One pipeline output as a JSON record: a line of finetune.predict's output."""
        raise NotImplementedError

    def run_pipeline(self, pipe: Any, inputs: Iterable, batch_size: int | None = None) -> Iterator:
        """The pipeline's outputs, one per input and in order, computed as the inputs are read (a generator in, a
        generator out: no more than SORT_WINDOW batches are held, whatever the number of inputs). Within each window
        the longest inputs run first, so each batch pads to lengths alike; the outputs come back in input order."""
        size = batch_size or self.pipeline_batch_size
        rest = iter(inputs)
        while window := list(itertools.islice(rest, size * SORT_WINDOW)):
            order = sorted(range(len(window)), key=lambda i: -_size(window[i]))
            outputs: list[Any] = [None] * len(window)
            for i, output in zip(order, pipe([window[i] for i in order], batch_size=size, **self.pipeline_call)):
                outputs[i] = output
            yield from outputs

    def from_export(self, model_dir: Path, data_cfg: DataConfig) -> None:
        """Before finetune.evaluate prepares labelled data for the exported model in `model_dir`: adopt what
        training derived from its data (e.g. the labels, in the model's id order), so the data is encoded the
        way the model predicts."""


def _size(x: Any) -> int:
    """An input's length in characters (a proxy of its token count for ordering): a text, or a dict of texts."""
    return len(x) if isinstance(x, str) else sum(map(_size, x.values())) if isinstance(x, dict) else len(str(x))


def exported_labels(model_dir: Path) -> list[str]:
    """The label names of an exported model, in id order (config.json id2label)."""
    id2label = json.loads((Path(model_dir) / "config.json").read_text()).get("id2label", {})
    return [id2label[k] for k in sorted(id2label, key=int)]


def jsonable(value: Any) -> Any:
    """Pipeline outputs with numpy numbers turned into Python ones (json.dumps takes those only)."""
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    return value.item() if hasattr(value, "item") else value


@contextmanager
def weights_precision(model):
    """The model computing in its weights' precision for a while (what the export does), without the autocast forward
    that accelerate gives a model it prepares for mixed-precision training; that forward is back afterwards."""
    from accelerate.utils import extract_model_from_parallel

    saved = {k: model.__dict__[k] for k in ("forward", "_original_forward") if k in model.__dict__}
    try:
        yield extract_model_from_parallel(model, keep_fp32_wrapper=False)
    finally:
        model.__dict__.update(saved)


def device() -> int:
    """The pipelines' device: the first GPU when there is one."""
    import torch

    return 0 if torch.cuda.is_available() else -1


def auto_class(name: str) -> Any:
    """A transformers Auto* class by name (task modules name theirs: see the module docstring)."""
    import transformers

    return getattr(transformers, name)
