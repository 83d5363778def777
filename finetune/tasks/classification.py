"""Sequence classification of a text (or a text pair): one label a text, several labels a text, or a number.

task.problem_type: single_label (softmax cross-entropy; accuracy, macro-F1), multi_label (a sigmoid a label, BCE; micro-,
macro- and samples-F1, exact match, with decision thresholds tuned on the validation split), regression (MSE or Huber
on one output; Pearson, Spearman, MSE, MAE), or auto: read from the label column (finetune/tasks/classification_labels.py
reads every shape). The exported config.json carries transformers' problem_type, so the plain text-classification
pipeline applies softmax, sigmoid or nothing; a multi-label export also ships a pipeline that applies the thresholds
(finetune/pipelines/multi_label.py).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import numpy as np

from finetune import progress
from finetune.config import DataConfig, TaskConfig
from finetune.errors import FinetuneError
from finetune.metrics import classification_metrics, multilabel_metrics, regression_metrics, tune_thresholds
from finetune.tasks import classification_labels as shapes
from finetune.tasks.base import MetricsFn, Task, device, exported_labels, jsonable
from finetune.tasks.classification_labels import MULTI, REGRESSION, SINGLE

if TYPE_CHECKING:
    from datasets import Dataset, DatasetDict

log = logging.getLogger(__name__)

PROBLEM_TYPES = (SINGLE, MULTI, REGRESSION, "auto")
HF_PROBLEM_TYPE = {SINGLE: "single_label_classification", MULTI: "multi_label_classification", REGRESSION: "regression"}
BEST_METRICS = {SINGLE: ("accuracy", "f1_macro"), MULTI: ("f1_macro", "f1_micro", "f1_samples", "exact_match"),
                REGRESSION: ("pearson", "spearman")}  # the first: the default; all are maximised
THRESHOLDS, POS_WEIGHTS, REGRESSION_LOSSES = ("per_label", "global", "fixed"), ("none", "auto"), ("mse", "huber")


@dataclass
class ClassificationConfig(TaskConfig):
    max_seq_length: int = 128
    # single_label | multi_label | regression | auto: read from the label column (lists or separated labels:
    # multi_label; numbers with fractions: regression; else single_label), said in one log line
    problem_type: str = "auto"
    # multi_label decisions: per_label (a threshold a label) or global (one), tuned on the validation split for
    # macro-F1; fixed: 0.5
    thresholds: str = "per_label"
    pos_weight: str = "none"  # multi_label: auto weighs each label's positives by its negatives / positives in train
    regression_loss: str = "mse"  # regression: mse | huber (delta 1)
    best_metric: Optional[str] = None  # the validation metric that picks the best checkpoint; None: the first above


@dataclass
class ClassificationData(DataConfig):
    text_column: str = "text"
    text_pair_column: Optional[str] = None
    label_column: str = "label"
    label_names: Optional[list[str]] = None  # the labels in id order (single_label: keep only rows with these)
    label_names_file: Optional[str] = None  # the same, one name a line
    label_columns: Optional[list[str]] = None  # multi_label: one 0/1 column a label, instead of data.label_column
    label_separator: str = ","  # multi_label: several labels in one string, "3,27" or "joy,love" (ids or names)


class ClassificationTask(Task):
    name = "classification"
    schema, data_schema = ClassificationConfig, ClassificationData
    pipeline_task = "text-classification"
    main_metric = "accuracy"  # single_label's; an instance takes its problem type's (main_metric_of)
    auto_model = "AutoModelForSequenceClassification"
    head = "classification head"
    columns = {"text": "text_column", "text_pair": "text_pair_column", "label": "label_column"}
    optional_columns = frozenset({"text_pair"})
    input_columns = ("text", "text_pair")
    stratify_column = "label"
    peft_task_type = "SEQ_CLS"
    pipeline_call = {"truncation": True, "top_k": None}  # every label's score, best first

    labels: list[str]

    def __init__(self, cfg):
        super().__init__(cfg)
        self.thresholds: np.ndarray | None = None  # multi_label: one a label, tuned on the validation split
        self.label_range: list[float] | None = None  # regression: the training scores' least and greatest
        self.pos_weight = None
        self.runtime: dict[str, Any] = {}  # what evaluation keeps between calls (not pickled)
        self._set_problem_type(SINGLE if cfg.problem_type == "auto" else cfg.problem_type)
        self.decided = cfg.problem_type != "auto"  # auto: prepare() reads it from the data

    def __getstate__(self) -> dict[str, Any]:
        return {**super().__getstate__(), "runtime": {}}

    @classmethod
    def main_metric_of(cls, cfg) -> str:
        problem = cfg.problem_type if cfg.problem_type != "auto" else SINGLE
        return cfg.best_metric or BEST_METRICS[problem][0]

    @classmethod
    def check_config(cls, cfg, data) -> None:
        for key, allowed in (("problem_type", PROBLEM_TYPES), ("thresholds", THRESHOLDS), ("pos_weight", POS_WEIGHTS),
                             ("regression_loss", REGRESSION_LOSSES)):
            if cfg[key] not in allowed:
                raise FinetuneError(f"task.{key} must be one of {', '.join(allowed)} (got '{cfg[key]}')")
        problem = cfg.problem_type
        metrics = BEST_METRICS.get(problem) or sorted({m for ms in BEST_METRICS.values() for m in ms})
        if cfg.best_metric is not None and cfg.best_metric not in metrics:
            raise FinetuneError(f"task.best_metric='{cfg.best_metric}' is not a metric of problem type {problem}: "
                                f"choose one of {', '.join(metrics)}")
        shapes.check_applies(cfg, problem)
        shapes.check_data_config(data, problem)

    def _set_problem_type(self, problem: str) -> None:
        self.problem_type, self.decided = problem, True
        self.main_metric = self.cfg.best_metric or BEST_METRICS[problem][0]
        self.pipeline_call = {"truncation": True} if problem == MULTI else type(self).pipeline_call
        self.stratify_column = "label" if problem == SINGLE else None  # (held-out splits stratify class ids only)

    def column_fields(self, data_cfg) -> dict[str, str]:
        return {**self.columns, "label": "label_columns"} if data_cfg.get("label_columns") else self.columns

    def recorded_columns(self) -> list[str]:
        return [*self.columns.values(), "label_columns", "label_separator"]

    # --- data ---------------------------------------------------------------------------------
    def prepare(self, raw: DatasetDict, data_cfg) -> DatasetDict:
        first = raw["train"] if "train" in raw else next(iter(raw.values()))  # finetune.evaluate: one split
        if data_cfg.text_pair_column and "text_pair" not in first.column_names:
            raise FinetuneError(f"column '{data_cfg.text_pair_column}' (data.text_pair_column) not found in the "
                                f"{'train' if 'train' in raw else 'given'} data; set data.text_pair_column=<a column> "
                                "or drop it")
        inputs = [c for c in self.input_columns if c in first.column_names]
        if not self.decided:
            problem, why = shapes.infer(raw, data_cfg)
            log.info("problem type: %s (%s; task.problem_type=single_label|multi_label|regression sets it)",
                     problem, why)
            self._set_problem_type(problem)
            shapes.check_applies(self.cfg, problem)
        names = shapes.label_names(data_cfg)
        if self.problem_type == SINGLE:
            raw = raw.filter(lambda row: all(row[c] is not None for c in [*inputs, "label"]))
            raw, self.labels = shapes.single_label(raw, names)
            return raw
        raw = raw.filter(lambda row: all(row[c] is not None for c in inputs))  # (a missing label is the row's error)
        if self.problem_type == MULTI:
            ids, self.labels = shapes.multi_label_ids(raw, data_cfg, names)
            raw = shapes.replace_labels(raw, ids, shapes.multi_label_feature(self.labels))
            if "train" in raw and not any(map(len, ids["train"])):
                raise FinetuneError("no row of the training data has a label; check data.label_column")
            return raw
        if names is not None and len(names) != 1:
            raise FinetuneError(f"a regression predicts one number: give data.label_names one name, not {len(names)}")
        self.labels = names or [data_cfg.label_column]
        numbers = shapes.scores(raw, data_cfg.label_column)
        if "train" in raw:
            self.label_range = [min(numbers["train"]), max(numbers["train"])]
            if self.label_range[0] == self.label_range[1]:
                raise FinetuneError(f"every training score is {self.label_range[0]:g}: a regression needs scores that "
                                    "differ; check data.label_column")
        from datasets import Value

        return shapes.replace_labels(raw, numbers, Value("float32"))

    def tokenize(self, raw: DatasetDict, tokenizer) -> DatasetDict:
        pair = "text_pair" in raw["train"].column_names
        hot = len(self.labels) if self.problem_type == MULTI else 0

        def encode(batch: dict[str, list]) -> dict[str, Any]:
            enc = tokenizer(batch["text"], batch["text_pair"] if pair else None, truncation=True,
                            max_length=self.cfg.max_seq_length)
            enc["length"] = [len(ids) for ids in enc["input_ids"]]
            enc["labels"] = [np.isin(np.arange(hot), ids).astype(np.float32) for ids in batch["label"]] if hot \
                else batch["label"]  # multi_label: BCE's float multi-hot rows
            return enc

        features = raw.map(encode, batched=True, remove_columns=raw["train"].column_names, desc="tokenizing")
        self.runtime["tokenizer"] = tokenizer  # (after map: not part of its fingerprint)
        return features

    def collator(self, tokenizer):
        from transformers import DataCollatorWithPadding

        return DataCollatorWithPadding(tokenizer)

    def model_kwargs(self) -> dict[str, Any]:
        return {
            "num_labels": 1 if self.problem_type == REGRESSION else len(self.labels),
            "id2label": dict(enumerate(self.labels)),
            "label2id": {name: i for i, name in enumerate(self.labels)},
            "problem_type": HF_PROBLEM_TYPE[self.problem_type],
        }

    # --- objective ----------------------------------------------------------------------------
    def prepare_training(self, model, trainer_cfg, features):
        features = super().prepare_training(model, trainer_cfg, features)
        self.runtime.update(features=features, eval_batch_size=trainer_cfg.per_device_eval_batch_size)
        if self.problem_type != MULTI:
            return features
        import torch

        counts = np.asarray(features["train"]["labels"]).sum(0)
        weights = (len(features["train"]) - counts) / np.maximum(counts, 1)  # torch's: negatives / positives
        if self.cfg.pos_weight == "auto":
            self.pos_weight = torch.tensor(weights, dtype=torch.float32)
            log.info("task.pos_weight=auto: positives weigh %.3g to %.3g (median %.3g)", weights.min(), weights.max(),
                     np.median(weights))
        else:
            shapes.start_at_prior(model, np.log(1 / np.maximum(weights, 1e-6)))
        return features

    def items(self, batch: dict[str, Any]) -> Any:
        labels = batch.get("labels")
        if self.problem_type == SINGLE or labels is None:
            return super().items(batch)
        return labels.numel()  # multi_label: every (row, label) pair's BCE; regression: rows

    def loss(self, model, batch: dict[str, Any], num_items: Any) -> tuple[Any, Any]:
        if self.problem_type == SINGLE or batch.get("labels") is None:
            return super().loss(model, batch, num_items)
        import torch.nn.functional as F

        labels = batch["labels"]
        outputs = model(**{k: v for k, v in batch.items() if k != "labels"})
        logits = outputs.logits.float()
        if self.problem_type == MULTI:
            weight = None if self.pos_weight is None else self.pos_weight.to(logits.device)
            loss = F.binary_cross_entropy_with_logits(logits, labels.float(), pos_weight=weight, reduction="sum")
        else:
            fn = F.huber_loss if self.cfg.regression_loss == "huber" else F.mse_loss
            loss = fn(logits.squeeze(-1), labels.float(), reduction="sum")
        return loss / num_items, outputs

    # --- evaluation ---------------------------------------------------------------------------
    def compute_metrics(self, split: str, features: Dataset) -> MetricsFn:
        def fn(pred) -> dict[str, float]:
            logits = pred.predictions[0] if isinstance(pred.predictions, tuple) else pred.predictions
            if self.problem_type == SINGLE:
                return classification_metrics(pred.label_ids, np.argmax(logits, axis=-1), self.labels)
            if self.problem_type == REGRESSION:
                return regression_metrics(pred.label_ids, logits[:, 0])
            truth, scores = pred.label_ids > 0.5, _pipeline().sigmoid(logits)
            if self.cfg.thresholds == "fixed":
                return decided(truth, scores, 0.5, self.labels)
            if split == "validation":
                self.thresholds = tune_thresholds(truth, scores, self.cfg.thresholds == "per_label")
                return {**at_half(truth, scores, self.labels), **decided(truth, scores, self.thresholds, self.labels)}
            self.runtime["pending"] = truth, scores  # evaluate_model() decides with this model's validation thresholds
            return at_half(truth, scores, self.labels)

        return fn

    def evaluate_model(self, model, split: str) -> dict[str, float]:
        """multi_label, a split other than validation: its decisions at the thresholds tuned on the validation split's
        predictions of this same model (the best checkpoint's, not the last evaluation's)."""
        if "pending" not in self.runtime:
            return {}
        truth, scores = self.runtime.pop("pending")
        self.thresholds = tune_thresholds(*self._validation_scores(model), self.cfg.thresholds == "per_label")
        return decided(truth, scores, self.thresholds, self.labels)

    def _validation_scores(self, model) -> tuple[np.ndarray, np.ndarray]:
        import torch
        from transformers import DataCollatorWithPadding

        split = self.runtime["features"]["validation"]
        collate, size = DataCollatorWithPadding(self.runtime["tokenizer"]), self.runtime["eval_batch_size"]
        order = np.argsort(-np.asarray(split["length"]), kind="stable")  # longest first: batches pad alike
        rows = split.remove_columns(["length", "labels"]).select(order)
        where = next(model.parameters()).device
        logits = []
        with torch.inference_mode():
            for start in range(0, len(rows), size):
                batch = collate([rows[i] for i in range(start, min(start + size, len(rows)))])
                logits.append(model(**{k: v.to(where) for k, v in batch.items()}).logits.float().cpu().numpy())
        scores = np.empty((len(rows), len(self.labels)), dtype=np.float32)
        scores[order] = _pipeline().sigmoid(np.concatenate(logits))
        return np.asarray(split["labels"]) > 0.5, scores

    # --- the export and its pipeline ----------------------------------------------------------
    def export(self, model_dir: Path) -> None:
        """config.json: multi_label's thresholds and its pipeline (code beside the model); regression's label range."""
        from transformers import AutoConfig
        from transformers.dynamic_module_utils import custom_object_save

        if self.problem_type == SINGLE:
            return
        config = AutoConfig.from_pretrained(model_dir)
        if self.problem_type == REGRESSION:
            config.label_range = self.label_range
        else:
            if self.cfg.thresholds == "fixed":
                self.thresholds = np.full(len(self.labels), 0.5)
            if self.thresholds is None:
                raise RuntimeError("multi_label thresholds are tuned when the test split is evaluated, before export")
            custom_object_save(_pipeline().MultiLabelClassificationPipeline, model_dir)
            config.custom_pipelines = {_pipeline().TASK: {
                "impl": "multi_label.MultiLabelClassificationPipeline", "pt": ["AutoModelForSequenceClassification"],
                "type": "text"}}
            config.decision_thresholds = {n: float(t) for n, t in zip(self.labels, self.thresholds)}
            config.threshold_tuning = self.cfg.thresholds
        config.save_pretrained(model_dir)

    def card_section(self) -> str:
        if self.problem_type == REGRESSION:
            lo, hi = self.label_range or (float("nan"),) * 2
            return (f"\n## Problem type\n\nregression ({self.cfg.regression_loss} loss), one score a text; the training "
                    f"scores ranged from {lo:g} to {hi:g} (config.json `label_range`). The pipeline returns the score "
                    "as is (no sigmoid or softmax): `[{'label': '" + self.labels[0] + "', 'score': ...}]`.\n")
        if self.problem_type != MULTI:
            return ""
        how = {"per_label": "tuned for each label on the validation split", "global": "one for every label, tuned on "
               "the validation split", "fixed": "0.5 for every label"}[self.cfg.thresholds]
        rows = "\n".join(f"| {n} | {t:.4f} |" for n, t in zip(self.labels, self.thresholds))
        return f"""
