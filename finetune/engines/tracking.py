"""Experiment trackers (trainer.report_to): both engines report the same scalars under the names the Trainer's
callbacks use -- TensorBoard event files in <output_dir>/tensorboard/, MLflow runs in the experiment "finetune"."""

from __future__ import annotations

import os
from pathlib import Path

from finetune.errors import FinetuneError

TENSORBOARD = "tensorboard"  # event files of the run, beside model/
TRACKERS = ("tensorboard", "mlflow")


def setup_tracking(cfg) -> None:
    """For trainer.report_to=[mlflow]: a local store (<runs_dir>/mlflow.db) unless MLFLOW_TRACKING_URI names one, and
    the experiment "finetune" (or MLFLOW_EXPERIMENT_NAME) for both engines' runs."""
    if "mlflow" not in cfg.trainer.report_to:
        return
    try:
        import mlflow
    except ImportError as e:
        raise FinetuneError("trainer.report_to=[mlflow] needs MLflow: pip install 'finetune[mlflow]' (or drop "
                            "mlflow from trainer.report_to)") from e
    runs = Path(cfg.runs_dir).resolve()
    if not os.environ.get("MLFLOW_TRACKING_URI"):
        runs.mkdir(parents=True, exist_ok=True)
        mlflow.set_tracking_uri(f"sqlite:///{runs / 'mlflow.db'}")
    name = os.environ.get("MLFLOW_EXPERIMENT_NAME", "finetune")
    if mlflow.get_experiment_by_name(name) is None:
        mlflow.create_experiment(name, artifact_location=(runs / "mlartifacts").as_uri())
    mlflow.set_experiment(name)


def accelerate_trackers(report_to, output_dir: Path) -> list:
    """accelerate's trackers writing where the Trainer's do (TensorBoard: <output_dir>/tensorboard)."""
    from accelerate.tracking import MLflowTracker, TensorBoardTracker

    made = {"tensorboard": lambda: TensorBoardTracker(TENSORBOARD, str(output_dir)),
            "mlflow": lambda: MLflowTracker("finetune", str(output_dir), run_name=output_dir.name)}
    return [made[name]() for name in report_to]
