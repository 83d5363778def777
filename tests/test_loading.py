"""Loading checkpoints as a run does: one plain line for the head that is new by design (no transformers load-report
table), a warning for anything else missing or mismatched; the best checkpoint of a model with tied embeddings
restored without a false "missing keys" warning; a generation export keeping the checkpoint's own length limit."""

from __future__ import annotations

import json
import logging

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from helpers.cli import compose_cfg, engine_for
from helpers.models import build_tiny_lm

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def logs(caplog):
    """Every log record, transformers' included (a run propagates them to its console and log file)."""
    transformers.utils.logging.enable_propagation()
    caplog.set_level(logging.INFO)
    yield caplog
    transformers.utils.logging.disable_propagation()


def load(model_dir, *overrides, labels=("neg", "pos")):
    from finetune.tasks import get_task

    cfg = compose_cfg(f"model={model_dir}", *overrides)
    task = get_task(cfg.task)
    task.labels = list(labels)
    return task.load_model(str(model_dir), cfg.model)


def lines(caplog) -> list[tuple[str, int, str]]:
    return [(r.name, r.levelno, r.getMessage()) for r in caplog.records]


def test_a_new_head_is_one_plain_info_line(tiny_bert, logs):
    load(tiny_bert, "task=sentiment")
    load(tiny_bert, "task=ner", labels=("O", "B-PER", "I-PER"))
    records = [r for r in lines(logs) if "Loading weights" not in r[2]]
    assert records == [
        ("finetune.load", logging.INFO, "new classification head: 2 labels (classifier)"),
        ("finetune.load", logging.INFO, "new token-classification head: 3 labels (classifier); "
                                   "not used from the checkpoint: pooler.dense"),  # the token head has no pooler
    ], records


def test_a_head_of_another_shape_is_a_warning(tiny_bert, tmp_path, logs):
    three = tmp_path / "three"  # a classifier of another label count, fine-tuned again on two labels
    load(tiny_bert, "task=sentiment", labels=("a", "b", "c")).save_pretrained(three)
    transformers.AutoTokenizer.from_pretrained(tiny_bert).save_pretrained(three)
    logs.clear()
    load(three, "task=sentiment")
    assert [r for r in lines(logs) if r[1] >= logging.WARNING  # (transformers' config warns of the label count first)
            and r[0] != "transformers.configuration_utils"] == [
        ("finetune.load", logging.WARNING, "new classification head: 2 labels (classifier); another shape in the "
                                      "checkpoint, initialized new: classifier.bias (3,) -> (2,), classifier.weight "
                                      "(3, 32) -> (2, 32)")]


def test_missing_body_weight_is_a_warning(tiny_bert, tmp_path, logs):
    import shutil

    holed = shutil.copytree(tiny_bert, tmp_path / "holed")
    weights = load_file(holed / "model.safetensors")
    del weights["encoder.layer.1.output.dense.weight"]
    save_file(weights, holed / "model.safetensors", metadata={"format": "pt"})
    load(holed, "task=sentiment")
    assert [r for r in lines(logs) if r[1] >= logging.WARNING] == [
        ("finetune.load", logging.WARNING, "new classification head: 2 labels (classifier); not in the checkpoint, "
                                      "initialized new and trained: bert.encoder.layer.1.output.dense")]


@pytest.fixture(scope="module")
def tied_llama(tmp_path_factory):
    """A tiny Llama with tied input and output embeddings (as SmolLM2), its tokenizer declaring 256 positions."""
    return build_tiny_lm(tmp_path_factory.mktemp("tied-llama"), max_length=256)


@pytest.mark.parametrize("engine", ["hf", "accelerate"])
@pytest.mark.parametrize("best", [2, 4])
def test_best_checkpoint_of_a_tied_model_restores_without_missing_keys(engine, best, tied_llama, tmp_path, logs,
                                                                        monkeypatch):
    from finetune.tasks.generation import GenerationTask

    # perplexity falls over these 4 steps: counting a higher one as better makes step 2's checkpoint the best
    monkeypatch.setattr(GenerationTask, "greater_is_better", best == 2)
    text = tmp_path / "text.txt"
    text.write_text("\n".join(" ".join(["to", "be", "or", "not", "that", "is", "the", "question"][i % 8:]) * 3
                              for i in range(40)))
    trainer = engine_for(tmp_path / "run", "task=generation", f"model={tied_llama}", f"data={text}",
                         f"trainer={engine}", "task.block_size=16", "trainer.max_steps=4",
                         "trainer.per_device_train_batch_size=4", "trainer.eval_strategy=steps", "trainer.eval_steps=2",
                         "trainer.report_to=[]", "task.eval_prompts=0")
    logs.clear()
    reloads = []
    load_state_dict = torch.nn.Module.load_state_dict
    monkeypatch.setattr(torch.nn.Module, "load_state_dict", lambda *a, **k: reloads.append(1) or load_state_dict(*a, **k))
    trainer.train()
    assert trainer.best_validation() is not None
    assert not [r for r in lines(logs) if "missing" in r[2].lower() or "unexpected" in r[2].lower()], lines(logs)
    model = trainer.model
    assert model.lm_head.weight is model.model.embed_tokens.weight  # still tied
    # the model holds the best checkpoint's weights; the last one's are already there, so only an earlier one is
    # loaded (a reload maps a second copy of the weights: the peak of a run whose best is its last)
    saved = load_file(tmp_path / "run" / "checkpoints" / f"checkpoint-{best}" / "model.safetensors")
    weights = model.state_dict()
    assert all(torch.equal(weights[k], v) for k, v in saved.items())
    assert bool(reloads) == (best == 2)


def test_a_really_missing_key_of_the_best_checkpoint_is_still_a_warning(tied_llama, logs):
    from torch.nn.modules.module import _IncompatibleKeys

    from finetune.engines.hf import _Trainer

    trainer = _Trainer.__new__(_Trainer)  # (only its model is read)
    trainer.model = transformers.AutoModelForCausalLM.from_pretrained(tied_llama)
    loaded = _IncompatibleKeys(["lm_head.weight", "model.norm.weight"], [])
    trainer._issue_warnings_after_load(loaded)  # the tied head is not missing, the norm is
    assert [r[2] for r in lines(logs) if r[1] >= logging.WARNING] == [
        "There were missing keys in the checkpoint model loaded: ['model.norm.weight']."]


def test_a_generation_tokenizer_keeps_the_checkpoints_length_limit(tied_llama, tiny_bert):
    from finetune.tasks import get_task

    cfg = compose_cfg("task=generation", f"model={tied_llama}", "task.block_size=32")
    assert get_task(cfg.task).load_tokenizer(str(tied_llama), cfg.model).model_max_length == 256  # not 32
    cfg = compose_cfg("task=sentiment", f"model={tiny_bert}", "task.max_seq_length=64")
    assert get_task(cfg.task).load_tokenizer(str(tiny_bert), cfg.model).model_max_length == 64  # truncates as trained
