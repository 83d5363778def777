"""Real processes, for what needs one (exit codes, kills, several ranks): `python -m finetune` as a user runs it,
in the background, or launched as several processes (accelerate launch). Everything else runs in-process (cli.py)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
ENV = {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}  # on shared cores more threads a process only wait
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


def start(args: list[str], cwd: Path, log: Path) -> subprocess.Popen:
    """`python -m finetune <args>` in the background, its output into log."""
    with open(log, "w") as out:
        return subprocess.Popen([sys.executable, "-m", "finetune", *args], cwd=cwd, env={**os.environ, **ENV}, stdout=out,
                                stderr=subprocess.STDOUT)


def scores(run_dir: Path) -> dict[str, float]:
    """A finished run's validation, test and pipeline metrics (metrics.json), without its timings."""
    metrics = json.loads((run_dir / "metrics.json").read_text())
    return {k: v for k, v in metrics.items() if k.startswith(("validation_", "test_", "pipeline_"))
            and not k.endswith(("_runtime", "_per_second", "_preparation_time"))}
