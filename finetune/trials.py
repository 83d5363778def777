"""A sweep trial's record, <trial dir>/trial.json: written by the trial as it starts and ends (finetune/sweep.py),
read by the leaderboard (finetune/leaderboard.py).

Each record names the launch that ran it (`launch`: host and process id of the `python -m finetune -m` that
launched it, passed to its jobs in FINETUNE_SWEEP_LAUNCH), so a launch reports its own failed trials, not those of
another launch continuing the same sweep at the same time.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

from finetune.report import write_json

TRIAL_FILE = "trial.json"
LAUNCH_ENV = "FINETUNE_SWEEP_LAUNCH"


def this_launch() -> str:
    """The launch this process belongs to: the one that started it (a job), or itself."""
    return os.environ.get(LAUNCH_ENV) or f"{socket.gethostname()}:{os.getpid()}"


def write(trial_dir: Path, record: dict) -> None:
    write_json(trial_dir / TRIAL_FILE, record)


def read(trial_dir: Path) -> dict:
    """The trial's record, or {} when it has none (killed before writing it) or it cannot be read."""
    try:
        return json.loads((trial_dir / TRIAL_FILE).read_text())
    except (OSError, ValueError):
        return {}
