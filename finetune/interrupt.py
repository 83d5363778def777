"""Ctrl-C and SIGTERM (what a scheduler sends before it kills) during a run.

The first signal asks the run to stop where nothing is lost: the engines finish the optimizer step under way, write a
checkpoint and raise Interrupted; between the later phases (evaluation, export, the pipeline check) the run stops
before the next one starts. Outputs are written to temporary files and renamed into place, so a stop leaves none
half-written. A second signal stops at once (KeyboardInterrupt). The command line prints where the run stopped and the
command that resumes it, and exits 128 + the signal's number (130 for Ctrl-C, 143 for SIGTERM).

    with interrupt.handled():          # run.py, around the whole run
        ...
        if interrupt.stop_requested(accelerator):   # an engine, after each optimizer step (all processes agree)
            save a checkpoint; raise Interrupted(...)
        interrupt.check("export")      # between phases
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
from typing import Iterator

log = logging.getLogger("finetune")

SIGNALS = (signal.SIGINT, signal.SIGTERM)
_requested: int | None = None  # the signal that asked the run to stop


class Interrupted(KeyboardInterrupt):
    """The run stopped for a signal, its work kept (a checkpoint when it was training). A KeyboardInterrupt, so no
    `except Exception` on the way (a sweep's trial, a library) takes it for a failure and goes on."""

    def __init__(self, signum: int, where: str, checkpoint=None):
        self.signum, self.where, self.checkpoint = signum, where, checkpoint
        super().__init__(f"stopped by {signal.Signals(signum).name} {where}")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


def _handler(signum, frame) -> None:
    global _requested
    if _requested is not None:  # the second: at once
        raise KeyboardInterrupt(signal.Signals(signum).name)
    _requested = signum
    log.warning("%s: stopping after the current step with a checkpoint (send it again to stop at once)",
                signal.Signals(signum).name)


@contextlib.contextmanager
def handled() -> Iterator[None]:
    """The run's signal handlers, in place while it runs (only the main thread can set them: elsewhere, none)."""
    global _requested
    _requested = None
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, _handler) for s in SIGNALS}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        _requested = None


def requested() -> int | None:
    """The signal that asked this process to stop, if one did."""
    return _requested


def stop_requested(accelerator=None) -> int | None:
    """After an optimizer step: the signal any process of the launch received (a collective when there are several,
    so every process stops at the same step), or None."""
    if accelerator is None or accelerator.num_processes == 1:
        return _requested
    import torch

    flag = torch.tensor([_requested or 0], device=accelerator.device)
    return int(accelerator.reduce(flag, "max").item()) or None


def check(where: str) -> None:
    """Between phases: stop here if a signal asked to (Interrupted)."""
    if _requested is not None:
        raise Interrupted(_requested, where)


def pid_alive(pid: int) -> bool:
    """Whether a process of this machine still runs (a lock's or a staging folder's owner)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True
