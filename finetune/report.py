"""Run artefacts besides the model: metrics.json and the learning-curve plot."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def write_text(path: Path, text: str) -> None:
    """Written whole or not at all: a temp file beside it, renamed into place (its own for each process, so
    processes writing one file at once, such as two sweep launches' leaderboard, never mix their bytes)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json(path: Path, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def write_jsonl(path: Path, rows: list[dict]) -> None:
    write_text(path, "".join(json.dumps(r, ensure_ascii=False, default=str) + "\n" for r in rows))


def learning_curve(log_history: list[dict], main_metric: str, path: Path) -> None:
    """Training loss, validation loss and the validation main metric against the optimizer step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(e["step"], e["loss"]) for e in log_history if "loss" in e]
    evals = [e for e in log_history if "eval_loss" in e]
    fig, ax = plt.subplots(figsize=(7, 4.2))
    if train:
        ax.plot(*zip(*train), label="train loss", color="tab:blue", alpha=0.8)
    if evals:
        ax.plot([e["step"] for e in evals], [e["eval_loss"] for e in evals], "o-", label="validation loss",
                color="tab:orange")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    key = f"eval_{main_metric}"
    handles, labels = ax.get_legend_handles_labels()
    if any(key in e for e in evals):
        ax2 = ax.twinx()
        ax2.plot([e["step"] for e in evals if key in e], [e[key] for e in evals if key in e], "s--",
                 color="tab:green", label=f"validation {main_metric}")
        ax2.set_ylabel(main_metric)
        h2, l2 = ax2.get_legend_handles_labels()
        handles, labels = handles + h2, labels + l2
    ax.legend(handles, labels, loc="center right")
    ax.set_title("learning curve")
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