## Problem type

multi_label: a sigmoid a label, trained with binary cross-entropy (pos_weight: {self.cfg.pos_weight}). A label is
predicted when its probability reaches its decision threshold, {how} (config.json `decision_thresholds`):

```python
labels = pipeline(model="path/to/this/directory", trust_remote_code=True)  # the predicted label set
labels("some text")  # {{'labels': [...], 'scores': {{label: probability}}}}
probabilities = pipeline("text-classification", model="path/to/this/directory", top_k=None)  # no thresholds
```

| label | threshold |
|---|---:|
{rows}
"""

    def _adopt(self, model_dir: Path) -> None:
        """The problem type and labels of an exported model (config.json)."""
        config = json.loads((Path(model_dir) / "config.json").read_text())
        kind = {v: k for k, v in HF_PROBLEM_TYPE.items()}.get(config.get("problem_type"), SINGLE)
        self._set_problem_type(kind)
        self.labels = exported_labels(model_dir)

    def load_pipeline(self, model_dir: Path):
        self._adopt(model_dir)
        if self.problem_type != MULTI:
            return super().load_pipeline(model_dir)
        from transformers import pipeline

        return pipeline(model=str(model_dir), trust_remote_code=True, device=device())  # the code export() wrote

    def verify(self, model_dir: Path, raw: Dataset) -> dict[str, float]:
        pipe = self.load_pipeline(model_dir)
        inputs = progress.bar(self.pipeline_inputs(raw.to_dict()), total=len(raw), desc="pipeline check", unit="rows")
        records = [self.prediction_record(o) for o in self.run_pipeline(pipe, inputs)]
        if self.problem_type == REGRESSION:
            return regression_metrics(np.array(list(raw["label"])), np.array([r["score"] for r in records]))
        label2id = {name: i for i, name in enumerate(self.labels)}
        if self.problem_type == SINGLE:
            preds = np.array([label2id[r["label"]] for r in records])
            return classification_metrics(np.array(list(raw["label"])), preds, self.labels)
        k = len(self.labels)
        truth = np.array([np.isin(np.arange(k), ids) for ids in raw["label"]])
        predicted = np.array([np.isin(np.arange(k), [label2id[n] for n in r["labels"]]) for r in records])
        scores = np.array([[r["scores"][n] for n in self.labels] for r in records], dtype=np.float32)
        metrics = multilabel_metrics(truth, predicted, self.labels)
        return metrics if self.cfg.thresholds == "fixed" else {**at_half(truth, scores, self.labels), **metrics}

    def pipeline_inputs(self, rows: dict[str, list]) -> list:
        if rows.get("text_pair") is not None:
            return [{"text": t, "text_pair": p} for t, p in zip(rows["text"], rows["text_pair"])]
        return list(rows["text"])

    def prediction_record(self, output: Any) -> dict[str, Any]:
        if self.problem_type == MULTI:
            return jsonable(output)  # {"labels": [the predicted set, best first], "scores": {label: probability}}
        if self.problem_type == REGRESSION:
            return jsonable({"score": output[0]["score"]})
        return jsonable({"label": output[0]["label"], "score": output[0]["score"],
                         "scores": {o["label"]: o["score"] for o in output}})

    def from_export(self, model_dir: Path, data_cfg) -> None:
        self._adopt(model_dir)
        if self.problem_type != REGRESSION:
            data_cfg.label_names = self.labels  # the data's labels encoded in the model's order


def at_half(truth: np.ndarray, scores: np.ndarray, labels: list[str]) -> dict[str, float]:
    """Macro- and micro-F1 deciding at 0.5 for every label: beside the tuned thresholds' figures."""
    half = decided(truth, scores, 0.5, labels)
    return {"f1_macro_at_0.5": half["f1_macro"], "f1_micro_at_0.5": half["f1_micro"]}


def decided(truth: np.ndarray, scores: np.ndarray, thresholds: Any, labels: list[str]) -> dict[str, float]:
    """Multi-label metrics of the decisions at `thresholds`, taken as the exported pipeline takes them."""
    return multilabel_metrics(truth, _pipeline().decide(scores, thresholds), labels)


def _pipeline():
    """The shipped multi-label pipeline's module (it imports transformers: not when the task registry is read)."""
    from finetune.pipelines import multi_label

    return multi_label
