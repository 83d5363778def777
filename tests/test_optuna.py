"""The Optuna sweeper (hydra_plugins/finetune_sweeper): Hydra's sweep syntax as Optuna distributions, bad search
settings, and pruning: both engines report each evaluation, a pruned trial's records, a pruned trial under joblib."""

from __future__ import annotations

import csv
import json
import os

import pytest

from helpers.data import scalars
from helpers.processes import run_cli
from helpers.sweeps import TINY, fake_trial, trial_config, trial_record


# --- the search space -------------------------------------------------------------------------------------
@pytest.mark.parametrize("text, expected", [
    ("choice(8, 16, 32)", "Categorical((8, 16, 32))"),
    ("8,16", "Categorical((8, 16))"),  # a command-line sweep
    ("choice(lora, none)", "Categorical(('lora', 'none'))"),
    ("shuffle(range(1, 4))", "Categorical((1, 2, 3))"),  # sorted: every launch of a study gets the same choices
    ("interval(0.0, 0.2)", "Float(0.0, 0.2, log=False, step=None)"),
    ("interval(1, 5)", "Int(1, 5, log=False, step=1)"),  # both ends written as ints
    ("interval(1, 5.0)", "Float(1.0, 5.0, log=False, step=None)"),
    ("tag(log, interval(1e-5, 1e-3))", "Float(1e-05, 0.001, log=True, step=None)"),
    ("tag(log, interval(2, 64))", "Int(2, 64, log=True, step=1)"),
    ("range(1, 10, 3)", "Int(1, 7, log=False, step=3)"),  # Hydra's range: the stop value is excluded
    ("range(4)", "Int(0, 3, log=False, step=1)"),
    ("range(5, 0, -2)", "Int(1, 5, log=False, step=2)"),
    ("range(0.1, 0.5, 0.1)", "Float(0.1, 0.4, log=False, step=0.1)"),
])
def test_sweep_syntax_maps_to_optuna_distributions(text, expected):
    from hydra_plugins.finetune_sweeper._space import search_space
    from optuna.distributions import CategoricalDistribution, FloatDistribution

    (dist,), fixed = search_space([f"key={text}"])[0].values(), search_space([f"key={text}"])[1]
    if isinstance(dist, CategoricalDistribution):
        got = f"Categorical({dist.choices})"
    else:
        kind = "Float" if isinstance(dist, FloatDistribution) else "Int"
        got = f"{kind}({dist.low}, {round(dist.high, 10)}, log={dist.log}, step={dist.step})"
    assert got == expected and fixed == []


def test_fixed_overrides_pass_through_and_bad_forms_are_one_line_errors():
    from hydra_plugins.finetune_sweeper._space import search_space

    from finetune.errors import FinetuneError

    space, fixed = search_space(["peft=lora", "+extra=3", "~key", "seed=1", "seed=2", "a=choice(1,2)", "a=7"])
    assert space == {} and fixed == ["peft=lora", "+extra=3", "~key", "seed=2", "a=7"]  # a later override wins
    with pytest.raises(FinetuneError, match=r"^x: tag\(log, ...\) applies to interval\(lo, hi\) only"):
        search_space(["x=tag(log, choice(1, 2))"])
    with pytest.raises(FinetuneError, match=r"^x=range\(3, 3\) is empty \(range excludes its stop value\)$"):
        search_space(["x=range(3, 3)"])


# --- the sweeper's loop, with a stand-in launcher (no training) ---------------------------------------------
class FakeLauncher:
    """Runs each job as outcome(its overrides as a dict): a value, None (the trial failed and said so), an
    optuna.TrialPruned (returned, as a pruned trial does), or an exception it raises (Hydra marks the job FAILED)."""

    def __init__(self, outcome):
        self.outcome, self.calls = outcome, []

    def launch(self, job_overrides, initial_job_idx):
        from hydra.core.utils import JobReturn, JobStatus

        self.calls.append((initial_job_idx, [list(o) for o in job_overrides]))
        returns = []
        for overrides in job_overrides:
            try:
                value = self.outcome(dict(o.split("=", 1) for o in overrides))
                returns.append(JobReturn(status=JobStatus.COMPLETED, _return_value=value))
            except Exception as e:
                returns.append(JobReturn(status=JobStatus.FAILED, _return_value=e))
        return returns


