"""task=classification's multi-label and regression runs end to end on the tiny model: the thresholds tuned on the
validation split travel through the export into its pipeline, finetune.predict and finetune.evaluate; a regression
on text pairs; both engines, LoRA, a resumed run."""

from __future__ import annotations

import json
import random

import numpy as np
import pandas as pd
import pytest

from helpers.data import FILLER, NEGATIVE, POSITIVE
from helpers.cli import cli_main

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.slow]  # each test is a real run
TRAIN = ["trainer.num_train_epochs=4", "trainer.learning_rate=1e-2", "trainer.per_device_train_batch_size=16",
         "trainer.warmup_ratio=0.0", "trainer.logging_steps=5", "trainer.report_to=[]"]


def tagged(n: int, seed: int) -> pd.DataFrame:
    """Texts with a positive word (label good, most rows) and / or a negative one (label bad, a fifth of them)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        tags = [t for t, p in (("good", 0.6), ("bad", 0.35)) if rng.random() < p]
        words = rng.sample(FILLER, rng.randint(3, 7)) + [rng.choice(POSITIVE if t == "good" else NEGATIVE) for t in tags]
        rng.shuffle(words)
        rows.append((" ".join(words), ",".join(tags)))
    return pd.DataFrame(rows, columns=["text", "tags"])


def scored(n: int, seed: int) -> pd.DataFrame:
    """Sentence pairs scored by how many positive words the first holds (0-3), plus noise."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        k = rng.randint(0, 3)
        words = rng.sample(FILLER, 4) + rng.sample(POSITIVE, k)
        rng.shuffle(words)
        rows.append((" ".join(words), " ".join(rng.sample(FILLER, 3)), k + rng.random() / 4))
    return pd.DataFrame(rows, columns=["first", "second", "similarity"])


def _run(args, tmp_path, monkeypatch, capfd):
    code, _, err = cli_main(args, tmp_path, monkeypatch, capfd)
    assert code == 0, err[-3000:]
    (run,) = (tmp_path / "runs" / "classification").iterdir()
    return run, json.loads((run / "metrics.json").read_text())


def test_multi_label_thresholds_travel_from_validation_to_export_pipeline_predict_and_evaluate(
        tiny_bert, tmp_path, monkeypatch, capfd):
    from transformers import pipeline

    from finetune import evaluate, predict

    (tmp_path / "data").mkdir()
    tagged(480, 0).to_csv(tmp_path / "data" / "train.csv", index=False)
    tagged(60, 1).to_csv(tmp_path / "data" / "test.csv", index=False)
    steady = [o.replace("learning_rate=1e-2", "learning_rate=3e-3") for o in TRAIN]
    run, metrics = _run(["task=classification", f"model={tiny_bert}", "data=data", "data.label_column=tags", *steady],
                        tmp_path, monkeypatch, capfd)
    assert "problem type: multi_label (labels such as" in (run / "finetune.log").read_text()
    for key in ("f1_macro", "f1_micro", "f1_samples", "exact_match", "f1_macro_at_0.5", "f1_bad", "recall_good"):
        assert f"test_{key}" in metrics and f"validation_{key}" in metrics
    assert metrics["test_f1_macro"] == pytest.approx(metrics["pipeline_test_f1_macro"], abs=1e-9)
    assert metrics["test_f1_macro"] > 0.7  # learned

    model = run / "model"
    config = json.loads((model / "config.json").read_text())
    assert config["problem_type"] == "multi_label_classification" and config["finetune"]["main_metric"] == "f1_macro"
    thresholds = config["decision_thresholds"]
    assert set(thresholds) == {"bad", "good"} and all(0 < t < 1 for t in thresholds.values())
    assert (model / "multi_label.py").is_file() and "| bad | " in (model / "README.md").read_text()

    texts = list(tagged(30, 2)["text"])
    probabilities = pipeline("text-classification", model=str(model), top_k=None)(texts)  # plain: no remote code
    expected = [sorted(d["label"] for d in row if d["score"] >= thresholds[d["label"]]) for row in probabilities]
    pd.DataFrame({"text": texts}).to_csv(tmp_path / "new.csv", index=False)
    monkeypatch.chdir(tmp_path)
    predict.main([str(run), "new.csv", "--output", "out.jsonl"])  # (exits only on an error)
    out = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [sorted(r["labels"]) for r in out] == expected
    for record, row in zip(out, probabilities):
        assert record["scores"] == pytest.approx({d["label"]: d["score"] for d in row}, abs=1e-6)
    assert any(r["labels"] for r in out) and any(len(r["labels"]) < 2 for r in out)
    shipped = pipeline(model=str(model), trust_remote_code=True)
    assert shipped(texts[0], thresholds=0.0)["labels"] == sorted(thresholds, key=lambda n: -out[0]["scores"][n])

    result = evaluate.evaluate(run, [f"data={tmp_path / 'data' / 'test.csv'}"], tmp_path / "eval.json")
    assert result["f1_macro"] == pytest.approx(metrics["pipeline_test_f1_macro"])


