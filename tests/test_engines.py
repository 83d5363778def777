"""Both engines, in-process on the tiny model: the engine interface, best-checkpoint restore, bounded
checkpoints without the Hub token, early stopping, reproducibility, and evaluation of per-token and
multi-output predictions (padded and gathered the Trainer's way)."""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from datasets import Dataset, DatasetDict

from finetune.tasks.base import Task, auto_class
from helpers.cli import compose_cfg
from helpers.data import make_sentences, write_sentiment_csv

pytestmark = pytest.mark.usefixtures("one_thread")
ENGINES = ["hf", "accelerate"]
SECRET = "hf_engine_checkpoint_token_0123456789"
# the tiny model learns the toy sentiment in these settings (test accuracy >= 0.85), so metrics move with training
LEARNING = ["trainer.num_train_epochs=6", "trainer.learning_rate=3e-3", "trainer.per_device_train_batch_size=8",
            "trainer.warmup_ratio=0.1", "trainer.weight_decay=0"]


def prepare(tiny_bert, csv, *overrides):
    import transformers

    from finetune import data
    from finetune.tasks import get_task

    cfg = compose_cfg("task=sentiment", f"model={tiny_bert}", f"data={csv}", "data.text_column=review",
                      "data.label_column=sentiment", *overrides)
    transformers.set_seed(cfg.seed)
    task = get_task(cfg.task)
    raw = data.load(cfg.data, task)
    tokenizer = task.load_tokenizer(str(tiny_bert), cfg.model)
    return cfg, task, tokenizer, task.tokenize(raw, tokenizer)


def train(tiny_bert, csv, out: Path, *overrides):
    """Train like run.py does (seed, then the model, then the engine); returns the engine and its metrics."""
    from finetune.engines import make_engine

    cfg, task, tokenizer, features = prepare(tiny_bert, csv, *overrides)
    model = task.load_model(str(tiny_bert), cfg.model)
    engine = make_engine(cfg, task, model, tokenizer, features, out)
    metrics = engine.train()
    metrics.update(engine.evaluate("test"))
    return engine, metrics


@pytest.fixture(scope="module")
def csv(tmp_path_factory):
    return write_sentiment_csv(tmp_path_factory.mktemp("data") / "reviews.csv")


@pytest.fixture(scope="module", params=ENGINES)
def trained(request, tiny_bert, csv, tmp_path_factory):
    out = tmp_path_factory.mktemp(request.param)
    os.environ["HF_TOKEN"] = SECRET  # what a user with the Hub configured has
    try:
        engine, metrics = train(tiny_bert, csv, out, f"trainer={request.param}", *LEARNING,
                                "trainer.eval_strategy=steps", "trainer.eval_steps=8", "trainer.logging_steps=4",
                                "trainer.save_total_limit=2")
    finally:
        del os.environ["HF_TOKEN"]
    return SimpleNamespace(engine=engine, metrics=metrics, out=out)


def test_engine_interface(trained):
    m = trained.metrics
    assert {"train_runtime", "train_loss", "epoch", "test_loss", "test_accuracy", "test_f1_macro"} <= set(m)
    assert m["test_accuracy"] >= 0.85 and m["test_loss"] < 0.6, m  # it learned (chance: 0.5, 0.69)
    steps = max(entry["step"] for entry in trained.engine.log_history)  # one time per optimizer step, for the bench
    assert len(trained.engine.step_times) == steps and min(trained.engine.step_times) > 0
    validation = trained.engine.evaluate("validation")
    assert validation["validation_accuracy"] >= 0.85 and 0 < validation["validation_loss"] < 0.6, validation
    # the run takes the restored best model's validation scores from the evaluation that chose it: the same numbers
    logged = trained.engine.best_validation()
    assert logged["validation_loss"] == pytest.approx(validation["validation_loss"], rel=1e-5)
    assert logged["validation_accuracy"] == validation["validation_accuracy"]


def test_log_history_is_trainer_format(trained, tmp_path):
    from finetune import report

    history = trained.engine.log_history
    train_logs = [e for e in history if "loss" in e]
    evals = [e for e in history if "eval_loss" in e]
    assert [e["step"] for e in train_logs][:3] == [1, 4, 8]
    assert all({"learning_rate", "epoch"} <= set(e) for e in train_logs)
    assert [e["step"] for e in evals] == list(range(8, 97, 8))
    assert all("eval_accuracy" in e for e in evals)
    assert any("train_loss" in e for e in history)
    report.learning_curve(history, "accuracy", tmp_path / "curve.png")
    assert (tmp_path / "curve.png").read_bytes()[:4] == b"\x89PNG"