def _sweep(tmp_path, outcome, arguments=(), **settings):
    from omegaconf import OmegaConf

    from hydra_plugins.finetune_sweeper import FinetuneOptunaConf, FinetuneOptunaSweeper

    cfg = OmegaConf.merge(OmegaConf.structured(FinetuneOptunaConf), {
        "storage": f"sqlite:///{tmp_path / 'sweep' / 'optuna.db'}", "n_trials": 4, "n_jobs": 2,
        "sampler": {"seed": 0}, "params": {"x": "interval(0.0, 1.0)", "seed": 3}, **settings})
    sweeper = FinetuneOptunaSweeper(**{k: v for k, v in cfg.items() if k != "_target_"})
    sweeper.launcher = FakeLauncher(outcome)
    sweeper.sweep(list(arguments))
    return sweeper.launcher.calls


def test_the_sweeper_asks_in_batches_tells_each_outcome_and_counts_the_whole_study(tmp_path):
    import optuna

    results = iter([0.5, None, optuna.TrialPruned(), 0.75])
    calls = _sweep(tmp_path, lambda params: next(results), arguments=["peft=lora", "n=1,2"])
    assert [(first, len(batch)) for first, batch in calls] == [(0, 2), (2, 2)]  # job numbers = trial numbers
    overrides = calls[0][1][0]
    assert overrides[:2] == [o for o in overrides if o.split("=")[0] in ("x", "n")]  # the sampled ones first
    assert overrides[2:] == ["seed=3", "peft=lora"] and overrides[1] in ("n=1", "n=2")
    study = optuna.load_study(study_name="search", storage=f"sqlite:///{tmp_path / 'sweep' / 'optuna.db'}")
    assert [t.state.name for t in study.trials] == ["COMPLETE", "FAIL", "PRUNED", "COMPLETE"]
    assert study.best_trial.number == 3 and study.trials[0].value == 0.5

    # a killed launch left trial 4 running: marked failed, and replaced: n_trials counts the study's finished trials
    study.ask()
    results = iter([0.1, 0.2])
    calls = _sweep(tmp_path, lambda params: next(results), n_trials=6)
    assert [(first, len(batch)) for first, batch in calls] == [(5, 2)]  # numbered on after the study's trials
    study = optuna.load_study(study_name="search", storage=f"sqlite:///{tmp_path / 'sweep' / 'optuna.db'}")
    assert [t.state.name for t in study.trials][4:] == ["FAIL", "COMPLETE", "COMPLETE"]
    assert _sweep(tmp_path, lambda params: pytest.fail("the study is complete"), n_trials=6) == []


def test_the_search_stops_past_its_failure_rate(tmp_path):
    def crash(params):
        raise RuntimeError("the job crashed")

    calls = _sweep(tmp_path, crash, n_trials=6, max_failure_rate=0.5)
    assert len(calls) == 1  # 2 of 2 failed (> 0.5): no second batch
    calls = _sweep(tmp_path / "again", crash, n_trials=6)  # max_failure_rate=1.0: every trial runs
    assert [len(batch) for _, batch in calls] == [2, 2, 2]


# --- pruning ----------------------------------------------------------------------------------------------
def _study_with_a_finished_trial(storage: str, curve: dict[int, float]):
    """A study whose one finished trial reported `curve` (evaluation -> value): under the median pruner (one startup
    trial) a later trial whose best value so far is below the curve's value at the same evaluation is pruned."""
    import optuna

    study = optuna.create_study(study_name="search", storage=storage, direction="maximize")
    study.add_trial(optuna.trial.create_trial(value=max(curve.values()), intermediate_values=curve))
    return study


