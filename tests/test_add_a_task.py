"""docs/architecture.md's add-a-task recipe, proven: a task defined here, outside the package -- its schemas, its
class with its own objective, a yaml in a config directory of its own -- trains, exports and is verified through
its pipeline by run.py on both engines, with nothing in finetune/ edited."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest

from finetune.config import DataConfig, TaskConfig
from finetune.tasks.base import Task
from helpers.cli import compose_cfg

pytestmark = pytest.mark.usefixtures("one_thread")

TASK_YAML = """# @package _global_
defaults:
  - /schema/task/word_count@task
  - /schema/data/word_count@data
  - _self_
task:
  name: word_count
"""


@dataclass
class WordCountConfig(TaskConfig):
    max_seq_length: int = 32


@dataclass
class WordCountData(DataConfig):
    text_column: str = "text"


class WordCountTask(Task):
    """How often a text says "great": a regression head, trained on the absolute error (the task's own objective)."""

    name = "word_count"
    schema, data_schema = WordCountConfig, WordCountData
    pipeline_task = "text-classification"
    main_metric = "mae"
    greater_is_better = False
    auto_model = "AutoModelForSequenceClassification"
    columns = {"text": "text_column"}
    input_columns = ("text",)
    verify_tolerance = 1e-3
    losses = 0  # calls of loss(), in training and evaluation

    def tokenize(self, raw, tokenizer):
        def encode(batch):
            enc = tokenizer(batch["text"], truncation=True, max_length=self.cfg.max_seq_length)
            enc["labels"] = [float(text.split().count("great")) for text in batch["text"]]
            enc["length"] = [len(ids) for ids in enc["input_ids"]]
            return enc

        return raw.map(encode, batched=True, remove_columns=raw["train"].column_names)

    def collator(self, tokenizer):
        from transformers import DataCollatorWithPadding

        return DataCollatorWithPadding(tokenizer)

    def model_kwargs(self):
        return {"num_labels": 1, "problem_type": "regression"}

    def loss(self, model, batch, num_items):
        type(self).losses += 1
        outputs = model(**{k: v for k, v in batch.items() if k != "labels"})
        return (outputs.logits.squeeze(-1) - batch["labels"]).abs().sum() / num_items, outputs

    def compute_metrics(self, split, features):
        return lambda pred: {"mae": float(np.abs(pred.predictions.reshape(-1) - pred.label_ids).mean())}

    def verify(self, model_dir, raw):
        pipe = self.load_pipeline(model_dir)
        scores = [out["score"] for out in pipe(list(raw["text"]), function_to_apply="none")]
        return {"mae": float(np.mean([abs(s - t.split().count("great")) for s, t in zip(scores, raw["text"])]))}


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["hf", "accelerate"])
def test_a_task_defined_outside_the_package_trains_exports_and_verifies(engine, tiny_bert, tmp_path):
    import pandas as pd

    from finetune.run import run

    (tmp_path / "configs" / "task").mkdir(parents=True)
    (tmp_path / "configs" / "task" / "word_count.yaml").write_text(TASK_YAML)
    rng = np.random.default_rng(0)
    words = ["great", "film", "plot", "the", "cast", "was", "dull", "story"]
    texts = [" ".join(rng.choice(words, size=rng.integers(1, 9))) for _ in range(160)]
    pd.DataFrame({"text": texts}).to_csv(tmp_path / "texts.csv", index=False)
    cfg = compose_cfg("task=word_count", f"model={tiny_bert}", f"data={tmp_path / 'texts.csv'}",
                      f"hydra.searchpath=[file://{tmp_path / 'configs'}]", f"trainer={engine}",
                      "trainer.num_train_epochs=8", "trainer.learning_rate=3e-3", "trainer.per_device_train_batch_size=16",
                      "trainer.report_to=[]")
    WordCountTask.losses = 0
    metrics = run(cfg, tmp_path / "run")
    assert WordCountTask.losses > 0  # the engine trained and evaluated with the task's objective
    counts = [t.split().count("great") for t in texts]
    guess = np.mean(np.abs(np.array(counts) - np.median(counts)))  # the least error of a constant answer
    assert metrics["test_mae"] < 0.8 * guess
    assert abs(metrics["pipeline_test_mae"] - metrics["test_mae"]) < 1e-3
    assert (tmp_path / "run" / "model" / "model.safetensors").is_file()
