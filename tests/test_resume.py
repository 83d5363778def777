"""resume=true after a SIGKILL mid-epoch: the run continues in its own directory from its last complete
checkpoint and ends with the metrics of an uninterrupted run of the same config and seed."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest

from helpers.processes import ENV, run_cli, scores, start

# Extra overrides per resumable setup
SETUPS = [pytest.param(["trainer=hf"], id="hf"), pytest.param(["trainer=accelerate"], id="accelerate"),
          pytest.param(["peft=lora"], id="lora")]
STEPS_PER_EPOCH = 16  # 128 training rows / batch 8
# learns the toy task (so the metrics move with every step), evaluates and checkpoints every 6 steps:
# checkpoints 18, 24, 30 are mid-epoch (epoch 2), after an epoch boundary; 48 is the first at an epoch end
TRAINER = ["trainer.num_train_epochs=6", "trainer.learning_rate=3e-3", "trainer.per_device_train_batch_size=8",
           "trainer.warmup_ratio=0.1", "trainer.weight_decay=0", "trainer.eval_strategy=steps",
           "trainer.eval_steps=6", "trainer.logging_steps=6"]


def _args(tiny_bert, extra):
    return ["task=sentiment", f"model={tiny_bert}", "data=reviews.csv", "data.text_column=review",
            "data.label_column=sentiment", *TRAINER, *extra]


def _newest_complete_step(runs_dir: Path) -> int:
    from finetune.engines import last_checkpoint

    found = [last_checkpoint(run) for run in runs_dir.glob("sentiment/*")]
    return max((int(c.name.split("-")[1]) for c in found if c), default=0)


@pytest.fixture
def work(sentiment_csv):
    return sentiment_csv.parent


@pytest.mark.parametrize("extra", SETUPS)
def test_killed_run_resumes_to_the_same_metrics(extra, tiny_bert, work):
    args = _args(tiny_bert, extra)
    full = start([*args, "runs_dir=full"], work, work / "full.log")
    killed = start([*args, "runs_dir=killed"], work, work / "killed.log")
    deadline = time.time() + 400
    while _newest_complete_step(work / "killed") < 18:
        assert killed.poll() is None, (work / "killed.log").read_text()[-3000:]
        assert time.time() < deadline, "no checkpoint appeared"
        time.sleep(0.02)
    os.kill(killed.pid, signal.SIGKILL)
    assert killed.wait() == -signal.SIGKILL
    (run_dir,) = list((work / "killed" / "sentiment").iterdir())
    assert not (run_dir / "model").exists() and not (run_dir / "metrics.json").exists()

    resumed = run_cli(*args, "runs_dir=killed", "resume=true", cwd=work, env=ENV)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert list((work / "killed" / "sentiment").iterdir()) == [run_dir]  # continued in place, no new run dir
    log = (run_dir / "finetune.log").read_text()
    assert "step 1/" in log and "resuming" in log  # the resumed launch appended to the run's log
    step = int(log.split("resuming")[1].split("checkpoint-")[1].split()[0])
    assert step > STEPS_PER_EPOCH and step % STEPS_PER_EPOCH, step  # mid-epoch, after the first epoch

    assert full.wait(timeout=400) == 0, (work / "full.log").read_text()[-3000:]
    (full_dir,) = list((work / "full" / "sentiment").iterdir())
    expected, got = scores(full_dir), scores(run_dir)
    assert expected.keys() == got.keys()
    if "peft=lora" not in extra:  # (LoRA on a frozen random tiny base moves its losses, not yet its accuracy)
        assert expected["test_accuracy"] >= 0.85  # it learned: the metrics moved with the steps
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, abs=1e-4), key


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
