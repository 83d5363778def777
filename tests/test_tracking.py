"""Tracking and progress: both engines write the same scalars to TensorBoard event files in the run directory,
MLflow as an option (a local store), report_to=[] writes nothing; a terminal gets progress bars and each log
line once, a log file gets a line every logging_steps with samples/s and the ETA."""

from __future__ import annotations

import logging
import re

import pytest

from helpers.cli import engine_for
from helpers.data import scalars, write_sentiment_csv

pytestmark = pytest.mark.usefixtures("one_thread")
ENGINES = ["hf", "accelerate"]
FAST = ["trainer.num_train_epochs=2", "trainer.learning_rate=1e-3", "trainer.per_device_train_batch_size=16",
        "trainer.logging_steps=2", "trainer.warmup_ratio=0.0"]
SCALARS = {"train/loss", "train/learning_rate", "train/grad_norm", "train/samples_per_second", "train/epoch",
           "eval/loss", "eval/accuracy", "eval/f1_macro", "eval/samples_per_second"}


@pytest.fixture(scope="module")
def csv(tmp_path_factory):
    return write_sentiment_csv(tmp_path_factory.mktemp("data") / "reviews.csv", 96)


def train(tiny_bert, csv, out, *overrides):
    engine = engine_for(out, "task=sentiment", f"model={tiny_bert}", f"data={csv}", "data.text_column=review",
                        "data.label_column=sentiment", f"runs_dir={out.parent}", *FAST, *overrides)
    engine.train()
    engine.evaluate("test")
    return engine


@pytest.fixture(scope="module")
def tracked(tiny_bert, csv, tmp_path_factory):
    """Each engine trained with the default trainer.report_to ([tensorboard])."""
    runs = {}
    for engine in ENGINES:
        out = tmp_path_factory.mktemp(engine) / "run"
        runs[engine] = (train(tiny_bert, csv, out, f"trainer={engine}"), out)
    return runs


@pytest.mark.slow
def test_both_engines_write_the_same_scalars(tracked):
    tags = {}
    for name, (engine, out) in tracked.items():
        assert [p.name for p in out.iterdir() if p.name == "tensorboard"] == ["tensorboard"]
        found = scalars(out / "tensorboard")
        tags[name] = set(found)
        assert SCALARS <= set(found), (name, sorted(found))
        losses = [e["loss"] for e in engine.log_history if "loss" in e]
        assert [v for _, v in found["train/loss"]] == pytest.approx(losses, abs=1e-4)  # the logged values
        assert [s for s, _ in found["train/loss"]] == [e["step"] for e in engine.log_history if "loss" in e]
        assert [s for s, _ in found["eval/accuracy"]] == [5, 10]  # 96 rows -> 76 train rows: 5 steps an epoch
        assert all(v > 0 for _, v in found["train/samples_per_second"])
        assert not any(t.startswith("test/") for t in found)  # trackers record the training and close with it
    assert tags["hf"] & SCALARS == tags["accelerate"] & SCALARS


def test_report_to_empty_writes_no_events(tiny_bert, csv, tmp_path):
    train(tiny_bert, csv, tmp_path / "run", "trainer=accelerate", "trainer.report_to=[]")
    assert not (tmp_path / "run" / "tensorboard").exists()


def test_unknown_tracker_is_an_input_error():
    from finetune import validate
    from finetune.errors import FinetuneError
    from helpers.cli import compose_cfg

    with pytest.raises(FinetuneError, match=r"unknown tracker wandb in trainer.report_to: choose from tensorboard, "
                                            r"mlflow, or \[\] for none"):
        validate.trainer(compose_cfg("trainer.report_to=[wandb]").trainer)


