"""trainer.new_parameters_lr_scale: the parameters from_pretrained initialized (the tiny BERT's new classifier) train
in optimizer groups of their own at scale x the learning rate, on both engines, with the weight-decay split kept, the
schedule applied to every group, through a checkpoint and resume, and with LoRA."""

from __future__ import annotations

import pytest
import torch

from finetune.errors import FinetuneError
from helpers import cli
from helpers.cli import compose_cfg, prepared
from helpers.data import write_sentiment_csv

pytestmark = pytest.mark.usefixtures("one_thread")
SCALE = 10.0
FAST = ["trainer.learning_rate=1e-3", "trainer.per_device_train_batch_size=16", "trainer.warmup_ratio=0",
        "trainer.max_steps=8", "trainer.eval_strategy=steps", "trainer.eval_steps=4", "trainer.logging_steps=4",
        "trainer.report_to=[]", f"trainer.new_parameters_lr_scale={SCALE}"]


@pytest.fixture(scope="module")
def csv(tmp_path_factory):
    return write_sentiment_csv(tmp_path_factory.mktemp("data") / "reviews.csv", 96)


def sentiment(tiny_bert, csv) -> list[str]:
    return ["task=sentiment", f"model={tiny_bert}", f"data={csv}", "data.text_column=review",
            "data.label_column=sentiment", *FAST]


def build(tiny_bert, csv, *overrides):
    """What run.py builds before the engine: config, task, tokenizer, features and the (wrapped) model."""
    return prepared(*sentiment(tiny_bert, csv), *overrides)


def engine_for(tiny_bert, csv, out, *overrides):
    return cli.engine_for(out, *sentiment(tiny_bert, csv), *overrides)


def optimizer_of(engine):
    if hasattr(engine, "trainer"):
        trainer = engine.trainer
        trainer.create_optimizer()  # what train() builds first
        return trainer.optimizer, trainer.model
    return engine.optimizer, engine.model


def groups_by_name(optimizer, model) -> list[tuple[float, float, set[str]]]:
    names = {id(p): n for n, p in model.named_parameters()}
    return [(g["lr"], g["weight_decay"], {names[id(p)] for p in g["params"]}) for g in optimizer.param_groups]


def test_new_parameters_are_the_new_head_and_under_lora_its_trained_copy(tiny_bert, csv):
    from transformers import BertConfig, BertForSequenceClassification

    from finetune import adapters

    assert adapters.new_parameters(build(tiny_bert, csv)[-1]) == {"classifier.weight", "classifier.bias"}
    wrapped = build(tiny_bert, csv, "peft=lora")[-1]
    new = adapters.new_parameters(wrapped)
    # the trained copy of the head, not the frozen original it replaces, nor the LoRA weights
    assert new == {"base_model.model.classifier.modules_to_save.default.weight",
                   "base_model.model.classifier.modules_to_save.default.bias"}
    assert all(p.requires_grad for n, p in wrapped.named_parameters() if n in new)
    built = BertForSequenceClassification(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2))
    assert adapters.new_parameters(built) == set()  # not loaded from a checkpoint: nothing is new


@pytest.mark.parametrize("engine", ["hf", "accelerate"])
def test_only_the_new_parameters_get_the_scaled_rate_and_keep_the_decay_split(engine, tiny_bert, csv, tmp_path):
    trained = engine_for(tiny_bert, csv, tmp_path, f"trainer={engine}")
    groups = groups_by_name(*optimizer_of(trained))
    lr = 1e-3
    assert [(g[0], g[1]) for g in groups] == [(lr, 0.01), (lr, 0.0), (lr * SCALE, 0.01), (lr * SCALE, 0.0)]
    assert groups[2][2] == {"classifier.weight"} and groups[3][2] == {"classifier.bias"}
    assert not {"classifier.weight", "classifier.bias"} & (groups[0][2] | groups[1][2])
    assert any("LayerNorm" in n for n in groups[1][2]) and not any("LayerNorm" in n for n in groups[0][2])
    plain = engine_for(tiny_bert, csv, tmp_path / "plain", f"trainer={engine}", "trainer.new_parameters_lr_scale=1")
    assert [(g[0], g[1]) for g in groups_by_name(*optimizer_of(plain))] == [(lr, 0.01), (lr, 0.0)]


@pytest.mark.parametrize("engine", ["hf", "accelerate"])
@pytest.mark.slow
def test_the_schedule_scales_every_group_and_a_resumed_run_restores_them(engine, tiny_bert, csv, tmp_path):
    first = engine_for(tiny_bert, csv, tmp_path / "a", f"trainer={engine}")
    first.train()
    checkpoint = tmp_path / "a" / "checkpoints" / "checkpoint-4"
    saved = torch.load(checkpoint / ("optimizer.pt" if engine == "hf" else "optimizer.bin"), weights_only=True)
    lrs = [g["lr"] for g in saved["param_groups"]]
    assert lrs[0] == pytest.approx(1e-3 * 4 / 8)  # linear decay, halfway: every group, the new ones at 10 x
    assert lrs == pytest.approx([lrs[0], lrs[0], SCALE * lrs[0], SCALE * lrs[0]])
    resumed = engine_for(tiny_bert, csv, tmp_path / "a", f"trainer={engine}")
    resumed.train(resume_from=checkpoint)
    optimizer, model = (resumed.trainer.optimizer, resumed.trainer.model) if engine == "hf" else (resumed.optimizer,
                                                                                                  resumed.model)
    assert [len(g[2]) for g in groups_by_name(optimizer, model)] == [len(g) for g in
                                                                     (saved["param_groups"][i]["params"]
                                                                      for i in range(4))]
    for name, value in first.model.state_dict().items():  # the same end as the run that was not interrupted
        assert torch.allclose(value, resumed.model.state_dict()[name], atol=1e-6), name


def test_lora_trains_the_new_head_at_the_scaled_rate(tiny_bert, csv, tmp_path):
    trained = engine_for(tiny_bert, csv, tmp_path, "trainer=accelerate", "peft=lora")
    groups = groups_by_name(*optimizer_of(trained))
    assert [g[0] for g in groups] == [1e-3, 1e-3, 1e-3 * SCALE, 1e-3 * SCALE]
    assert all(".modules_to_save." in n for g in groups[2:] for n in g[2])
    assert any("lora_A" in n for n in groups[0][2] | groups[1][2])


@pytest.mark.parametrize("value", ["0", "-1"])
def test_scale_must_be_positive(value):
    from finetune import validate

    with pytest.raises(FinetuneError, match="new_parameters_lr_scale must be above 0"):
        validate.trainer(compose_cfg(f"trainer.new_parameters_lr_scale={value}").trainer)
