"""Sweeps: a grid with a failing trial, a resumed Optuna search, trials side by side (joblib), the leaderboard, and
how one trial records success, failure and a non-finite objective."""

from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path

import pytest

from helpers.processes import run_cli
from helpers.sweeps import TINY, fake_trial, trial_config, trial_record


# --- a grid: every combination, one failing, two trials at a time (joblib) -----------------------------------
@pytest.fixture(scope="module")
def grid(tiny_bert, sweep_work):
    """A real sweep of 4 trials (its tests are marked slow: they share its cost)."""
    # peft.r=0 is a bad value only for LoRA: trial 3 (lora, r=0) fails, full fine-tuning ignores r
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}  # joblib sets it per worker
    proc = run_cli("-m", f"model={tiny_bert}", *TINY, "trainer.learning_rate=1e-3", "peft=none,lora", "peft.r=8,0",
                   "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "hydra.sweep.dir=grid", cwd=sweep_work,
                   env=env)
    return proc, sweep_work / "grid"


@pytest.mark.slow
def test_grid_runs_every_combination_and_survives_a_failure(grid):
    proc, sweep = grid
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert f"error: 1 trial(s) failed (see their trial.json): {Path('grid') / '3'}" in proc.stderr
    combos = {n: trial_record(sweep, n)["overrides"][-2:] for n in range(4)}
    assert combos == {0: ["peft=none", "peft.r=8"], 1: ["peft=none", "peft.r=0"], 2: ["peft=lora", "peft.r=8"],
                      3: ["peft=lora", "peft.r=0"]}
    for n in range(3):  # each a normal run: exported, verified through the pipeline, its objective returned
        record, metrics = trial_record(sweep, n), json.loads((sweep / str(n) / "metrics.json").read_text())
        assert record["status"] == "ok" and record["objective"] == "validation_accuracy"
        assert record["value"] == metrics["validation_accuracy"]
        assert "pipeline_test_accuracy" in metrics and (sweep / str(n) / "model" / "model.safetensors").is_file()
    failed = trial_record(sweep, 3)
    assert failed["status"] == "failed" and "value" not in failed
    assert failed["error"].startswith("peft.r must be >= 1") and "\n" not in failed["error"]
    assert not (sweep / "3" / "model").exists()


@pytest.mark.slow
def test_grid_leaderboard_files_and_best_link(grid):
    _, sweep = grid
    rows = list(csv.DictReader((sweep / "leaderboard.csv").open()))
    assert [r["trial"] for r in rows][-1] == "3" and len(rows) == 4
    ok = [r for r in rows if r["status"] == "ok"]
    assert [r["rank"] for r in ok] == ["1", "2", "3"] and rows[-1]["rank"] == "-"
    values = [float(r["validation_accuracy"]) for r in ok]
    assert values == sorted(values, reverse=True)
    assert rows[-1]["status"] == "failed" and rows[-1]["error"].startswith("peft.r must be >= 1")
    assert {r["peft"] for r in rows} == {"none", "lora"} and {r["peft.r"] for r in rows} == {"8", "0"}
    assert rows[0]["train_samples_per_s"] and rows[0]["runtime_s"] and rows[0]["pipeline_test_accuracy"]
    md = (sweep / "leaderboard.md").read_text()
    assert "selection uses the validation split only" in md and "failed: peft.r must be >= 1" in md
    assert (sweep / "leaderboard.png").read_bytes()[:4] == b"\x89PNG"
    best = sweep / "best"
    assert best.is_symlink() and best.resolve() == (sweep / ok[0]["trial"] / "model").resolve()
    assert (best / "config.json").is_file()


@pytest.mark.slow
def test_leaderboard_cli(grid, capsys, tmp_path):
    from finetune.leaderboard import main

    _, sweep = grid
    (sweep / "leaderboard.md").unlink()
    assert main([str(sweep)]) == 0
    out = capsys.readouterr().out
    assert "ranked by validation_accuracy (maximize)" in out and "failed: peft.r must be" in out
    assert (sweep / "leaderboard.md").is_file()
    assert main([str(tmp_path)]) == 2
    assert capsys.readouterr().err.startswith(f"error: no trials in {tmp_path}")


