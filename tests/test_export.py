"""Export is atomic and verified: a pipeline that disagrees with the trainer fails the run."""

import os
import stat
from pathlib import Path
from types import SimpleNamespace

import pytest

from finetune.export import VerificationError, export, verify
from finetune.tasks import get_task
from finetune.tasks.base import Task
from helpers.cli import compose_cfg


class _Task(Task):
    """The task interface's defaults, with a scripted pipeline score and export step."""

    main_metric = "accuracy"
    pipeline_task = "text-classification"
    columns: dict = {}

    def __init__(self, score=0.9, fail=False):
        super().__init__(SimpleNamespace(max_seq_length=128))
        self.score, self.fail = score, fail

    def verify(self, model_dir, raw):
        return {"accuracy": self.score}

    def export(self, tmp: Path):
        (tmp / "extra.txt").write_text("x")
        if self.fail:
            raise RuntimeError("disk full")


def test_verify_accepts_within_tolerance_and_fails_loudly_outside():
    assert verify(_Task(0.903), Path("."), None, {"test_accuracy": 0.9}, 0.005) == {"pipeline_test_accuracy": 0.903}
    with pytest.raises(VerificationError, match="pipeline scores test accuracy=0.8000 but the trainer measured 0.9000"):
        verify(_Task(0.8), Path("."), None, {"test_accuracy": 0.9}, 0.005)


def test_export_is_atomic(tmp_path, tiny_bert):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    cfg = compose_cfg(f"model={tiny_bert}")
    model = AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=2)
    tokenizer = AutoTokenizer.from_pretrained(tiny_bert)
    target = tmp_path / "model"
    with pytest.raises(RuntimeError, match="disk full"):
        export(model, tokenizer, _Task(fail=True), cfg, {}, target)
    assert list(tmp_path.iterdir()) == []  # nothing half-written
    before = os.umask(0o027)
    try:
        export(model, tokenizer, _Task(), cfg, {"test_accuracy": 0.5}, target)
    finally:
        os.umask(before)
    assert (target / "model.safetensors").is_file() and (target / "extra.txt").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["model"]
    # the umask's permissions (a temp dir alone would be 0700, safetensors files 0600)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in [target, *target.rglob("*")]}
    assert modes.pop("model") == 0o750 and set(modes.values()) == {0o640}, modes


def test_classification_round_trip_through_pipeline(tmp_path, tiny_bert):
    """The task's own verify() re-scores through transformers.pipeline exactly like the Trainer's argmax."""
    import numpy as np
    from datasets import ClassLabel, Dataset
    from transformers import AutoModelForSequenceClassification

    cfg = compose_cfg(f"model={tiny_bert}")
    task = get_task(cfg.task)
    task.labels = ["neg", "pos"]
    model = AutoModelForSequenceClassification.from_pretrained(tiny_bert, **task.model_kwargs()).eval()
    tokenizer = task.load_tokenizer(str(tiny_bert), cfg.model)
    raw = Dataset.from_dict({"text": ["great film", "dull plot", "the acting was superb"] * 4,
                             "label": [1, 0, 1] * 4}).cast_column("label", ClassLabel(names=task.labels))
    export(model, tokenizer, task, cfg, {}, tmp_path / "model")
    scores = task.verify(tmp_path / "model", raw)
    import torch

    with torch.no_grad():
        logits = model(**tokenizer(list(raw["text"]), return_tensors="pt", padding=True)).logits.numpy()
    expected = float(np.mean(np.argmax(logits, -1) == np.array(list(raw["label"]))))
    assert scores["accuracy"] == pytest.approx(expected)
