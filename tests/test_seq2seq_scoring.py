"""Seq2seq training and scoring on tiny random models: label smoothing (the task's loss, both engines, chunked or
the model's own), the distinct-output check and its warning, and generation in the weights' precision after
mixed-precision training."""

from __future__ import annotations

import pytest
from datasets import Dataset

from helpers.cli import prepared
from helpers.seq2seq_models import ROWS, features, write_parallel

pytestmark = pytest.mark.usefixtures("one_thread")
SMALL = (("train", 0, 40), ("val", 40, 50), ("test", 50, 60))


def smoothing_setup(model, tmp_path, *overrides):
    """The task, its model and one batch of all the training pairs, as the engines collate them."""
    data_dir = write_parallel(tmp_path / "data", ROWS[:60], SMALL)
    cfg, task, tokenizer, features, model = prepared(
        "task=translation", f"model={model}", f"data={data_dir}", "trainer.learning_rate=0", "trainer.max_steps=1",
        "trainer.per_device_train_batch_size=64", "trainer.eval_strategy=no", "trainer.report_to=[]", *overrides)
    train = features["train"].remove_columns("length")
    batch = task.collator(tokenizer)([train[i] for i in range(len(train))])
    return cfg, task, tokenizer, features, model, batch


@pytest.mark.parametrize("family", ["t5", "llama"])
def test_label_smoothing_is_cross_entropy_with_label_smoothing(family, s2s_models, tmp_path):
    import torch
    import torch.nn.functional as F

    from omegaconf import OmegaConf

    from finetune.lm_loss import token_cross_entropy

    cfg, task, _, features_, model, batch = smoothing_setup(s2s_models[family], tmp_path, "trainer.lm_loss_chunk_size=0")
    with torch.no_grad():
        outputs = model(**batch)
    logits, labels = outputs.logits, batch["labels"]
    if family == "llama":  # a causal LM: position t predicts token t + 1
        logits, labels = logits[:, :-1], labels[:, 1:]
    expected = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100, label_smoothing=0.1)
    items = task.items(batch)
    assert token_cross_entropy(outputs.logits, batch["labels"], 0.0, task.label_shift, items).item() == \
        pytest.approx(outputs.loss.item(), rel=1e-6)  # 0: the model's own loss
    assert token_cross_entropy(outputs.logits, batch["labels"], 0.1, task.label_shift, items).item() == \
        pytest.approx(expected.item(), rel=1e-6)
    assert abs(expected.item() - outputs.loss.item()) > 1e-3
    # the task's objective smooths in training only (its model has no dropout: training mode computes the same)
    task.prepare_training(model, OmegaConf.merge(cfg.trainer, {"label_smoothing": 0.1}), features_)
    with torch.no_grad():
        assert task.loss(model.train(), batch, items)[0].item() == pytest.approx(expected.item(), rel=1e-6)
        assert task.loss(model.eval(), batch, items)[0].item() == pytest.approx(outputs.loss.item(), rel=1e-6)


@pytest.mark.parametrize("chunk", ["512", "0"])  # the chunked LM loss smooths in the forward, the model's own: the task
@pytest.mark.parametrize("engine", ["hf", "accelerate"])
def test_both_engines_train_on_the_smoothed_loss_and_evaluate_the_plain_one(engine, chunk, s2s_models, tmp_path):
    import torch

    from finetune.engines import make_engine

    cfg, task, tokenizer, features, model, batch = smoothing_setup(s2s_models["t5"], tmp_path, f"trainer={engine}",
                                                                   "trainer.label_smoothing=0.2",
                                                                   f"trainer.lm_loss_chunk_size={chunk}")
    from finetune.lm_loss import token_cross_entropy

    with torch.no_grad():  # one step of all pairs, at rate 0
        expected = token_cross_entropy(model(**batch).logits, batch["labels"], 0.2, task.label_shift,
                                       task.items(batch)).item()
    trained = make_engine(cfg, task, model, tokenizer, features, tmp_path / "out")
    assert trained.train()["train_loss"] == pytest.approx(expected, rel=1e-4)
    with torch.no_grad():
        plain = model(**task.collator(tokenizer)([{k: v for k, v in r.items() if k != "length"}
                                                  for r in features["test"]])).loss.item()
    assert trained.evaluate("test")["test_loss"] == pytest.approx(plain, rel=1e-4)


def test_distinct_outputs_and_the_warning_when_most_outputs_repeat(s2s_models, monkeypatch, caplog):
    import logging

    from finetune.pipelines import seq2seq as s2s

    task, tokenizer, _, cfg = features(s2s_models["t5"])
    model = task.load_model(s2s_models["t5"], cfg.model)
    assert task.scores(["ein mann", "ein mann", "eine frau", "ein hund"], [["x"]] * 4)["distinct_outputs"] == 0.75
    sources = [s for s, _ in ROWS[:10]]
    references = [[t] for _, t in ROWS[:10]]
    task.raw, task._inputs = {"test": Dataset.from_dict({"source": sources, "references": references})}, {}
    same = tokenizer("ein mann", add_special_tokens=False)["input_ids"]
    monkeypatch.setattr(s2s, "generate", lambda model, tok, inputs, batch: [same] * 6 + [[5], [6], [7], [8]])
    with caplog.at_level(logging.WARNING, logger="finetune.tasks.seq2seq"):
        scores = task.evaluate_model(model, "test")
    assert scores["distinct_outputs"] == 0.5 and not caplog.records  # half: no warning
    monkeypatch.setattr(s2s, "generate", lambda model, tok, inputs, batch: [same] * (len(inputs) - 1) + [[5]])
    with caplog.at_level(logging.WARNING, logger="finetune.tasks.seq2seq"):
        assert task.evaluate_model(model, "test")["distinct_outputs"] == 0.2
    (record,) = caplog.records
    assert record.getMessage().startswith("only 2 of the 10 test outputs are distinct (20%): the model writes the same")


def test_seq2seq_generates_in_the_weights_precision_after_mixed_precision_training(s2s_models, monkeypatch):
    """As task=generation's test: accelerate's bf16 autocast forward must not generate the scores the exported fp32
    pipeline has to reproduce; training goes on in mixed precision afterwards."""
    import torch
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    from finetune.pipelines import seq2seq as s2s

    task, _, row, cfg = features(s2s_models["t5"])
    torch.manual_seed(0)
    plain = task.load_model(s2s_models["t5"], cfg.model).eval()
    AcceleratorState._reset_state(reset_partial_state=True)  # the process-wide state earlier tests set (fp32)
    try:
        wrapped = Accelerator(cpu=True, mixed_precision="bf16").prepare(task.load_model(s2s_models["t5"], cfg.model))
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    ids = {"input_ids": torch.tensor([row["input_ids"]]), "decoder_input_ids": torch.tensor([[0, *row["labels"]]])}

    def logits(model):
        with torch.inference_mode():
            return model(**ids).logits

    assert not torch.equal(logits(wrapped), logits(plain))  # computed in bf16
    seen, real = [], s2s.generate
    monkeypatch.setattr(s2s, "generate", lambda model, *a: seen.append(torch.equal(logits(model), logits(plain)))
                        or real(model, *a))
    task.raw, task._inputs = {"test": Dataset.from_dict({"source": ["a man runs"], "references": [["x"]]})}, {}
    task.evaluate_model(wrapped, "test")
    assert seen == [True]
    assert not torch.equal(logits(wrapped), logits(plain))  # the autocast forward is back for training