@pytest.mark.parametrize("engine", ["hf", "accelerate"])
@pytest.mark.slow
def test_both_engines_report_each_evaluation_and_stop_when_told(engine, tiny_bert, sweep_work, tmp_path,
                                                                one_thread, monkeypatch):
    import mlflow
    import optuna

    from finetune.run import run
    from helpers.cli import compose_cfg

    overrides = [a.replace("data=reviews.csv", f"data={sweep_work / 'reviews.csv'}") for a in TINY]
    heard = []
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = compose_cfg(*overrides, f"model={tiny_bert}", f"trainer={engine}", "trainer.max_steps=4",
                      "trainer.eval_strategy=steps", "trainer.eval_steps=1", f"runs_dir={tmp_path}",
                      "trainer.report_to=[tensorboard,mlflow]")

    def listener(value):
        heard.append(value)
        if len(heard) == 2:
            raise optuna.TrialPruned()

    with pytest.raises(optuna.TrialPruned):
        run(cfg, tmp_path / "run", on_evaluate=listener)
    assert len(heard) == 2 and all(0 <= v <= 1 for v in heard)  # validation accuracy, then training stopped
    assert not (tmp_path / "run" / "model").exists()
    # the trackers closed as at the end of training: the events hold both evaluations, no MLflow run is left open
    # (the next trial of a sweep in this process would log into it)
    assert [v for _, v in scalars(tmp_path / "run" / "tensorboard")["eval/accuracy"]] == pytest.approx(heard)
    assert mlflow.active_run() is None


def test_a_pruned_trial_is_recorded_as_pruned(tmp_path, monkeypatch):
    import finetune.run
    import optuna
    from hydra.core.hydra_config import HydraConfig

    from finetune.sweep import run_trial

    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    study = _study_with_a_finished_trial(storage, {1: 0.5, 2: 1.0})
    assert study.ask().number == 1  # what the sweeper asked before it launched this trial
    cfg = trial_config("hydra/sweeper=finetune_optuna", f"hydra.sweeper.storage={storage}",
                       "hydra.sweeper.pruner=median", "hydra.sweeper.median.n_startup_trials=1", num=1)
    (tmp_path / "1" / "checkpoints" / "checkpoint-3").mkdir(parents=True)

    def fake_run(cfg, run_dir, on_evaluate=None):
        on_evaluate(0.5)  # as good as the finished trial: goes on
        on_evaluate(0.25)  # its best (0.5) is worse than the finished trial's 1.0 at evaluation 2: stopped here
        pytest.fail("the pruner did not stop the trial")

    monkeypatch.setattr(finetune.run, "run", fake_run)
    try:
        outcome = run_trial(cfg, tmp_path / "1")
    finally:
        HydraConfig.instance().cfg = None
    assert isinstance(outcome, optuna.TrialPruned)  # what the sweeper tells the study as PRUNED
    record = json.loads((tmp_path / "1" / "trial.json").read_text())
    assert record["status"] == "pruned" and record["step"] == 2 and record["value"] == 0.25
    assert "error" not in record and not (tmp_path / "1" / "checkpoints").exists()  # nothing left to resume
    assert study.trials[1].intermediate_values == {1: 0.5, 2: 0.25}


