"""Progress of long steps, for a person at a terminal and for a log file alike.

In a terminal (stderr is a tty): tqdm bars with an ETA (training, evaluation, the exported-pipeline check,
prediction), and log lines printed above them. Elsewhere (CI, nohup, a redirect): no bars; training logs a
line every trainer.logging_steps with samples/s and the ETA, and other long steps log their progress at most
every 30 s.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import sys
import time
from typing import Any, Callable, Iterable, Iterator

log = logging.getLogger("finetune")


def is_terminal() -> bool:
    return sys.stderr.isatty()


def console() -> contextlib.AbstractContextManager:
    """Log lines go through tqdm.write in a terminal, so a bar is redrawn below them instead of being torn."""
    if not is_terminal():
        return contextlib.nullcontext()
    from tqdm.contrib.logging import logging_redirect_tqdm

    return logging_redirect_tqdm()


class _LogStream:
    """A file for tqdm that turns its status line into a log line (outside a terminal)."""

    def write(self, text: str) -> None:
        if text := text.strip("\r\n "):
            log.info(text)

    def flush(self) -> None:
        pass


def bar(iterable: Iterable | None = None, total: int | None = None, desc: str = "", unit: str = "it",
        enabled: bool = True, **kwargs: Any):
    """A tqdm bar in a terminal; otherwise the same counts and ETA as a log line at most every 30 s."""
    from tqdm.auto import tqdm

    if not enabled:
        return tqdm(iterable, total=total, disable=True)
    if is_terminal():
        return tqdm(iterable, total=total, desc=desc, unit=unit, dynamic_ncols=True, **kwargs)
    return tqdm(iterable, total=total, desc=desc, unit=unit, file=_LogStream(), mininterval=30, delay=30, ascii=True,
                bar_format="{desc}: {percentage:3.0f}% {n_fmt}/{total_fmt} {unit} [{elapsed}<{remaining}, "
                           "{rate_fmt}]", **kwargs)


class Meter:
    """Training throughput and ETA of both engines. Samples/s: over the steps since the last reading. ETA: the
    remaining steps at the run's pace so far (all steps since training started or resumed), which converges where a
    window's rate swings with its batches' lengths. Time spent evaluating and checkpointing inside `paused()` is
    excluded from both."""

    def __init__(self, samples_per_step: int, total_steps: int = 0, clock: Callable[[], float] = time.perf_counter):
        self.per_step, self.total, self.eta, self._clock = samples_per_step, total_steps, None, clock
        self.start(0)

    def start(self, step: int, total_steps: int | None = None) -> None:
        """Training starts (or resumes) at `step`."""
        self.total = total_steps or self.total
        self._time, self._step, self._paused = self._clock(), step, 0.0
        self._start_time, self._start_step, self._paused_total = self._time, step, 0.0

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        start = self._clock()
        try:
            yield
        finally:
            seconds = self._clock() - start
            self._paused += seconds
            self._paused_total += seconds

    def read(self, step: int) -> float | None:
        """Samples/s since the last reading (None when no step was done); updates `eta`."""
        now = self._clock()
        seconds, steps = now - self._time - self._paused, step - self._step
        if steps <= 0 or seconds <= 0:
            return None
        self._time, self._step, self._paused = now, step, 0.0
        pace = (now - self._start_time - self._paused_total) / (step - self._start_step)  # seconds per step so far
        self.eta = (self.total - step) * pace
        return round(steps * self.per_step / seconds, 3)

    def line(self, step: int, entry: dict[str, Any]) -> str:
        """'step 25/100: k=v, ... [eta 0:01:05]': the one log line of a training or evaluation log entry."""
        values = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in entry.items()
                           if k != "step")
        eta = f", eta {datetime.timedelta(seconds=round(self.eta))}" if "loss" in entry and self.eta is not None else ""
        return f"step {step}{f'/{self.total}' if self.total else ''}: {values}{eta}"