# --- an Optuna search, interrupted and resumed from its storage ---------------------------------------------
@pytest.mark.slow
def test_optuna_search_resumes_from_its_storage(tiny_bert, sweep_work, monkeypatch, capfd, one_thread):
    import optuna

    from helpers.cli import cli_main

    # both launches in this process (the grid above is a real one); trials run one after another, in-process
    args = ["-m", "hparams_search=sentiment_optuna", f"model={tiny_bert}", *TINY, "hydra.sweep.dir=search"]
    code, _, err = cli_main([*args, "hydra.sweeper.n_trials=2"], sweep_work, monkeypatch, capfd)
    assert code == 0, err[-3000:]
    sweep, storage = sweep_work / "search", f"sqlite:///{sweep_work / 'search' / 'optuna.db'}"
    before = {n: (sweep / str(n) / "trial.json").read_text() for n in (0, 1)}
    # what a launch killed during trial 2 leaves: a RUNNING trial in the study and a trial dir without a result
    optuna.load_study(study_name="search", storage=storage).ask()
    (sweep / "2").mkdir()
    killed = {"trial": 2, "status": "running", "overrides": trial_record(sweep, 1)["overrides"]}
    (sweep / "2" / "trial.json").write_text(json.dumps(killed))

    code, out, err = cli_main([*args, "hydra.sweeper.n_trials=3"], sweep_work, monkeypatch, capfd)
    assert code == 1, err[-3000:]  # trial 2 never finished (its record names no launch: counted as this one's)
    assert "continuing study 'search': 2 trials finished, 0 running in other launches, 1 interrupted, 1 to go" in out
    study = optuna.load_study(study_name="search", storage=storage)
    assert [t.state.name for t in study.trials] == ["COMPLETE", "COMPLETE", "FAIL", "COMPLETE"]
    assert {n: (sweep / str(n) / "trial.json").read_text() for n in (0, 1)} == before  # not overwritten
    params = []
    for t in study.trials[:2] + study.trials[3:]:
        record = trial_record(sweep, t.number)
        assert record["status"] == "ok" and record["value"] == pytest.approx(t.value)
        assert f"trainer.learning_rate={t.params['trainer.learning_rate']}" in record["overrides"]
        params.append(t.params)
    assert len({p["trainer.learning_rate"] for p in params}) == 3  # the resumed launch does not replay draws
    rows = list(csv.DictReader((sweep / "leaderboard.csv").open()))
    assert sorted(r["trial"] for r in rows) == ["0", "1", "2", "3"]
    assert [r["status"] for r in rows if r["trial"] == "2"] == ["unfinished"]
    assert (sweep / "leaderboard.png").is_file() and (sweep / "best" / "config.json").is_file()