@pytest.mark.parametrize("setup", [["trainer=accelerate"], ["peft=lora"]], ids=["accelerate", "lora"])
def test_regression_on_text_pairs(setup, tiny_bert, tmp_path, monkeypatch, capfd):
    from transformers import pipeline

    from finetune import predict

    scored(200, 0).to_csv(tmp_path / "pairs.csv", index=False)
    run, metrics = _run(["task=classification", f"model={tiny_bert}", "data=pairs.csv", "data.text_column=first",
                         "data.text_pair_column=second", "data.label_column=similarity", "task.regression_loss=huber",
                         *TRAIN, "trainer.num_train_epochs=3", *setup], tmp_path, monkeypatch, capfd)
    for key in ("pearson", "spearman", "mse", "mae"):
        assert metrics[f"test_{key}"] == pytest.approx(metrics[f"pipeline_test_{key}"], abs=1e-5)
    if setup == ["trainer=accelerate"]:  # (LoRA on the tiny model learns more slowly than these 30 steps)
        assert metrics["test_pearson"] > 0.8
    config = json.loads((run / "model" / "config.json").read_text())
    assert config["problem_type"] == "regression" and config["id2label"] == {"0": "similarity"}
    assert 0 <= config["label_range"][0] < 0.25 and 3 <= config["label_range"][1] < 3.25
    pairs = scored(5, 3)
    direct = pipeline("text-classification", model=str(run / "model"))(
        [{"text": a, "text_pair": b} for a, b in zip(pairs["first"], pairs["second"])])  # the score, no sigmoid
    pairs.to_csv(tmp_path / "new.csv", index=False)
    monkeypatch.chdir(tmp_path)
    predict.predict(predict._task_of(str(run))[0], run / "model", tmp_path / "new.csv",
                    {"text": "first", "text_pair": "second"}, tmp_path / "out.jsonl")
    out = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [r["score"] for r in out] == pytest.approx([d["score"] for d in direct], abs=1e-5)
    assert len({round(r["score"], 6) for r in out}) > 1


def test_a_resumed_multi_label_run_tunes_the_same_thresholds(tiny_bert, tmp_path, monkeypatch, capfd):
    """The thresholds come from the restored model's own validation predictions, not from state kept in memory
    while training: a run stopped after training and resumed exports what it would have."""
    from finetune import export as export_module

    tagged(200, 4).to_csv(tmp_path / "tags.csv", index=False)
    args = ["task=classification", f"model={tiny_bert}", "data=tags.csv", "data.label_column=tags", *TRAIN,
            "task.thresholds=global", "task.pos_weight=auto"]
    seen = {}

    def stop(model, tokenizer, task, cfg, metrics, target):  # the first run stops where it would export
        seen.update(metrics=dict(metrics), thresholds=list(task.thresholds))
        raise RuntimeError("stopped before the export")

    with monkeypatch.context() as m:
        m.setattr("finetune.run.export", stop)
        code, _, _ = cli_main(args, tmp_path, monkeypatch, capfd)
    assert code != 0 and seen
    (run,) = (tmp_path / "runs" / "classification").iterdir()
    _, metrics = _run([*args, f"resume={run}"], tmp_path, monkeypatch, capfd)
    config = json.loads((run / "model" / "config.json").read_text())
    assert list(config["decision_thresholds"].values()) == pytest.approx(seen["thresholds"])
    assert len(set(seen["thresholds"])) == 1  # global: one for every label
    for key in ("test_f1_macro", "test_f1_micro", "test_f1_macro_at_0.5", "validation_f1_macro"):
        assert metrics[key] == pytest.approx(seen["metrics"][key])
    assert export_module.read_record(run / "model")["task"]["thresholds"] == "global"
    assert np.isfinite(metrics["pipeline_test_f1_macro"])


def test_a_new_multi_label_head_starts_at_the_labels_prior_and_a_trained_one_is_kept(tiny_bert, tmp_path):
    import torch
    from transformers import AutoModelForSequenceClassification

    from finetune.tasks.classification_labels import start_at_prior

    odds = np.log(np.array([0.6 / 0.4, 0.05 / 0.95]))
    model = AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=2)
    start_at_prior(model, odds)
    assert model.classifier.bias.detach().numpy() == pytest.approx(odds, abs=1e-6)
    model.save_pretrained(tmp_path)  # a fine-tuned head: loaded, not new
    trained = AutoModelForSequenceClassification.from_pretrained(tmp_path)
    with torch.no_grad():
        trained.classifier.bias.zero_()
    start_at_prior(trained, odds)
    assert trained.classifier.bias.abs().max().item() == 0
