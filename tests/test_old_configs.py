"""What earlier releases saved still works: a run directory whose config.yaml was written under a task's old name
(tests/data/ner_config.yaml: written by the release whose tasks were named token_classification, causal_lm and
masked_lm) resumes, and exports recording an old name predict and evaluate."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest

from helpers.cli import cli_main, engine_for

pytestmark = pytest.mark.usefixtures("one_thread")
DATA = Path(__file__).parent / "data"
ARGS = ["task=ner", "trainer.num_train_epochs=2", "trainer.learning_rate=2e-3", "trainer.per_device_train_batch_size=8",
        "trainer.eval_strategy=steps", "trainer.eval_steps=2", "trainer.max_steps=4", "trainer.report_to=[]"]


def _conll(path: Path, sentences: int) -> Path:
    rng, lines = random.Random(0), []
    for _ in range(sentences):
        words = rng.sample(["the", "film", "was", "shot", "in", "by", "with", "and"], 4)
        at = rng.randrange(4)
        words[at:at] = [rng.choice(["Paris", "Rome", "Oslo"])]
        lines += [f"{w} {'B-LOC' if i == at else 'O'}" for i, w in enumerate(words)] + [""]
    path.write_text("\n".join(lines))
    return path


@pytest.fixture(scope="module")
def resumed(tiny_bert, tmp_path_factory):
    """A run directory holding the old release's config.yaml and a checkpoint, resumed by this release's CLI."""
    work = tmp_path_factory.mktemp("old-run")
    data = work / "conll"
    data.mkdir()
    _conll(data / "train.conll", 48), _conll(data / "dev.conll", 12), _conll(data / "test.conll", 12)
    run_dir = work / "runs" / "ner" / "2026-12-01_10-00-00"
    run_dir.mkdir(parents=True)
    text = (DATA / "ner_config.yaml").read_text().replace("<MODEL>", str(tiny_bert)).replace("<DATA>", str(data))
    (run_dir / "config.yaml").write_text(text)
    engine = engine_for(run_dir, f"model={tiny_bert}", f"data={data}", *ARGS[:-2], "trainer.max_steps=2",
                        "trainer.report_to=[]")
    engine.train()  # checkpoint-2, as the interrupted run left it
    return work, run_dir, data


@pytest.mark.slow
def test_a_run_saved_under_an_old_task_name_resumes(resumed, tiny_bert, monkeypatch, capfd):
    work, run_dir, data = resumed
    assert "name: token_classification" in (run_dir / "config.yaml").read_text()
    code, _, err = cli_main([f"model={tiny_bert}", f"data={data}", *ARGS, "resume=true"], work, monkeypatch, capfd)
    assert code == 0, err[-3000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["pipeline_test_f1"] == pytest.approx(metrics["test_f1"], abs=0.01)
    assert [p.name for p in (work / "runs" / "ner").iterdir()] == [run_dir.name]  # continued, not started anew


@pytest.mark.slow
def test_an_export_recording_an_old_task_name_predicts_and_evaluates(resumed, tmp_path, monkeypatch):
    from finetune import evaluate, predict

    _, run_dir, data = resumed
    model = tmp_path / "model"
    shutil.copytree(run_dir / "model", model)
    config = json.loads((model / "config.json").read_text())
    config["finetune"]["task"]["name"] = "token_classification"  # what that release recorded
    (model / "config.json").write_text(json.dumps(config))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "texts.jsonl").write_text('{"tokens": ["shot", "in", "Rome"]}\n')
    predict.main([str(model), "texts.jsonl", "--output", "predictions.jsonl"])
    assert "entities" in json.loads((tmp_path / "predictions.jsonl").read_text())
    result = evaluate.evaluate(model, [f"data={data / 'test.conll'}"], tmp_path / "evaluation.json")
    assert result["num_examples"] == 12 and 0 <= result["f1"] <= 1


@pytest.mark.parametrize("old, new", [("generation", "generation"), ("mlm", "mlm")])
def test_old_task_records_map_to_the_tasks_of_today(old, new):
    """The task configs that release recorded for task=generation (causal_lm) and task=mlm (masked_lm)."""
    from finetune.tasks import get_task, registry

    record = json.loads((DATA / f"{old}_task_record.json").read_text())
    assert record["name"] != new
    task = get_task(record)
    assert type(task) is registry()[new] and task.cfg.name == new
    assert {k: v for k, v in task.cfg.items() if k in record and k != "name"} == \
        {k: v for k, v in record.items() if k != "name"}