@pytest.mark.slow
def test_joblib_runs_two_trials_at_a_time_with_the_cores_split(grid):
    from joblib import cpu_count

    proc, sweep = grid
    assert "Joblib.Parallel(n_jobs=2" in proc.stdout
    assert {trial_record(sweep, n)["torch_threads"] for n in range(3)} == {max(1, cpu_count() // 2)}
    logs = [(sweep / str(n) / "finetune.log").read_text().splitlines() for n in (0, 1)]
    first_ends, second_starts = logs[0][-1][:24], logs[1][0][:24]  # "[YYYY-mm-dd HH:MM:SS,mmm"
    assert second_starts < first_ends  # trial 1 started before trial 0 finished


# --- the leaderboard on hand-written trial records ------------------------------------------------------------
def test_leaderboard_ranks_by_the_task_direction_and_marks_failures(tmp_path):
    from finetune.leaderboard import build

    sweep = tmp_path / "sweep"
    lm = {"objective": "validation_perplexity", "direction": "minimize"}
    for n, (lr, ppl) in enumerate([(1e-5, 30.0), (1e-3, 12.5), (1e-4, 20.0)]):
        fake_trial(sweep, n, [f"trainer.learning_rate={lr}", "seed=1"], {**lm, "status": "ok", "value": ppl},
                   {"validation_perplexity": ppl, "test_perplexity": ppl + 1, "pipeline_test_perplexity": ppl + 1,
                    "total_runtime_s": 10.0, "train_samples_per_second": 50.0})
    fake_trial(sweep, 3, ["trainer.learning_rate=0.1", "seed=1"], {**lm, "status": "failed",
                                                                   "error": "training diverged: validation_loss is nan"})
    fake_trial(sweep, 4, ["trainer.learning_rate=0.01", "seed=1"], None)  # killed before it wrote anything
    board = build(sweep)
    assert [r["trial"] for r in board.rows] == [1, 2, 0, 3, 4]  # lowest perplexity first, then failed, unfinished
    assert [r["rank"] for r in board.rows] == [1, 2, 3, None, None]
    assert [r["status"] for r in board.rows[3:]] == ["failed", "unfinished"]
    assert board.swept == ["trainer.learning_rate"] and board.fixed == ["seed=1"]
    assert board.log_scale == {"trainer.learning_rate"}  # positive values spanning more than 10x
    assert board.rows[0]["test"] == 13.5 and board.rows[0]["pipeline"] == 13.5
    board.write()
    assert os.readlink(sweep / "best") == os.path.join("1", "model")
    table = board.table()
    assert "ranked by validation_perplexity (minimize)" in table
    assert "failed: training diverged: validation_loss is nan" in table and "unfinished: never finished" in table


def test_a_launch_reports_its_own_failed_trials_not_another_launchs(tmp_path, monkeypatch):
    """Two launches continuing one sweep: each exits 1 for the trials it ran that failed or never finished, not for
    the other's (still running, or failed); the leaderboard it writes ranks every trial of both."""
    from omegaconf import OmegaConf

    from finetune import leaderboard, trials

    sweep = tmp_path / "sweep"
    acc = {"objective": "validation_accuracy", "direction": "maximize"}
    monkeypatch.setenv(trials.LAUNCH_ENV, "here:1")
    fake_trial(sweep, 0, ["seed=1"], {**acc, "status": "ok", "value": 0.7, "launch": "here:1"}, {})
    fake_trial(sweep, 1, ["seed=2"], {**acc, "status": "failed", "error": "boom", "launch": "here:1"})
    fake_trial(sweep, 2, ["seed=3"], {**acc, "status": "running", "launch": "here:1"})  # killed in this launch
    fake_trial(sweep, 3, ["seed=4"], {**acc, "status": "running", "launch": "there:2"})  # the other, still running
    fake_trial(sweep, 4, ["seed=5"], {**acc, "status": "failed", "error": "oom", "launch": "there:2"})
    leaderboard.LeaderboardCallback().on_multirun_end(OmegaConf.create({"hydra": {"sweep": {"dir": str(sweep)}}}))
    assert leaderboard.failed_trials == [str(sweep / "1"), str(sweep / "2")]
    rows = list(csv.DictReader((sweep / "leaderboard.csv").open()))
    assert sorted(r["trial"] for r in rows) == ["0", "1", "2", "3", "4"]
    assert not [p for p in sweep.iterdir() if p.name.startswith(".")]  # no temp file left


# --- one trial ---------------------------------------------------------------------------------------------
@pytest.fixture
def trial_cfg():
    from hydra.core.hydra_config import HydraConfig

    yield trial_config()
    HydraConfig.instance().cfg = None


@pytest.mark.parametrize("outcome, value, error", [
    ({"validation_accuracy": 0.75}, 0.75, None),
    ({"validation_accuracy": math.nan}, None, "the objective validation_accuracy is nan"),
    ({"validation_accuracy": math.inf}, None, "the objective validation_accuracy is inf"),
    (RuntimeError("CUDA out of memory.\nTried to allocate 2 GiB"), None,
     "RuntimeError: CUDA out of memory. Tried to allocate 2 GiB"),
])
def test_a_trial_records_its_outcome(trial_cfg, tmp_path, monkeypatch, outcome, value, error):
    import finetune.run
    from finetune.sweep import run_trial

    def fake_run(cfg, run_dir, on_evaluate=None):
        assert json.loads((run_dir / "trial.json").read_text())["status"] == "running"  # written before it runs
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    monkeypatch.setattr(finetune.run, "run", fake_run)
    assert run_trial(trial_cfg, tmp_path / "7") == value
    record = json.loads((tmp_path / "7" / "trial.json").read_text())
    assert record["trial"] == 7 and "trainer.learning_rate=0.5" in record["overrides"]
    assert record["status"] == ("ok" if error is None else "failed")
    assert (record.get("error") is None) if error is None else record["error"].startswith(error)


def test_a_nan_objective_error_names_the_fix(trial_cfg, tmp_path, monkeypatch):
    import finetune.run
    from finetune.sweep import run_trial

    monkeypatch.setattr(finetune.run, "run", lambda cfg, run_dir, on_evaluate=None: {"validation_accuracy": math.nan})
    assert run_trial(trial_cfg, tmp_path / "7") is None
    assert "lower trainer.learning_rate" in json.loads((tmp_path / "7" / "trial.json").read_text())["error"]


def test_the_sweeper_direction_must_match_the_task(tmp_path, monkeypatch):
    import finetune.run
    from hydra.core.hydra_config import HydraConfig

    from finetune.sweep import run_trial

    cfg = trial_config("hydra/sweeper=finetune_optuna", "hydra.sweeper.direction=minimize")
    monkeypatch.setattr(finetune.run, "run", lambda cfg, run_dir, on_evaluate=None: pytest.fail("must not train"))
    try:
        assert run_trial(cfg, tmp_path / "7") is None
    finally:
        HydraConfig.instance().cfg = None
    error = json.loads((tmp_path / "7" / "trial.json").read_text())["error"]
    assert error.startswith("hydra.sweeper.direction=minimize, but this task's objective validation_accuracy must "
                            "be maximized")


@pytest.mark.parametrize("search, direction", [("sentiment_optuna", "maximize"), ("ner_optuna", "maximize"),
                                               ("qa_optuna", "maximize"), ("generation_optuna", "minimize"),
                                               ("multi_label_optuna", "maximize"), ("preference_optuna", "maximize"),
                                               ("regression_optuna", "maximize")])
def test_search_configs_compose_into_an_optuna_search_space(search, direction):
    from hydra import compose, initialize_config_dir
    from hydra_plugins.finetune_sweeper._space import search_space
    from optuna.distributions import FloatDistribution

    import finetune.sweep  # noqa: F401  (registers the task_direction resolver)
    from finetune.compose import register_configs
    from finetune.config import CONFIG_DIR

    register_configs()
    with initialize_config_dir(version_base=None, config_dir=str(CONFIG_DIR)):
        cfg = compose("config", overrides=[f"hparams_search={search}"], return_hydra_config=True)
    sweeper = cfg.hydra.sweeper
    assert sweeper._target_ == "hydra_plugins.finetune_sweeper.FinetuneOptunaSweeper"
    assert sweeper.direction == direction  # perplexity is minimized, accuracy and F1 maximized
    assert sweeper.sampler.seed == cfg.seed and sweeper.max_failure_rate == 1.0
    space, fixed = search_space([f"{k}={v}" for k, v in sweeper.params.items()])
    learning_rate = space["trainer.learning_rate"]
    assert isinstance(learning_rate, FloatDistribution) and learning_rate.log and not fixed
    assert {"trainer.num_train_epochs", "trainer.warmup_ratio"} <= set(space)
    assert ({"peft.r", "peft.alpha"} <= set(space)) == (cfg.peft.method == "lora")


def test_direction_comes_from_the_task():
    from finetune import sweep

    assert sweep.direction("generation") == "minimize" and sweep.direction("classification") == "maximize"
    assert sweep.direction("causal_lm") == "minimize"  # (a name configs of an earlier release saved)


@pytest.mark.slow
def test_a_diverging_run_stops_with_a_one_line_error(tiny_bert, sweep_work, tmp_path, one_thread):
    """A NaN loss leaves argmax scores that look valid (every prediction the same class): the run must fail."""
    from finetune.errors import FinetuneError
    from finetune.run import run
    from helpers.cli import compose_cfg

    overrides = [a.replace("data=reviews.csv", f"data={sweep_work / 'reviews.csv'}") for a in TINY]
    cfg = compose_cfg(*overrides, f"model={tiny_bert}", "trainer.learning_rate=1e30")
    with pytest.raises(FinetuneError, match=r"^training diverged: validation_loss is nan; lower "
                                            r"trainer.learning_rate \(now 1e\+30\)$"):
        run(cfg, tmp_path / "run")
    assert not (tmp_path / "run" / "model").exists()


def test_slurm_launcher_config_fits_the_plugin():
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="the optional finetune[slurm] extra")
    from hydra import compose, initialize_config_dir

    from finetune.compose import register_configs
    from finetune.config import CONFIG_DIR

    register_configs()
    with initialize_config_dir(version_base=None, config_dir=str(CONFIG_DIR)):
        cfg = compose("config", overrides=["hydra/launcher=slurm", "hydra.launcher.partition=gpu"],
                      return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher") and launcher.partition == "gpu"
    assert launcher.tasks_per_node == 1 and launcher.cpus_per_task == 8


def test_an_unknown_search_is_a_one_line_error():
    from finetune.__main__ import rewrite_overrides
    from finetune.errors import FinetuneError

    assert rewrite_overrides(["hparams_search=ner_optuna"]) == ["hparams_search=ner_optuna"]
    with pytest.raises(FinetuneError, match="^unknown hparams_search 'sentimnt_optuna': did you mean "
                                            "hparams_search=sentiment_optuna\\? choose one of generation_optuna, "
                                            "multi_label_optuna, ner_optuna, preference_optuna, qa_optuna, "
                                            "regression_optuna, sentiment_optuna$"):
        rewrite_overrides(["hparams_search=sentimnt_optuna"])