def test_best_checkpoint_restored_and_checkpoints_bounded(trained):
    from safetensors.torch import load_file

    evals = [e for e in trained.engine.log_history if "eval_accuracy" in e]
    best = max(evals, key=lambda e: (e["eval_accuracy"], -e["step"]))["step"]  # the first evaluation at the best
    checkpoints = sorted((trained.out / "checkpoints").glob("checkpoint-*"))
    assert len(checkpoints) <= 3  # save_total_limit=2, plus the best when it is older
    assert {f"checkpoint-{best}", "checkpoint-96"} <= {c.name for c in checkpoints}
    saved = load_file(trained.out / "checkpoints" / f"checkpoint-{best}" / "model.safetensors")
    live = trained.engine.model.state_dict()
    assert best != 96 and all(torch.equal(live[k].cpu(), v) for k, v in saved.items())


def test_checkpoints_hold_no_hub_token(trained):
    files = [p for p in (trained.out / "checkpoints").rglob("*") if p.is_file()]
    assert files
    for path in files:
        assert SECRET.encode() not in path.read_bytes(), path


@pytest.mark.parametrize("engine", ENGINES)
def test_early_stopping_after_patience(engine, tiny_bert, csv, tmp_path):
    # learning_rate=0: the validation accuracy never improves, so training stops at the third evaluation
    runner, _ = train(tiny_bert, csv, tmp_path, f"trainer={engine}", "trainer.learning_rate=0", "trainer.max_steps=40",
                      "trainer.eval_strategy=steps", "trainer.eval_steps=2", "trainer.early_stopping_patience=2")
    assert [e["step"] for e in runner.log_history if "eval_loss" in e] == [2, 4, 6]


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.slow
def test_last_step_is_evaluated_and_eval_strategy_no(engine, tiny_bert, csv, tmp_path):
    args = [f"trainer={engine}", "trainer.max_steps=7", "trainer.per_device_train_batch_size=8"]
    runner, _ = train(tiny_bert, csv, tmp_path / "steps", *args, "trainer.eval_strategy=steps", "trainer.eval_steps=3")
    assert [e["step"] for e in runner.log_history if "eval_loss" in e] == [3, 6, 7]  # the last step too, as the Trainer
    runner, metrics = train(tiny_bert, csv, tmp_path / "no", *args, "trainer.eval_strategy=no")
    assert not [e for e in runner.log_history if "eval_loss" in e] and runner.best_validation() is None
    assert not list((tmp_path / "no").rglob("checkpoint-*")) and len(runner.step_times) == 7
    assert "test_accuracy" in metrics


@pytest.mark.parametrize("engine", ENGINES)
def test_each_step_gives_the_heap_its_size_before_it_runs(engine, tiny_bert, csv, tmp_path, monkeypatch):
    from finetune import cpu
    from finetune.training_order import first_epoch

    sizes, before = [], cpu.StepHeap.before
    monkeypatch.setattr(cpu.StepHeap, "before", lambda heap, size: sizes.append(size) or before(heap, size))
    args = [f"trainer={engine}", "trainer.max_steps=5", "trainer.per_device_train_batch_size=4",
            "trainer.gradient_accumulation_steps=2", "trainer.eval_strategy=no"]
    train(tiny_bert, csv, tmp_path, *args)
    # each step's largest micro-batch (rows x its longest example), in the order the engines train
    cfg, _, _, features = prepare(tiny_bert, csv, *args)
    lengths = features["train"]["length"]
    order = first_epoch(features["train"], 4, 2, cfg.seed, max_steps=5)
    steps = [order[i:i + 2] for i in range(0, len(order), 2)]
    assert sizes == [max(len(rows) * max(lengths[i] for i in rows) for rows in step) for step in steps]


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.slow
def test_same_seed_same_metrics(engine, tiny_bert, csv, tmp_path):
    args = [f"trainer={engine}", *LEARNING, "trainer.num_train_epochs=4"]
    first = train(tiny_bert, csv, tmp_path / "a", *args)[1]
    second = train(tiny_bert, csv, tmp_path / "b", *args)[1]
    other_seed = train(tiny_bert, csv, tmp_path / "c", *args, "seed=7")[1]
    scores = [k for k in first if k.startswith("test_") and "runtime" not in k and "per_second" not in k]
    assert {k: first[k] for k in scores} == {k: second[k] for k in scores}
    assert first["train_loss"] == second["train_loss"]
    assert other_seed["test_loss"] != first["test_loss"]  # the metrics do depend on the seed


