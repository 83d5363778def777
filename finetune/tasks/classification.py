"""Sequence classification (sentiment, topic, NLI with a text pair): accuracy, macro-F1, per class."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import numpy as np

from finetune import progress
from finetune.config import DataConfig, TaskConfig
from finetune.errors import FinetuneError
from finetune.metrics import classification_metrics
from finetune.tasks.base import MetricsFn, Task, exported_labels, jsonable

if TYPE_CHECKING:
    from datasets import Dataset, DatasetDict

log = logging.getLogger(__name__)


@dataclass
class ClassificationConfig(TaskConfig):
    max_seq_length: int = 128


@dataclass
class ClassificationData(DataConfig):
    text_column: str = "text"
    text_pair_column: Optional[str] = None
    label_column: str = "label"
    label_names: Optional[list[str]] = None  # keep only these labels, in this order


class ClassificationTask(Task):
    name = "classification"
    schema, data_schema = ClassificationConfig, ClassificationData
    pipeline_task = "text-classification"
    main_metric = "accuracy"
    auto_model = "AutoModelForSequenceClassification"
    head = "classification head"
    columns = {"text": "text_column", "text_pair": "text_pair_column", "label": "label_column"}
    optional_columns = frozenset({"text_pair"})
    input_columns = ("text", "text_pair")
    stratify_column = "label"
    peft_task_type = "SEQ_CLS"
    pipeline_call = {"truncation": True, "top_k": None}  # every label's score, best first

    labels: list[str]

    def prepare(self, raw: DatasetDict, data_cfg) -> DatasetDict:
        from datasets import ClassLabel, Value

        first = raw["train"] if "train" in raw else next(iter(raw.values()))  # finetune.evaluate: one split
        if data_cfg.text_pair_column and "text_pair" not in first.column_names:
            raise FinetuneError(f"column '{data_cfg.text_pair_column}' (data.text_pair_column) not found in the "
                                f"{'train' if 'train' in raw else 'given'} data; set data.text_pair_column=<a column> "
                                "or drop it")
        inputs = [c for c in self.input_columns if c in first.column_names]
        raw = raw.filter(lambda row: all(row[c] is not None for c in [*inputs, "label"]))
        feature = first.features["label"]
        wanted = list(data_cfg.label_names) if data_cfg.label_names else None
        if isinstance(feature, ClassLabel):
            self.labels = wanted or feature.names
            if len(self.labels) != feature.num_classes:
                raise FinetuneError(
                    f"data.label_names has {len(self.labels)} names but the label column has {feature.num_classes} "
                    f"classes ({', '.join(feature.names)}); give one name per class or drop data.label_names"
                )
            raw = raw.cast_column("label", ClassLabel(names=self.labels))
        elif feature.dtype.startswith("int"):
            ids = sorted({int(v) for split in raw.values() for v in split.unique("label")})
            if ids[0] < 0 or ids[-1] >= max(len(ids), len(wanted or [])):
                raise FinetuneError(
                    f"integer labels must be 0..K-1, found {ids[:10]}; re-number them or use string labels"
                )
            self.labels = wanted or [str(i) for i in range(ids[-1] + 1)]
            raw = raw.cast_column("label", ClassLabel(names=self.labels))
        else:
            raw = raw.cast_column("label", Value("string"))
            found = sorted({v for split in raw.values() for v in split.unique("label")})
            if wanted:
                unknown = sorted(set(found) - set(wanted))
                if not set(found) & set(wanted):
                    raise FinetuneError(f"no rows have a label in data.label_names ({', '.join(wanted)}); the labels "
                                        f"are {', '.join(found[:20])}: name those, or drop data.label_names")
                if unknown:
                    log.info("dropping rows labelled %s (not in data.label_names)", unknown)
                    raw = raw.filter(lambda row: row["label"] in wanted)
            self.labels = wanted or found
            raw = raw.cast_column("label", ClassLabel(names=self.labels))
        if "train" in raw and len(present := sorted(set(raw["train"]["label"]))) < 2:
            only = self.labels[present[0]] if present else "none"
            raise FinetuneError(
                f"the label column has one class in the training data ('{only}'); a classifier needs at least two: "
                "check data.label_column"
            )
        return raw

    def tokenize(self, raw: DatasetDict, tokenizer) -> DatasetDict:
        pair = "text_pair" in raw["train"].column_names

        def encode(batch: dict[str, list]) -> dict[str, Any]:
            enc = tokenizer(batch["text"], batch["text_pair"] if pair else None, truncation=True,
                            max_length=self.cfg.max_seq_length)
            enc["length"] = [len(ids) for ids in enc["input_ids"]]
            enc["labels"] = batch["label"]
            return enc

        return raw.map(encode, batched=True, remove_columns=raw["train"].column_names, desc="tokenizing")

    def collator(self, tokenizer):
        from transformers import DataCollatorWithPadding

        return DataCollatorWithPadding(tokenizer)

    def model_kwargs(self) -> dict[str, Any]:
        return {
            "num_labels": len(self.labels),
            "id2label": dict(enumerate(self.labels)),
            "label2id": {name: i for i, name in enumerate(self.labels)},
        }

    def compute_metrics(self, split: str, features: Dataset) -> MetricsFn:
        def fn(pred) -> dict[str, float]:
            logits = pred.predictions[0] if isinstance(pred.predictions, tuple) else pred.predictions
            return classification_metrics(pred.label_ids, np.argmax(logits, axis=-1), self.labels)

        return fn

    def verify(self, model_dir: Path, raw: Dataset) -> dict[str, float]:
        clf = self.load_pipeline(model_dir)
        inputs = progress.bar(self.pipeline_inputs(raw.to_dict()), total=len(raw), desc="pipeline check", unit="rows")
        label2id = clf.model.config.label2id
        preds = np.array([label2id[self.prediction_record(o)["label"]] for o in self.run_pipeline(clf, inputs)])
        return classification_metrics(np.array(list(raw["label"])), preds, self.labels)

    def pipeline_inputs(self, rows: dict[str, list]) -> list:
        if rows.get("text_pair") is not None:
            return [{"text": t, "text_pair": p} for t, p in zip(rows["text"], rows["text_pair"])]
        return list(rows["text"])

    def prediction_record(self, output: list[dict]) -> dict[str, Any]:
        return jsonable({"label": output[0]["label"], "score": output[0]["score"],
                         "scores": {o["label"]: o["score"] for o in output}})

    def from_export(self, model_dir: Path, data_cfg) -> None:
        data_cfg.label_names = exported_labels(model_dir)  # the data's labels encoded in the model's order
