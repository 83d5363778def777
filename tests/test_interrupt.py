"""Ctrl-C and SIGTERM: the run stops after the optimizer step under way with a checkpoint, says where and how to
resume in one line, exits 130 / 143, and the resumed run ends with the metrics of an uninterrupted one; a second
signal stops at once."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, make_sentences

ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
TRAINER = ["trainer.num_train_epochs=3", "trainer.learning_rate=3e-3", "trainer.per_device_train_batch_size=8",
           "trainer.warmup_ratio=0.1", "trainer.weight_decay=0", "trainer.eval_strategy=steps",
           "trainer.eval_steps=6", "trainer.logging_steps=6", "trainer.report_to=[]"]


def _start(args, cwd: Path, log: Path) -> subprocess.Popen:
    with open(log, "w") as out:
        return subprocess.Popen([sys.executable, "-m", "finetune", *args], cwd=cwd, env=ENV, stdout=out,
                                stderr=subprocess.STDOUT)


def _scores(run_dir: Path) -> dict[str, float]:
    metrics = json.loads((run_dir / "metrics.json").read_text())
    return {k: v for k, v in metrics.items() if k.startswith(("validation_", "test_", "pipeline_"))
            and not k.endswith(("_runtime", "_per_second", "_preparation_time"))}


@pytest.mark.parametrize("engine, signum", [("hf", signal.SIGINT), ("accelerate", signal.SIGTERM)])
def test_a_signal_stops_at_a_checkpoint_and_the_printed_command_resumes(engine, signum, tiny_bert, tmp_path):
    import pandas as pd

    pd.DataFrame(make_sentences(160), columns=["review", "sentiment"]).to_csv(tmp_path / "reviews.csv", index=False)
    args = ["task=sentiment", f"model={tiny_bert}", "data=reviews.csv", "data.text_column=review",
            "data.label_column=sentiment", f"trainer={engine}", *TRAINER]
    full = _start([*args, "runs_dir=full"], tmp_path, tmp_path / "full.log")
    stopped = _start([*args, "runs_dir=stopped"], tmp_path, tmp_path / "stopped.log")
    deadline = time.time() + 300
    while not list((tmp_path / "stopped").glob("sentiment/*/checkpoints/checkpoint-6/trainer_state.json")):
        assert stopped.poll() is None and time.time() < deadline, (tmp_path / "stopped.log").read_text()[-3000:]
        time.sleep(0.02)
    stopped.send_signal(signum)
    assert stopped.wait(timeout=120) == 128 + signum
    out = (tmp_path / "stopped.log").read_text()
    (line,) = [line for line in out.splitlines() if line.startswith("error: ")]
    assert "Traceback" not in out and line.startswith(f"error: stopped by {signal.Signals(signum).name} at step ")
    (run_dir,) = list((tmp_path / "stopped" / "sentiment").iterdir())
    step = int(line.split("at step ")[1].split()[0])
    assert (run_dir / "checkpoints" / f"checkpoint-{step}" / "trainer_state.json").is_file()
    assert not (run_dir / "model").exists() and not (run_dir / "metrics.json").exists()

    command = shlex.split(line.split("resume with: ")[1])
    assert command[:3] == ["python", "-m", "finetune"] and command[-1] == f"resume={run_dir}"
    resumed = subprocess.run([sys.executable, *command[1:]], cwd=tmp_path, env=ENV, capture_output=True, text=True,
                             timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming {run_dir} from checkpoint-{step}" in (run_dir / "finetune.log").read_text()
    assert full.wait(timeout=300) == 0, (tmp_path / "full.log").read_text()[-3000:]
    (full_dir,) = list((tmp_path / "full" / "sentiment").iterdir())
    expected, got = _scores(full_dir), _scores(run_dir)
    assert expected.keys() == got.keys()
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, abs=1e-4), key


def test_two_processes_stop_at_the_same_step_and_resume_under_the_launcher(tiny_bert, tmp_path):
    """accelerate launch (2 CPU processes): SIGTERM to the launcher reaches both workers, which agree on the step."""
    import pandas as pd

    pd.DataFrame(make_sentences(160), columns=["review", "sentiment"]).to_csv(tmp_path / "reviews.csv", index=False)
    args = ["task=sentiment", f"model={tiny_bert}", "data=reviews.csv", "data.text_column=review",
            "data.label_column=sentiment", "trainer=accelerate", *TRAINER]
    accelerate = shutil.which("accelerate") or str(Path(sys.executable).with_name("accelerate"))

    def launch(*extra, log: Path) -> subprocess.Popen:
        with socket.socket() as s:  # a free port: other test runs on this machine may launch at the same time
            s.bind(("127.0.0.1", 0))
            port = str(s.getsockname()[1])
        with open(log, "w") as out:
            return subprocess.Popen([accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--main_process_port",
                                     port, "-m", "finetune", *args, *extra], cwd=tmp_path, env=ENV, stdout=out,
                                    stderr=subprocess.STDOUT)

    stopped = launch(log=tmp_path / "stopped.log")
    deadline = time.time() + 300
    while not list(tmp_path.glob("runs/sentiment/*/checkpoints/checkpoint-6/trainer_state.json")):
        assert stopped.poll() is None and time.time() < deadline, (tmp_path / "stopped.log").read_text()[-3000:]
        time.sleep(0.02)
    stopped.send_signal(signal.SIGTERM)
    assert stopped.wait(timeout=120) == 143
    out = (tmp_path / "stopped.log").read_text()
    (line,) = [line for line in out.splitlines() if line.startswith("error: ")]  # rank 0 reports, once
    assert "resume with (under the same launcher): python -m finetune" in line, out[-3000:]
    (run_dir,) = list((tmp_path / "runs" / "sentiment").iterdir())
    step = int(line.split("at step ")[1].split()[0])
    assert (run_dir / "checkpoints" / f"checkpoint-{step}" / "trainer_state.json").is_file()
    resumed = launch(f"resume={run_dir}", log=tmp_path / "resumed.log")
    assert resumed.wait(timeout=300) == 0, (tmp_path / "resumed.log").read_text()[-3000:]
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
