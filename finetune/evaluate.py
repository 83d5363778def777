"""`python -m finetune.evaluate <model dir or run dir> data=<file, directory or Hub id> [data.<key>=...]
[--output metrics.json]`: score an exported model on labelled data.

The data goes through the exported pipeline exactly as the check after export does (the task's verify), so
the numbers are comparable with a run's pipeline_test_* metrics. The task and the training's column names
come from the model's config.json ("finetune" entry); data.* overrides work as in a run (data.text_column=...).
Scored: the data's test split, else its validation split, else all its rows. Writes the metrics, the model,
the data and the split to a JSON file (default evaluation.json in the current directory).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any


from finetune import cpu
from finetune.errors import FinetuneError


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m finetune.evaluate", description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="an exported model directory, or the run directory holding it")
    parser.add_argument("overrides", nargs="*", help="data=<file, directory or Hub id> and data.<key>=<value>")
    parser.add_argument("--output", type=Path, default=Path("evaluation.json"), help="metrics file to write")
    args = parser.parse_intermixed_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    cpu.tune()
    try:
        evaluate(args.model, args.overrides, args.output)
    except FinetuneError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def evaluate(model: str | Path, overrides: list[str], output: Path) -> dict[str, Any]:
    from finetune import data, report
    from finetune.export import model_dir_of, read_record
    from finetune.tasks import get_task

    model_dir = model_dir_of(model)
    cfg = compose(read_record(model_dir), overrides)
    task = get_task(cfg.task)
    task.from_export(model_dir, cfg.data)
    split, rows = data.load_split(cfg.data, task)
    logging.getLogger("finetune").info("scoring %s on %d %s rows", model_dir, len(rows), split)
    scores = task.verify(model_dir, rows)
    source = cfg.data.source or {s: cfg.data[f"{s}_file"] for s in ("train", "validation", "test")
                                 if cfg.data[f"{s}_file"]}
    result = {"model": str(model_dir), "data": source, "split": split, "num_examples": len(rows), **scores}
    report.write_json(output, result)
    logging.getLogger("finetune").info("%s -> %s", ", ".join(f"{k}={v:.4f}" for k, v in scores.items()
                                                              if k == task.main_metric), output)
    return result


def compose(record: dict[str, Any], overrides: list[str]):
    """The run config for the exported model: its task config (the configs/task entry with its name, and the
    values it was trained with) and its data column names, under the user's data overrides."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from omegaconf import OmegaConf

    from finetune.__main__ import rewrite_overrides
    from finetune.compose import register_configs
    from finetune.config import CONFIG_DIR
    from finetune.tasks import task_config

    bad = [o for o in overrides if not o.startswith("data") or "=" not in o]
    if bad:
        raise FinetuneError(f"'{bad[0]}': finetune.evaluate takes data=... and data.<key>=<value> overrides (the "
                            "task and its settings come from the exported model)")
    register_configs()
    overrides = rewrite_overrides(overrides)
    trained = task_config(record["task"])  # (a name an earlier release saved is mapped to the task's)
    with initialize_config_dir(version_base=None, config_dir=str(CONFIG_DIR)):
        cfg = hydra_compose("config", overrides=[f"task={trained.name}", *overrides])
    given = {o.partition("=")[0] for o in overrides}
    for key, value in OmegaConf.to_container(trained).items():
        if key in cfg.task:
            OmegaConf.update(cfg.task, key, value, merge=True)  # merged: nested settings (task.generation) too
    for key, value in record["data"].items():
        if f"data.{key}" not in given and key in cfg.data:
            cfg.data[key] = value
    return cfg


if __name__ == "__main__":
    main()
