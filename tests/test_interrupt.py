"""Ctrl-C and SIGTERM: the run stops after the optimizer step under way with a checkpoint, says where and how to
resume in one line, exits 130 / 143, and the resumed run ends with the metrics of an uninterrupted one; a second
signal stops at once."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers.processes import ACCELERATE, ENV, assert_same_scores, free_port, kill, start

TRAINER = ["trainer.num_train_epochs=3", "trainer.learning_rate=3e-3", "trainer.per_device_train_batch_size=8",
           "trainer.warmup_ratio=0.1", "trainer.weight_decay=0", "trainer.eval_strategy=steps",
           "trainer.eval_steps=6", "trainer.logging_steps=6", "trainer.report_to=[]"]
ARGS = ["task=sentiment", "data=reviews.csv", "data.text_column=review", "data.label_column=sentiment", *TRAINER]


def _stop_at_a_checkpoint(launch: subprocess.Popen, runs: Path, log: Path, signum: int) -> tuple[Path, int, str]:
    """Send `signum` once checkpoint-6 exists; the launch must exit 128 + signum with one error line, keeping the
    checkpoint of the step it stopped at. Returns (run dir, that step, the line)."""
    deadline = time.time() + 300
    try:
        while not list(runs.glob("sentiment/*/checkpoints/checkpoint-6/trainer_state.json")):
            assert launch.poll() is None and time.time() < deadline, log.read_text()[-3000:]
            time.sleep(0.02)
        launch.send_signal(signum)
        assert launch.wait(timeout=120) == 128 + signum
    finally:
        if launch.poll() is None:
            kill(launch)
    out = log.read_text()
    (line,) = [line for line in out.splitlines() if line.startswith("error: ")]  # rank 0 reports, once
    assert "Traceback" not in out and line.startswith(f"error: stopped by {signal.Signals(signum).name} at step ")
    (run_dir,) = list((runs / "sentiment").iterdir())
    step = int(line.split("at step ")[1].split()[0])
    assert (run_dir / "checkpoints" / f"checkpoint-{step}" / "trainer_state.json").is_file()
    assert not (run_dir / "model").exists() and not (run_dir / "metrics.json").exists()
    return run_dir, step, line


@pytest.mark.slow
@pytest.mark.parametrize("engine, signum", [("hf", signal.SIGINT), ("accelerate", signal.SIGTERM)])
def test_a_signal_stops_at_a_checkpoint_and_the_printed_command_resumes(engine, signum, tiny_bert, sentiment_csv,
                                                                        tmp_path):
    args = [*ARGS, f"model={tiny_bert}", f"trainer={engine}"]
    full = start([*args, "runs_dir=full"], tmp_path, tmp_path / "full.log")
    try:
        stopped = start([*args, "runs_dir=stopped"], tmp_path, tmp_path / "stopped.log")
        run_dir, step, line = _stop_at_a_checkpoint(stopped, tmp_path / "stopped", tmp_path / "stopped.log", signum)
        command = shlex.split(line.split("resume with: ")[1])
        assert command[:3] == ["python", "-m", "finetune"] and command[-1] == f"resume={run_dir}"
        resumed = subprocess.run([sys.executable, *command[1:]], cwd=tmp_path, env={**os.environ, **ENV},
                                 capture_output=True, text=True, timeout=300)
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        assert f"resuming {run_dir} from checkpoint-{step}" in (run_dir / "finetune.log").read_text()
        assert full.wait(timeout=300) == 0, (tmp_path / "full.log").read_text()[-3000:]
    finally:
        if full.poll() is None:
            kill(full)
    (full_dir,) = list((tmp_path / "full" / "sentiment").iterdir())
    assert_same_scores(run_dir, full_dir, abs=1e-4)


@pytest.mark.slow
def test_two_processes_stop_at_the_same_step_and_resume_under_the_launcher(tiny_bert, sentiment_csv, tmp_path):
    """accelerate launch (2 CPU processes): SIGTERM to the launcher reaches both workers, which agree on the step."""
    args = [*ARGS, f"model={tiny_bert}", "trainer=accelerate"]

    def launch(*extra, log: Path) -> subprocess.Popen:
        with open(log, "w") as out:
            return subprocess.Popen([ACCELERATE, "launch", "--multi_gpu", "--num_processes", "2", "--main_process_port",
                                     free_port(), "-m", "finetune", *args, *extra], cwd=tmp_path,
                                    env={**os.environ, **ENV}, stdout=out, stderr=subprocess.STDOUT)

    stopped = launch(log=tmp_path / "stopped.log")
    run_dir, step, line = _stop_at_a_checkpoint(stopped, tmp_path / "runs", tmp_path / "stopped.log", signal.SIGTERM)
    assert "resume with (under the same launcher): python -m finetune" in line
    resumed = launch(f"resume={run_dir}", log=tmp_path / "resumed.log")
    try:
        assert resumed.wait(timeout=300) == 0, (tmp_path / "resumed.log").read_text()[-3000:]
    finally:
        if resumed.poll() is None:
            kill(resumed)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["pipeline_test_accuracy"] == pytest.approx(metrics["test_accuracy"], abs=0.005)
    assert f"resuming {run_dir} from checkpoint-{step}" in (run_dir / "finetune.log").read_text()


def test_the_first_signal_asks_and_the_second_stops_at_once():
    from finetune import interrupt

    before = signal.getsignal(signal.SIGINT)
    with interrupt.handled():
        assert interrupt.requested() is None
        interrupt.check("before anything")  # nothing asked: goes on
        os.kill(os.getpid(), signal.SIGTERM)
        assert interrupt.requested() == signal.SIGTERM
        with pytest.raises(interrupt.Interrupted) as stopped:
            interrupt.check("before the export")
        assert stopped.value.exit_code == 143 and str(stopped.value) == "stopped by SIGTERM before the export"
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)  # (the handler runs at the next bytecode of this thread)
    assert signal.getsignal(signal.SIGINT) is before  # put back
    assert interrupt.requested() is None