class _ProbeTask(Task):
    """A minimal task with per-token or two-headed outputs; keeps what compute_metrics receives (the other hooks:
    Task's defaults)."""

    main_metric, greater_is_better = "accuracy", True

    def __init__(self, kind: str):
        super().__init__(None)
        self.kind, self.seen = kind, {}
        self.auto_model = "AutoModelForTokenClassification" if kind == "token" else "AutoModelForQuestionAnswering"

    def features(self, tokenizer) -> DatasetDict:
        texts = [t for t, _ in make_sentences(24, seed=3)]
        enc = tokenizer(texts, truncation=True)
        enc["length"] = [len(ids) for ids in enc["input_ids"]]
        if self.kind == "token":
            enc["labels"] = [[i % 3 for i in range(len(ids))] for ids in enc["input_ids"]]
        else:
            enc["start_positions"] = [1 for _ in texts]
            enc["end_positions"] = [len(ids) - 2 for ids in enc["input_ids"]]
        ds = Dataset.from_dict(dict(enc))
        return DatasetDict(train=ds, validation=ds, test=ds)

    def preprocess_logits(self, logits, labels):
        return logits

    def collator(self, tokenizer):
        from transformers import DataCollatorForTokenClassification, DataCollatorWithPadding

        return DataCollatorForTokenClassification(tokenizer) if self.kind == "token" else DataCollatorWithPadding(tokenizer)

    def compute_metrics(self, split, features):
        def fn(pred):
            self.seen[split] = pred
            return {"accuracy": 0.5}

        return fn


@pytest.mark.parametrize("kind", ["token", "qa"])
def test_per_token_and_multi_head_predictions_match_the_trainer(kind, tiny_bert, tmp_path):
    """Batches of different lengths: per-token logits padded with -100 and put back in dataset order,
    several heads passed as a tuple; the accelerate engine must hand compute_metrics what the Trainer does."""
    from transformers import AutoTokenizer

    from finetune.engines import make_engine

    tokenizer = AutoTokenizer.from_pretrained(tiny_bert)
    seen = {}
    for engine in ENGINES:
        cfg = compose_cfg(f"trainer={engine}", "trainer.max_steps=1", "trainer.per_device_eval_batch_size=5",
                          "trainer.eval_strategy=steps", "trainer.eval_steps=1")
        task = _ProbeTask(kind)
        torch.manual_seed(0)
        model = auto_class(task.auto_model).from_pretrained(tiny_bert, num_labels=3 if kind == "token" else 2)
        runner = make_engine(cfg, task, model, tokenizer, task.features(tokenizer), tmp_path / engine)
        runner.evaluate("test")
        seen[engine] = task.seen["test"]
    hf, acc = seen["hf"], seen["accelerate"]
    lengths = task.features(tokenizer)["test"]["length"]
    if kind == "token":
        assert acc.predictions.shape == (24, max(lengths), 3)
        # evaluated longest first in batches of 5, handed back in dataset order: each row is padded to its batch's end
        order = np.argsort(-np.asarray(lengths), kind="stable")
        batch_end = {int(i): max(lengths[j] for j in order[b:b + 5]) for b in range(0, 24, 5) for i in order[b:b + 5]}
        assert len(set(batch_end.values())) > 1  # some batch is shorter than the longest: its tail is padding
        for i, end in batch_end.items():
            assert (acc.predictions[i, end:] == -100).all() and (acc.predictions[i, :end] != -100).all()
            assert list(acc.label_ids[i, :lengths[i]]) == [t % 3 for t in range(lengths[i])]  # row i is example i
        np.testing.assert_allclose(acc.predictions, hf.predictions, atol=1e-5)
        np.testing.assert_array_equal(acc.label_ids, hf.label_ids)
    else:
        assert isinstance(acc.predictions, tuple) and len(acc.predictions) == 2
        assert isinstance(acc.label_ids, tuple) and len(acc.label_ids) == 2
        for a, h in zip(acc.predictions, hf.predictions):
            np.testing.assert_allclose(a, h, atol=1e-5)
        for a, h in zip(acc.label_ids, hf.label_ids):
            np.testing.assert_array_equal(a, h)
