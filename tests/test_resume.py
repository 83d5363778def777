"""resume=true after a SIGKILL mid-epoch: the run continues in its own directory from its last complete
checkpoint and ends with the metrics of an uninterrupted run of the same config and seed."""

from __future__ import annotations

import json

import pytest

from helpers.processes import assert_same_scores, kill_and_resume

# Extra overrides per resumable setup (full fine-tuning: on hf, tests/test_mlm.py's kill test; on accelerate,
# tests/test_interrupt.py's stopped and resumed run)
SETUPS = [pytest.param(["peft=lora"], id="lora")]
STEPS_PER_EPOCH = 16  # 128 training rows / batch 8
# learns the toy task (so the metrics move with every step), evaluates and checkpoints every 6 steps:
# checkpoints 18, 24, 30 are mid-epoch (epoch 2), after an epoch boundary; 48 is the first at an epoch end
TRAINER = ["trainer.num_train_epochs=6", "trainer.learning_rate=3e-3", "trainer.per_device_train_batch_size=8",
           "trainer.warmup_ratio=0.1", "trainer.weight_decay=0", "trainer.eval_strategy=steps",
           "trainer.eval_steps=6", "trainer.logging_steps=6"]


def _args(tiny_bert, extra):
    return ["task=sentiment", f"model={tiny_bert}", "data=reviews.csv", "data.text_column=review",
            "data.label_column=sentiment", *TRAINER, *extra]


@pytest.fixture
def work(sentiment_csv):
    return sentiment_csv.parent


@pytest.mark.parametrize("extra", SETUPS)
@pytest.mark.slow
def test_killed_run_resumes_to_the_same_metrics(extra, tiny_bert, work):
    resumed = kill_and_resume(_args(tiny_bert, extra), work, "sentiment", 18)
    assert "step 1/" in resumed.log  # the resumed launch appended to the run's log
    assert resumed.step > STEPS_PER_EPOCH and resumed.step % STEPS_PER_EPOCH, resumed.step  # mid-epoch, epoch 2
    expected = assert_same_scores(resumed.run_dir, resumed.reference, abs=1e-4)
    if "peft=lora" not in extra:  # (LoRA on a frozen random tiny base moves its losses, not yet its accuracy)
        assert expected["test_accuracy"] >= 0.85  # it learned: the metrics moved with the steps


def test_resume_with_nothing_to_resume_is_one_line(work, monkeypatch, capfd):
    from helpers.cli import fail

    assert fail(["resume=true"], work, monkeypatch, capfd).startswith("nothing to resume")
    assert not (work / "runs").exists()


def test_resume_of_a_run_with_another_config_names_the_difference(tiny_bert, work, monkeypatch, capfd):
    from omegaconf import OmegaConf

    from helpers.cli import cli_main, compose_cfg

    args = _args(tiny_bert, ["trainer=accelerate"])
    run_dir = work / "runs" / "sentiment" / "old"
    (run_dir / "checkpoints" / "checkpoint-6").mkdir(parents=True)
    (run_dir / "checkpoints" / "checkpoint-6" / "trainer_state.json").write_text("{}")
    old = compose_cfg(*args, "trainer.learning_rate=0.01")
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(old, resolve=True))
    (run_dir / "config.hash").write_text("0" * 16)
    code, _, err = cli_main([*args, f"resume={run_dir}"], work, monkeypatch, capfd)
    assert code == 2 and "Traceback" not in err
    assert "had a different config (trainer.learning_rate: 0.01 -> 0.003)" in err
    assert run_dir.is_dir()  # a refused resume deletes nothing


def test_a_checkpoint_whose_state_file_is_missing_empty_or_cut_short_is_not_resumed_from(tmp_path):
    from finetune.engines import STATE_FILE, last_checkpoint

    state = json.dumps({"global_step": 6, "log_history": []})
    for step, text in [(6, state), (12, ""), (18, None), (24, state[:-5])]:  # a kill at three points of a save
        (tmp_path / "checkpoints" / f"checkpoint-{step}").mkdir(parents=True)
        if text is not None:
            (tmp_path / "checkpoints" / f"checkpoint-{step}" / STATE_FILE).write_text(text)
    assert last_checkpoint(tmp_path) == tmp_path / "checkpoints" / "checkpoint-6"
    (tmp_path / "checkpoints" / "checkpoint-6" / STATE_FILE).write_text("")
    assert last_checkpoint(tmp_path) is None