@pytest.mark.slow
def test_a_pruned_trial_under_the_joblib_launcher(tiny_bert, sweep_work):
    """Trials in worker processes attach to their Optuna trials in the sweep's sqlite storage. Trial 1 does not
    evaluate while training (it cannot be pruned) and finishes, trial 2 is pruned at its first evaluation, trial 3
    fails on its bad learning rate; trials 1 and 2 run side by side."""
    import optuna

    sweep = sweep_work / "pruned"
    storage = f"sqlite:///{sweep / 'optuna.db'}"
    sweep.mkdir()
    study = _study_with_a_finished_trial(storage, {1: 1.0})  # no tiny trial scores 1.0: any that evaluates is pruned
    for params in ({"trainer.eval_strategy": "no", "trainer.learning_rate": 1e-3},
                   {"trainer.eval_strategy": "steps", "trainer.learning_rate": 1e-3},
                   {"trainer.eval_strategy": "steps", "trainer.learning_rate": -1.0}):
        study.enqueue_trial(params)
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    proc = run_cli("-m", f"model={tiny_bert}", *TINY, "hydra/sweeper=finetune_optuna",
                   "trainer.eval_strategy=choice(steps, no)", "trainer.eval_steps=1",
                   "trainer.learning_rate=choice(-1.0, 1e-3)",
                   "hydra.sweeper.n_trials=4", "hydra.sweeper.n_jobs=2", "hydra.sweeper.pruner=median",
                   "hydra.sweeper.median.n_startup_trials=1", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2",
                   f"hydra.sweep.dir={sweep}", cwd=sweep_work, env=env)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1] == f"error: 1 trial(s) failed (see their trial.json): {sweep / '3'}"
    assert "Joblib.Parallel(n_jobs=2" in proc.stdout
    study = optuna.load_study(study_name="search", storage=storage)
    assert [t.state.name for t in study.trials] == ["COMPLETE", "COMPLETE", "PRUNED", "FAIL"]
    assert study.trials[2].value == study.trials[2].intermediate_values[1] < 1.0  # stopped at its 1st evaluation
    records = {n: trial_record(sweep, n) for n in (1, 2, 3)}
    assert [records[n]["status"] for n in (1, 2, 3)] == ["ok", "pruned", "failed"]
    assert records[2]["step"] == 1 and records[2]["value"] == study.trials[2].value
    assert (sweep / "1" / "model").is_dir() and not (sweep / "2" / "model").exists()
    assert not (sweep / "2" / "checkpoints").exists() and not (sweep / "2" / "metrics.json").exists()
    rows = list(csv.DictReader((sweep / "leaderboard.csv").open()))
    assert [(r["trial"], r["rank"], r["status"]) for r in rows] == [("1", "1", "ok"), ("2", "-", "pruned"),
                                                                    ("3", "-", "failed")]
    assert "pruned: 1 of 3 trials" in (sweep / "leaderboard.md").read_text()
    assert os.readlink(sweep / "best") == os.path.join("1", "model")


def test_pruned_trials_rank_after_finished_ones_and_are_no_failures(tmp_path):
    from finetune.leaderboard import build

    sweep = tmp_path / "sweep"
    acc = {"objective": "validation_accuracy", "direction": "maximize"}
    fake_trial(sweep, 0, ["trainer.learning_rate=0.001"], {**acc, "status": "ok", "value": 0.7},
               {"validation_accuracy": 0.7})
    fake_trial(sweep, 1, ["trainer.learning_rate=0.0001"], {**acc, "status": "pruned", "step": 1, "value": 0.55})
    fake_trial(sweep, 2, ["trainer.learning_rate=0.01"], {**acc, "status": "pruned", "step": 2, "value": 0.9})
    fake_trial(sweep, 3, ["trainer.learning_rate=0.1"], {**acc, "status": "failed", "error": "boom"})
    board = build(sweep)
    assert [(r["trial"], r["rank"], r["status"]) for r in board.rows] == [
        (0, 1, "ok"), (2, None, "pruned"), (1, None, "pruned"), (3, None, "failed")]
    assert [r["trial"] for r in board.failed] == [3] and board.best["trial"] == 0
    assert "pruned at evaluation 2" in board.table() and "pruned: 2 of 4 trials" in board.table()
    board.write()
    assert (sweep / "leaderboard.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("overrides, error", [
    (["hydra.sweeper.storage=null", "hydra.sweeper.pruner=median"],
     "hydra.sweeper.pruner=median needs the study in a storage the trials can reach "
     "(hydra.sweeper.storage=sqlite:///<file>), not in memory"),
    (["hydra.sweeper.pruner=medain"], "unknown hydra.sweeper.pruner 'medain': choose one of none, median, hyperband"),
    (["trainer.per_device_train_batch_size=range(8, 8)"],
     "trainer.per_device_train_batch_size=range(8, 8) is empty (range excludes its stop value)"),
])
def test_bad_search_settings_are_one_line_errors(overrides, error, tmp_path, monkeypatch, capfd):
    from helpers.cli import fail

    args = ["-m", "hydra/sweeper=finetune_optuna", "trainer.learning_rate=choice(1e-4, 1e-3)", *overrides]
    assert fail(args, tmp_path, monkeypatch, capfd) == error
    assert list(tmp_path.iterdir()) == []  # no sweep directory, no study
