"""trainer.optim on both engines: each optimizer trains the tiny model and a run resumed from its checkpoint ends with
the weights of the uninterrupted run (its states, 8-bit or not, and the stochastic rounding's stream saved and
loaded); the combinations that cannot work are refused in one line; the model card names the optimizer."""

from __future__ import annotations

import shutil

import pytest
import torch

from finetune import validate
from finetune.errors import FinetuneError
from helpers.cli import compose_cfg, engine_for

pytestmark = pytest.mark.usefixtures("one_thread")
TRAINER = ["trainer.max_steps=4", "trainer.eval_strategy=steps", "trainer.eval_steps=2", "trainer.learning_rate=3e-3",
           "trainer.per_device_train_batch_size=16", "trainer.warmup_ratio=0", "trainer.report_to=[]",
           "trainer.save_total_limit=5"]
SETTINGS = [["trainer.optim=adamw"], ["trainer.optim=adamw_fused"], ["trainer.optim=adamw_8bit"],
            ["trainer.optim=adafactor"], ["trainer.optim=sgd", "trainer.optim_args.nesterov=true"],
            ["trainer.optim=adamw", "model.dtype=bfloat16"],
            ["trainer.optim=adamw_8bit", "model.dtype=bfloat16", "trainer.optimizer_in_backward=true",
             "trainer.max_grad_norm=0"]]


def _weights(engine) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in engine.model.state_dict().items()}


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["hf", "accelerate"])
@pytest.mark.parametrize("setting", SETTINGS, ids=lambda s: "+".join(o.split("=")[1] for o in s))
def test_each_optimizer_trains_and_resumes_to_the_uninterrupted_weights(engine, setting, tiny_bert, sentiment_csv,
                                                                        tmp_path):
    args = ["task=sentiment", f"model={tiny_bert}", f"data={sentiment_csv}", "data.text_column=review",
            "data.label_column=sentiment", f"trainer={engine}", *TRAINER, *setting]
    validate.config(compose_cfg(*args))
    full = engine_for(tmp_path / "full", *args)
    before = _weights(full)
    metrics = full.train()
    after = _weights(full)
    assert metrics["train_loss"] == metrics["train_loss"]  # finite, not NaN
    assert any(not torch.equal(before[k], after[k]) for k in before)  # it trained
    # the run stopped at its first checkpoint (and kept it in its own directory, where the best one is looked for)
    shutil.copytree(tmp_path / "full" / "checkpoints" / "checkpoint-2", tmp_path / "resumed" / "checkpoints" /
                    "checkpoint-2")
    resumed = engine_for(tmp_path / "resumed", *args)
    resumed.train(tmp_path / "resumed" / "checkpoints" / "checkpoint-2")
    got = _weights(resumed)
    for key, value in after.items():
        assert torch.equal(got[key], value), (key, (got[key] - value).abs().max().item())


@pytest.mark.parametrize("overrides, message", [
    (["trainer.optim=lion"], "unknown trainer.optim 'lion': choose one of adamw, adamw_fused, adamw_8bit, adafactor, sgd"),
    (["trainer.optim=sgd", "trainer.optim_args={betas:[0.9,0.99]}"], "trainer.optim_args.betas: sgd"),
    (["trainer.optim_args={lr:0.1}"], "trainer.optim_args.lr: set trainer.learning_rate"),
    (["trainer.optimizer_in_backward=true", "trainer.max_grad_norm=0", "trainer.gradient_accumulation_steps=2"],
     "trainer.optimizer_in_backward=true steps on each micro-batch's gradient"),
    (["trainer.optimizer_in_backward=true"], "trainer.optimizer_in_backward=true steps each weight before the whole "
                                             "gradient's norm is known: set trainer.max_grad_norm=0"),
    (["trainer=accelerate", "trainer.fsdp=true", "trainer.optim=adamw_8bit"], "keeps no sharded states"),
])
def test_refused_combinations_are_one_line(overrides, message):
    with pytest.raises(FinetuneError, match=message.replace("(", r"\(").replace("[", r"\[")) as refused:
        validate.config(compose_cfg(*overrides))
    assert "\n" not in str(refused.value)


def test_the_model_card_names_the_optimizer():
    from finetune.export import _optimizer

    cfg = compose_cfg("trainer.optim=adamw_8bit", "trainer.optim_args={betas:[0.9,0.95]}", "model.dtype=bfloat16",
                      "trainer.optimizer_in_backward=true", "trainer.max_grad_norm=0")
    assert _optimizer(cfg) == ("adamw_8bit (betas=[0.9, 0.95]), bfloat16 weights rounded stochastically, step inside "
                               "the backward pass")
    assert _optimizer(compose_cfg()) == "adamw"