@pytest.mark.slow
def test_mlflow_local_store(tiny_bert, csv, tmp_path, monkeypatch):
    import mlflow  # the [mlflow] extra (also in [test])
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    runs = {}
    for engine in ENGINES:
        train(tiny_bert, csv, tmp_path / engine, f"trainer={engine}", "trainer.report_to=[mlflow]")
    assert (tmp_path / "mlflow.db").is_file()  # <runs_dir>/mlflow.db, no server
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("finetune")
    for run in client.search_runs([experiment.experiment_id]):
        runs[run.info.run_name] = run
    assert set(runs) == set(ENGINES)  # one MLflow run per training, named after its run directory
    for run in runs.values():
        assert {"loss", "eval_accuracy", "learning_rate", "grad_norm"} <= set(run.data.metrics), run.data.metrics
    mlflow.set_tracking_uri(None)


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.slow
def test_terminal_gets_bars_and_each_log_once(engine, tiny_bert, csv, tmp_path, monkeypatch, capsys, caplog):
    from finetune import progress

    monkeypatch.setattr(progress, "is_terminal", lambda: True)
    with caplog.at_level(logging.INFO, logger="finetune"):
        train(tiny_bert, csv, tmp_path / "run", f"trainer={engine}", "trainer.report_to=[]")
    err = capsys.readouterr().err
    assert re.search(r"10/10 \[\d\d:\d\d<\d\d:\d\d", err), err[-2000:]  # the training bar, with its ETA
    assert "{'loss'" not in err and "'eval_loss'" not in err  # the Trainer's printed dicts are gone
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("step ")]
    train_lines = [l for l in lines if re.match(r"step \d+/10: loss=", l)]
    assert len(train_lines) == len(set(train_lines)) == 6  # steps 1, 2, 4, 6, 8, 10: each once


@pytest.mark.slow
def test_log_file_gets_eta_and_throughput_every_logging_step(pushed_run):
    """A run whose stderr is not a terminal (the CLI under pytest): no bars, a line per logging step."""
    log = (pushed_run.run_dir / "finetune.log").read_text()
    lines = re.findall(r"step (\d+)/(\d+): loss=[\d.]+, .*samples_per_second=[\d.]+, .*eta \d+:\d\d:\d\d", log)
    steps = [int(s) for s, _ in lines]
    assert steps[:3] == [1, 5, 10] and len(set(t for _, t in lines)) == 1  # trainer.logging_steps=5
    assert "%|" not in pushed_run.proc.stderr  # no progress bars in a log
    events = scalars(pushed_run.run_dir / "tensorboard")
    assert SCALARS <= set(events)


def test_eta_converges_on_the_runs_pace_when_windows_alternate_fast_and_slow():
    """Length-grouped batches make alternate logging windows fast and slow: samples/s is the window's, the ETA the
    run's pace so far (evaluation pauses excluded), so it shrinks steadily instead of swinging."""
    from finetune.progress import Meter

    now = [100.0]
    meter = Meter(samples_per_step=8, total_steps=100, clock=lambda: now[0])
    meter.start(0, 100)
    rates, etas = [], []
    for window in range(10):  # 10 steps a window: 10 s, then 30 s, ... (2 s/step on average)
        now[0] += 10.0 if window % 2 == 0 else 30.0
        if window == 4:
            with meter.paused():  # an evaluation: not training time
                now[0] += 50.0
        rates.append(meter.read((window + 1) * 10))
        etas.append(meter.eta)
    assert rates[:2] == [8.0, pytest.approx(2.667, abs=1e-3)]  # each window's own rate
    truth = [(100 - (w + 1) * 10) * 2.0 for w in range(10)]  # the steps left at the average 2 s per step
    errors = [abs(eta - t) / t for eta, t in zip(etas[:-1], truth[:-1])]
    assert etas[-1] == 0 and etas[2] == pytest.approx(70 * 50 / 30)  # the pace so far: 50 s for 30 steps
    assert errors[1::2] == [0.0] * 4 and max(errors[1:]) < 0.2  # a window's own rate is 50% off, every time
    assert all(later < earlier for earlier, later in zip(errors[2::2], errors[4::2]))  # and it converges
    assert meter.read(100) is None  # no step since the last reading
