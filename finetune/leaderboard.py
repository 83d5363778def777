"""The leaderboard of a sweep: `python -m finetune.leaderboard <sweep dir>`, also written when a sweep ends.

It reads what the trials wrote (<trial>/trial.json, metrics.json, .hydra/) and writes into the sweep directory
leaderboard.md and leaderboard.csv (one row per trial: its overrides, validation / test / pipeline-check scores,
runtime, training samples/s, status), leaderboard.png (the validation metric against each swept parameter, and
for an Optuna search the best value over trials) and `best`, a link to the best trial's model directory.
Trials are ranked on the validation split only: the test split plays no part in choosing the best. Finished
trials come first, then pruned ones (by the value they were stopped at), then failed and unfinished ones.
Two launches continuing one sweep directory at once both write it when they end (each file replaced whole): the
last to end ranks every trial of both.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import sys
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from finetune.report import write_text
from finetune.trials import LAUNCH_ENV, TRIAL_FILE, this_launch
from finetune.trials import read as read_trial

failed_trials: list[str] = []  # this launch's failed trial dirs when its sweep ended: set by the callback, read by the CLI


@dataclass
class Board:
    sweep_dir: Path
    rows: list[dict]  # ranked: finished trials best first, then pruned, then failed and unfinished ones
    objective: str  # e.g. validation_accuracy
    direction: str  # maximize | minimize
    swept: list[str]  # parameters whose value differs between trials
    fixed: list[str]  # overrides every trial shares
    log_scale: set[str] = field(default_factory=set)
    optuna: bool = False

    @property
    def best(self) -> dict | None:
        return next((r for r in self.rows if r["status"] == "ok"), None)

    @property
    def failed(self) -> list[dict]:
        return [r for r in self.rows if r["status"] not in ("ok", "pruned")]

    def failed_in(self, launch: str) -> list[dict]:
        """The failed or unfinished trials this launch ran (a record without a launch: an older one's, counted)."""
        return [r for r in self.failed if r["launch"] in (None, launch)]

    @property
    def pruned(self) -> list[dict]:
        return [r for r in self.rows if r["status"] == "pruned"]

    def columns(self) -> list[str]:
        metric = self.objective.removeprefix("validation_")
        return ["rank", "trial", *self.swept, self.objective, f"test_{metric}", f"pipeline_test_{metric}",
                "runtime_s", "train_samples_per_s", "status"]

    def cells(self, row: dict, width: int | None = None) -> list[str]:
        status = row["status"] if row["status"] == "ok" else f"{row['status']}: {row.get('error') or ''}".rstrip(": ")
        if row["status"] == "pruned":
            status = f"pruned at evaluation {row['step']}"
        if width and len(status) > width:
            status = status[: width - 3] + "..."
        return [str(row["rank"] or "-"), str(row["trial"]), *(_param(row, p) for p in self.swept),
                _fmt(row["validation"]), _fmt(row["test"]), _fmt(row["pipeline"]), _fmt(row["runtime_s"], 1),
                _fmt(row["samples_per_s"], 1), status]

    def notes(self) -> list[str]:
        best = self.best
        lines = [f"sweep: {self.sweep_dir}",
                 f"ranked by {self.objective} ({self.direction}); selection uses the validation split only, "
                 f"the test columns are for reporting"]
        if self.fixed:
            lines.append("every trial: " + " ".join(self.fixed))
        lines.append(f"best: trial {best['trial']} -> {best['dir'] / 'model'}" if best else "best: none (no trial finished)")
        if self.pruned:
            lines.append(f"pruned: {len(self.pruned)} of {len(self.rows)} trials (stopped early by the pruner)")
        if self.failed:
            lines.append(f"failed or unfinished: {len(self.failed)} of {len(self.rows)} trials")
        return lines

    def table(self) -> str:
        rows = [self.columns(), *(self.cells(r, width=70) for r in self.rows)]
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        text = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
        return "\n".join([*self.notes(), "", *text])

    def markdown(self) -> str:
        head = self.columns()
        lines = ["# Sweep leaderboard", "", *(f"- {n}" for n in self.notes()), "",
                 "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        lines += ["| " + " | ".join(c.replace("|", "\\|") for c in self.cells(r)) + " |" for r in self.rows]
        if (self.sweep_dir / "leaderboard.png").exists():
            lines += ["", "![validation metric against the swept parameters](leaderboard.png)"]
        return "\n".join(lines) + "\n"

    def csv(self) -> str:
        out = io.StringIO()
        writer = csv.writer(out)
        head = self.columns()
        writer.writerow([*head[:-1], "status", "error", "overrides", "run_dir"])
        for r in self.rows:
            cells = self.cells(r)
            writer.writerow([*cells[:-1], r["status"], r.get("error") or "", " ".join(r["overrides"]), r["dir"]])
        return out.getvalue()

    def write(self, sweep_dir: Path | None = None) -> None:
        sweep_dir = sweep_dir or self.sweep_dir
        self.plot(sweep_dir / "leaderboard.png")
        write_text(sweep_dir / "leaderboard.md", self.markdown())
        write_text(sweep_dir / "leaderboard.csv", self.csv())
        link = sweep_dir / "best"
        best = self.best
        if best and (best["dir"] / "model").is_dir():
            tmp = sweep_dir / f".best.{os.getpid()}.tmp"  # another launch of this sweep may write its own
            tmp.unlink(missing_ok=True)
            os.symlink(os.path.relpath(best["dir"] / "model", sweep_dir), tmp)
            os.replace(tmp, link)  # atomic: the link never points nowhere
        elif link.is_symlink():
            link.unlink()

    def plot(self, path: Path) -> None:
        """The validation metric against each swept parameter; for Optuna, also the best value over trials. Pruned
        trials are drawn as crosses at the value they were stopped at."""
        done = [r for r in self.rows if r["status"] == "ok"]
        pruned = [r for r in self.pruned if r["validation"] is not None]
        panels = len(self.swept) + self.optuna
        if not done or not panels:
            return
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker

        cols, rows = min(panels, 3), (panels + min(panels, 3) - 1) // min(panels, 3)
        width, height = max(4.2 * cols, 5.6), 3.4 * rows + 0.6  # + the title's two lines
        fig, axes = plt.subplots(rows, cols, figsize=(width, height), squeeze=False)
        styles = [(done, dict(marker="o", color="tab:blue", label="finished")),
                  (pruned, dict(marker="x", color="tab:red", label="pruned (value when stopped)"))]
        for ax, name in zip(axes.flat, self.swept):
            numeric = all(isinstance(r["values"][name], (int, float)) and not isinstance(r["values"][name], bool)
                          for r in done + pruned if name in r["values"])
            for trials, style in styles:
                points = [(r["values"][name], r["validation"]) for r in trials if name in r["values"]]
                if points:
                    ax.scatter([x if numeric else str(x) for x, _ in points], [y for _, y in points], **style)
            if numeric and name in self.log_scale:
                ax.set_xscale("log")
                ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())  # (its labels overlap)
            ax.set_xlabel(name + (" (log)" if numeric and name in self.log_scale else ""))
            ax.set_ylabel(self.objective)
            if pruned:
                ax.legend(fontsize=8)
        if self.optuna:
            ax = axes.flat[len(self.swept)]
            ordered = sorted(done, key=lambda r: r["trial"])
            pick = max if self.direction == "maximize" else min
            best = [pick(r["validation"] for r in ordered[: i + 1]) for i in range(len(ordered))]
            for trials, style in styles:
                if trials:
                    ax.scatter([r["trial"] for r in trials], [r["validation"] for r in trials], alpha=0.6, **style)
            ax.step([r["trial"] for r in ordered], best, where="post", color="tab:green", label="best so far")
            ax.set_xlabel("trial")
            ax.set_ylabel(self.objective)
            ax.legend(fontsize=8)
        for ax in list(axes.flat)[panels:]:
            ax.axis("off")
        counts = f"{len(self.rows)} trials" + (f", {len(self.pruned)} pruned" if self.pruned else "")
        fig.suptitle(f"{self.objective} ({self.direction}), {counts}", fontsize=11, y=1 - 0.08 / height)
        # the sweep's name in a smaller line, wrapped to the figure's width (about 15 characters an inch at 8 pt)
        name = textwrap.fill(self.sweep_dir.name, width=int(width * 15), break_on_hyphens=False)
        fig.text(0.5, 1 - 0.32 / height, name, fontsize=8, color="0.35", ha="center", va="top")
        fig.tight_layout(rect=(0, 0, 1, 1 - (0.3 + 0.13 * name.count("\n")) / height))
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.png")
        fig.savefig(tmp, dpi=100)
        plt.close(fig)
        os.replace(tmp, path)


def build(sweep_dir: Path) -> Board | None:
    """The leaderboard of the trials under sweep_dir, or None when it holds none."""
    trials = [d for d in sorted(Path(sweep_dir).iterdir()) if d.is_dir() and
              ((d / TRIAL_FILE).is_file() or (d / ".hydra" / "overrides.yaml").is_file())] if Path(sweep_dir).is_dir() else []
    if not trials:
        return None
    rows = [_row(d) for d in trials]
    objective = next((r["objective"] for r in rows if r["objective"]), "validation_score")
    direction = next((r["direction"] for r in rows if r["direction"]), "maximize")
    test_key = "test_" + objective.removeprefix("validation_")
    for r in rows:
        r["validation"] = r["validation"] if r["validation"] is not None else r["metrics"].get(objective)
        r["test"], r["pipeline"] = r["metrics"].get(test_key), r["metrics"].get("pipeline_" + test_key)
    sign = -1 if direction == "maximize" else 1
    order = {"ok": 0, "pruned": 1}
    rows.sort(key=lambda r: (order.get(r["status"], 2), sign * _number_or(r["validation"], sign * math.inf)
                             if r["status"] in order else 0, str(r["trial"]).zfill(9)))
    for rank, r in enumerate(rows, 1):
        r["rank"] = rank if r["status"] == "ok" else None
    keys = list(dict.fromkeys(k for r in rows for k in r["params"]))
    swept = [k for k in keys if len({r["params"].get(k) for r in rows}) > 1]
    fixed = [f"{k}={rows[0]['params'][k]}" for k in keys if k not in swept]
    sweeper = _sweeper_config(Path(sweep_dir), trials)
    return Board(Path(sweep_dir), rows, objective, direction, swept, fixed,
                 log_scale=_log_scale(sweeper, rows, swept),
                 optuna="optuna" in str(sweeper.get("_target_", "")).lower())


def _row(trial_dir: Path) -> dict:
    record = read_trial(trial_dir)
    overrides = record.get("overrides")
    if overrides is None:  # killed before it wrote its record: Hydra's copy of the trial's overrides
        overrides = yaml.safe_load((trial_dir / ".hydra" / "overrides.yaml").read_text()) or []
    params, values = {}, {}
    for text in overrides:
        key, value, parsed = _parse_override(text)
        params[key], values[key] = value, parsed
    status = record.get("status", "running")
    return {"trial": record.get("trial", _number(trial_dir.name)), "dir": trial_dir, "overrides": list(overrides),
            "params": params, "values": values, "status": "unfinished" if status == "running" else status,
            "error": record.get("error") or ("never finished: killed, or still running" if status == "running" else None),
            "objective": record.get("objective"), "direction": record.get("direction"), "step": record.get("step"),
            "validation": record.get("value"), "metrics": _read_json(trial_dir / "metrics.json"),
            "launch": record.get("launch"),
            "runtime_s": _read_json(trial_dir / "metrics.json").get("total_runtime_s", record.get("runtime_s")),
            "samples_per_s": _read_json(trial_dir / "metrics.json").get("train_samples_per_second")}


def _parse_override(text: str) -> tuple[str, str, object]:
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        override = OverridesParser.create().parse_override(text)
        return override.get_key_element().lstrip("+~"), override.get_value_element_as_str(), override.value()
    except Exception:  # not Hydra override syntax: show it as written
        key, _, value = text.partition("=")
        return key, value, value


def _sweeper_config(sweep_dir: Path, trials: list[Path]) -> dict:
    """hydra.sweeper and the command's overrides, from the sweep's multirun.yaml (grid) or a trial's .hydra/."""
    for path in [sweep_dir / "multirun.yaml", *(t / ".hydra" / "hydra.yaml" for t in trials)]:
        if path.is_file():
            hydra = (yaml.safe_load(path.read_text()) or {}).get("hydra", {})
            return {**(hydra.get("sweeper") or {}), "command": (hydra.get("overrides") or {}).get("task") or []}
    return {}


def _log_scale(sweeper: dict, rows: list[dict], swept: list[str]) -> set[str]:
    """Parameters drawn on a log axis: tagged `log` in the search space or on the command line
    (tag(log, interval(...))), or positive numbers spanning a factor of 10 or more."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser, tagged = OverridesParser.create(), set()
    declared = [f"{k}={v}" for k, v in (sweeper.get("params") or {}).items()] + list(sweeper.get("command", []))
    for text in declared:
        try:
            override = parser.parse_override(text)
        except Exception:
            continue
        if override.is_sweep_override() and "log" in getattr(override.value(), "tags", ()):
            tagged.add(override.get_key_element().lstrip("+~"))
    for name in swept:
        xs = [r["values"].get(name) for r in rows if name in r["values"]]
        if xs and all(isinstance(x, (int, float)) and not isinstance(x, bool) and x > 0 for x in xs) \
                and max(xs) / min(xs) >= 10:
            tagged.add(name)
    return tagged


def _number_or(value, default: float) -> float:
    return value if isinstance(value, (int, float)) and math.isfinite(value) else default


def _param(row: dict, name: str) -> str:
    value = row["values"].get(name)
    return f"{value:.4g}" if isinstance(value, float) else row["params"].get(name, "")  # exact: the overrides column


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _number(name: str) -> int | str:
    return int(name) if name.isdigit() else name


def _fmt(value, digits: int = 4) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.{digits}f}" if math.isfinite(value) else str(value)
    return str(value)


class LeaderboardCallback(Callback):
    """hydra.callbacks.leaderboard (configs/config.yaml): names this launch to its jobs when a sweep starts, ranks the
    trials when it ends."""

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        os.environ[LAUNCH_ENV] = this_launch()

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir))
        board = build(sweep_dir)
        if board is None:
            return
        print(board.table(), flush=True)
        board.write(sweep_dir)
        failed_trials[:] = [str(row["dir"]) for row in board.failed_in(this_launch())]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m finetune.leaderboard", description=__doc__.splitlines()[0])
    parser.add_argument("sweep_dir", type=Path, help="a sweep directory, e.g. runs/sentiment/sweep_<time>")
    args = parser.parse_args(argv)
    board = build(args.sweep_dir)
    if board is None:
        print(f"error: no trials in {args.sweep_dir}; pass a sweep directory (runs/<task>/sweep_<time>)",
              file=sys.stderr)
        return 2
    print(board.table())
    board.write()
    return 0


if __name__ == "__main__":
    sys.exit(main())
