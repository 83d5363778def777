"""Real processes, for what needs one (exit codes, kills, several ranks): `python -m finetune` as a user runs it,
launches of several processes (accelerate launch, torchrun), and kill_and_resume, the check every resumable setup
shares. Everything else runs in-process (cli.py)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

REPO = Path(__file__).resolve().parents[2]
ENV = {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}  # one thread a process: on shared cores more only wait
ACCELERATE = shutil.which("accelerate") or str(Path(sys.executable).with_name("accelerate"))


def run_cli(*args: str, cwd: Path, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """`python -m finetune ...` in a subprocess, as a user runs it."""
    full_env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    return subprocess.run([sys.executable, "-m", "finetune", *args], cwd=cwd, env=full_env, capture_output=True,
                          text=True, timeout=timeout)


def free_port() -> str:
    """A free port for a launch's rendezvous: other test runs on this machine may launch at the same time."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def accelerate_launch(launcher_args: list[str], *args: str, cwd: Path) -> subprocess.CompletedProcess:
    """`accelerate launch <launcher_args> -m finetune <args>`, to its end."""
    return subprocess.run([ACCELERATE, "launch", *launcher_args, "--main_process_port", free_port(), "-m", "finetune",
                           *args], cwd=cwd, env={**os.environ, **ENV}, capture_output=True, text=True, timeout=600)


def start(args: list[str], cwd: Path, log: Path, processes: int = 1) -> subprocess.Popen:
    """`python -m finetune <args>` in the background (`torchrun --nproc_per_node <processes>` for more than one),
    its output into log."""
    launcher = [sys.executable]
    if processes > 1:
        launcher += ["-m", "torch.distributed.run", "--nproc_per_node", str(processes), "--master_port", free_port()]
    with open(log, "w") as out:
        return subprocess.Popen([*launcher, "-m", "finetune", *args], cwd=cwd, env={**os.environ, **ENV}, stdout=out,
                                stderr=subprocess.STDOUT)


def kill(proc: subprocess.Popen) -> int:
    """SIGKILL a launch and every process it started (torchrun's workers have process groups of their own)."""
    import psutil

    launcher = psutil.Process(proc.pid)
    for process in [*launcher.children(recursive=True), launcher]:
        try:
            process.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:  # ended on its own meanwhile
            pass
    return proc.wait()


def newest_checkpoint(runs: Path) -> int:
    """The step of the newest complete checkpoint of any run under runs/ (its state file, which a save writes last,
    whole), 0 if none."""
    from finetune.engines import last_checkpoint

    found = [last_checkpoint(run) for run in runs.glob("*")]
    return max((int(c.name.split("-")[1]) for c in found if c), default=0)


def _tail(log: Path) -> str:
    return log.read_text()[-4000:]


def kill_and_resume(args: list[str], work: Path, task: str, step: int, processes: int = 1, reference=None,
                    killed=None, timeout: int = 400) -> SimpleNamespace:
    """Train `args` from work/ (runs_dir=killed) and SIGKILL it once a complete checkpoint of `step` or later
    exists, then resume it with resume=true. Checks that the kill left no export, and that the resumed launch
    finished in the killed run's directory and said so in its log.
    processes: more than one launches through torchrun. killed: a function of the killed run's directory, called
    before the resume. reference: the run to compare with; by default the same args run uninterrupted alongside
    (runs_dir=full), else whatever `reference()` returns, called in this process while the resumed launch runs.
    Returns run_dir (the resumed run), step (the checkpoint it resumed from), log (its finetune.log), reference."""
    started = []

    def launch(name: str, *extra: str) -> subprocess.Popen:
        started.append(start([*args, *extra], work, work / f"{name}.log", processes))
        return started[-1]

    try:
        full = None if reference else launch("full", "runs_dir=full")
        killed_launch = launch("killed", "runs_dir=killed")
        deadline = time.time() + timeout
        while newest_checkpoint(work / "killed" / task) < step:  # polled: a kill test waits on files, never on time
            assert killed_launch.poll() is None, _tail(work / "killed.log")
            assert time.time() < deadline, "no checkpoint appeared"
            time.sleep(0.02)
        assert kill(killed_launch) == -signal.SIGKILL
        (run_dir,) = list((work / "killed" / task).iterdir())
        assert not (run_dir / "model").exists() and not (run_dir / "metrics.json").exists()
        if killed:
            killed(run_dir)

        resumed = launch("resumed", "runs_dir=killed", "resume=true")
        made = reference() if reference else None
        assert resumed.wait(timeout=timeout) == 0, _tail(work / "resumed.log")
        assert list((work / "killed" / task).iterdir()) == [run_dir]  # continued in place, no new run dir
        log = (run_dir / "finetune.log").read_text()
        assert "resuming" in log, log[-3000:]
        resumed_from = int(log.split("resuming")[1].split("checkpoint-")[1].split()[0])
        if full is not None:
            assert full.wait(timeout=timeout) == 0, _tail(work / "full.log")
            (made,) = list((work / "full" / task).iterdir())
    finally:  # a failed check leaves nothing running
        for proc in started:
            if proc.poll() is None:
                kill(proc)
    return SimpleNamespace(run_dir=run_dir, step=resumed_from, log=log, reference=made)


def scores(run_dir: Path) -> dict[str, float]:
    """A finished run's validation, test and pipeline metrics (metrics.json), without its timings."""
    metrics = json.loads((run_dir / "metrics.json").read_text())
    return {k: v for k, v in metrics.items() if k.startswith(("validation_", "test_", "pipeline_"))
            and not k.endswith(("_runtime", "_per_second", "_preparation_time"))}


def assert_same_scores(run_dir: Path, reference: Path, **tolerance) -> dict[str, float]:
    """run_dir has the metrics of reference (pytest.approx with `tolerance`); returns reference's."""
    expected, got = scores(reference), scores(run_dir)
    assert expected.keys() == got.keys()
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, **tolerance), key
    return expected
