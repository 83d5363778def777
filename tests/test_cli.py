"""The whole run as a user types it, on the tiny model: files, export, pipeline check, errors."""

import json

import pytest
import yaml

from helpers.cli import TINY_TRAINER, cli_main, compose_cfg, fail
from helpers.data import write_sentiment_csv
from helpers.processes import run_cli

SECRET = "hf_test_token_never_written_0123456789"


@pytest.fixture(scope="module")
def finished_run(tiny_bert, tmp_path_factory):
    """One real CLI run (its tests are marked slow: they share its cost)."""
    work = tmp_path_factory.mktemp("cli")
    write_sentiment_csv(work / "reviews.csv")
    proc = run_cli("task=sentiment", f"model={tiny_bert}", "data=reviews.csv", "data.text_column=review",
                   "data.label_column=sentiment", *TINY_TRAINER, cwd=work, env={"HF_TOKEN": SECRET})
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = list((work / "runs" / "sentiment").iterdir())
    assert len(runs) == 1
    return runs[0]


@pytest.mark.slow
def test_run_directory_layout(finished_run):
    names = {p.name for p in finished_run.iterdir()}
    assert {"model", "metrics.json", "config.yaml", "finetune.log", "learning_curve.png"} <= names
    assert "checkpoints" not in names  # finished runs keep only the export
    assert not [n for n in names if n.startswith(".")  and n != ".hydra"]  # no temp leftovers
    model = {p.name for p in (finished_run / "model").iterdir()}
    assert {"model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json", "README.md"} <= model
    assert not any(n.endswith((".bin", ".pt", ".pth")) for n in model)
    assert (finished_run / "learning_curve.png").read_bytes()[:4] == b"\x89PNG"
    log = (finished_run / "finetune.log").read_text()
    assert "[finetune.load][INFO] - new classification head: 2 labels (classifier)" in log
    assert "LOAD REPORT" not in log and "\x1b[" not in log  # not transformers' table with colour codes


@pytest.mark.slow
def test_exported_labels_and_pipeline_check(finished_run):
    config = json.loads((finished_run / "model" / "config.json").read_text())
    assert config["id2label"] == {"0": "neg", "1": "pos"}
    assert config["label2id"] == {"neg": 0, "pos": 1}
    metrics = json.loads((finished_run / "metrics.json").read_text())
    for key in ("train_loss", "validation_accuracy", "test_accuracy", "test_f1_macro", "test_f1_pos",
                "pipeline_test_accuracy"):
        assert key in metrics
    assert abs(metrics["test_accuracy"] - metrics["pipeline_test_accuracy"]) <= 0.005
    assert metrics["num_train_examples"] == 128 and metrics["num_test_examples"] == 16


@pytest.mark.slow
def test_exported_dir_loads_with_plain_pipeline(finished_run):
    from transformers import pipeline

    clf = pipeline("text-classification", model=str(finished_run / "model"))
    out = clf(["the movie was wonderful", "a dull and tedious film"])
    assert {o["label"] for o in out} <= {"neg", "pos"}


@pytest.mark.slow
def test_model_card_metadata(finished_run):
    text = (finished_run / "model" / "README.md").read_text()
    meta = yaml.safe_load(text.split("---")[1])
    assert meta["pipeline_tag"] == "text-classification"
    assert meta["library_name"] == "transformers"
    assert "base_model" not in meta  # a local checkpoint is no Hub id
    results = meta["model-index"][0]["results"][0]
    assert {m["type"] for m in results["metrics"]} >= {"accuracy", "f1_macro"}
    assert "| test_accuracy |" in text


@pytest.mark.slow
def test_config_snapshot_and_logs_hold_no_token(finished_run):
    cfg = yaml.safe_load((finished_run / "config.yaml").read_text())
    assert cfg["task"]["name"] == "classification" and cfg["data"]["text_column"] == "review"
    for path in finished_run.rglob("*"):
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), path


@pytest.mark.parametrize(
    "args, message",
    [
        (["task=sentimnt"], "unknown task 'sentimnt': did you mean task=sentiment? choose one of"),
        (["trainer.lerning_rate=1e-4"], "lerning_rate"),
        (["data=reviews.csv", "data.text_column=body"], "column 'body' (data.text_column) not found in the train data; "
                                                        "available columns: review, sentiment"),
        (["data=missing.csv"], "data file or directory not found: missing.csv"),
        (["data=reviews.csv", "data.text_column=review", "data.label_column=sentiment", "model=./no/such/model"],
         "model directory not found: ./no/such/model; check the path"),
    ],
)
def test_input_errors_exit_2_with_one_line(tmp_path, sentiment_csv, monkeypatch, capfd, args, message):
    (tmp_path / "reviews.csv").write_text(sentiment_csv.read_text())
    assert message in fail(args, tmp_path, monkeypatch, capfd)  # (in this process: test_errors runs one real one)


def test_debug_shows_traceback(tmp_path, monkeypatch, capfd):
    code, _, err = cli_main(["data=missing.csv", "debug=true"], tmp_path, monkeypatch, capfd)
    assert code == 2
    assert "Traceback" in err and "error: data file or directory not found" in err


def test_cfg_job_prints_resolved_config(tmp_path, monkeypatch, capfd):
    code, out, err = cli_main(["--cfg", "job", "trainer.learning_rate=2e-5"], tmp_path, monkeypatch, capfd)
    assert code == 0, err
    cfg = yaml.safe_load(out)
    assert cfg["trainer"]["learning_rate"] == 2e-5 and cfg["model"]["name_or_path"] == "bundled:minilm"


def test_help_is_one_screen_of_what_a_run_is_the_groups_and_examples(tmp_path, monkeypatch, capfd):
    from finetune.__main__ import _FREE_HELP
    from finetune.config import config_options

    code, out, err = cli_main(["--help"], tmp_path, monkeypatch, capfd)
    assert code == 0 and not err, err
    lines = out.splitlines()
    assert len(lines) <= 30 and max(map(len, lines)) <= 120  # a screen
    assert lines[0].startswith("python -m finetune: fine-tune") and "A run trains one model" in out
    assert "powered by Hydra" not in out and "schema/" not in out and "name_or_path: bundled" not in out
    joined = "\n".join(lines).replace("\n    ", " ").splitlines()  # a group's long list continues indented
    groups = dict(line.strip().split(": ", 1) for line in joined if line.startswith("  ") and ": " in line
                  and not line.startswith("  python"))
    assert list(groups) == ["model", "task", "data", "trainer", "peft", "hub", "hparams_search"]  # no accelerate/
    assert groups["task"] == f"{', '.join(config_options('task'))} (default: sentiment)"
    assert groups["trainer"] == "accelerate, hf (default: hf)" and groups["hparams_search"].endswith("(default: none)")
    assert groups["model"] == f"bert2bert, minilm, smollm2, {_FREE_HELP['model']} (default: minilm)"
    assert groups["data"] == f"rotten_tomatoes, {_FREE_HELP['data']} (default: the task's own)"
    examples = [line.split("#")[0].split()[3:] for line in lines if line.startswith("  python -m finetune ")]
    assert len(examples) == 3
    for args in examples:  # they compose: no unknown key, group option or wrong type
        compose_cfg(*args)
    code, out, _ = cli_main(["--hydra-help"], tmp_path, monkeypatch, capfd)
    assert code == 0 and out.startswith("Hydra (")  # Hydra's own help stays


@pytest.mark.slow
def test_bench_rows_run_in_forked_processes(tiny_bert, sentiment_csv, tmp_path):
    """python -m finetune.bench on the tiny model: each row in its own process, a repeated row's spread, the table."""
    import os
    import subprocess
    import sys

    from helpers.processes import REPO

    args = ["--rows", "default", "lora", "default", "--steps", "4", "--batch-size", "8", f"model={tiny_bert}",
            f"data={sentiment_csv}", "data.text_column=review", "data.label_column=sentiment"]
    proc = subprocess.run([sys.executable, "-m", "finetune.bench", *args], cwd=tmp_path, capture_output=True,
                          text=True, env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [line.split(" | ") for line in proc.stdout.splitlines() if line.startswith("| default") or
            line.startswith("| lora")]
    assert [r[0] for r in rows] == ["| default", "| lora", "| default"]
    # samples/s, peak RSS, the estimate of the peak, the matmul peak around the row (the last column)
    assert all(float(r[2]) > 0 and float(r[4]) > 0 and float(r[5].split()[0]) > 0 and float(r[12].rstrip(" |")) > 0
               for r in rows)
    assert rows[0][9] != "-" and rows[1][9] == "-"  # export + verify: the default row only
    row_s, training_s = (float(x) for x in rows[0][11].replace("(", "").replace(")", "").split())
    assert 0 < training_s < row_s  # the row's time, and its optimizer steps' part of it
    assert "default x2: samples/s " in proc.stdout and "lora / default samples/s: " in proc.stdout
    assert "whole bench: " in proc.stdout and " GFLOP/s over the invocation" in proc.stdout
    assert "Traceback" not in proc.stdout



def test_bench_rows_of_the_smollm2_tasks_keep_their_own_micro_batch():
    """--batch-size (32) is the MiniLM rows': a row of a SmolLM2 task, the memory rows included, trains the
    micro-batch it sets (32 x 512 tokens of SmolLM2 took 24 GB)."""
    from finetune import bench

    rows = [name for name, (own, _, _) in bench.ROWS.items()
            if {"task=generation", "task=translation", "task=summarization"} & set(own)]
    assert "mem_135m" in rows and "translation" in rows
    for name in rows:
        trainer = compose_cfg(*bench.row_overrides(name, 60, 32, [])).trainer
        assert trainer.per_device_train_batch_size <= 4 and trainer.eval_strategy == "no", name


@pytest.mark.parametrize("engine", ["hf", "accelerate"])
def test_bench_counts_the_tokens_the_engine_trained(engine, tiny_bert, sentiment_csv, tmp_path, one_thread):
    """MFU and tokens/s count the real tokens of the batches trained (the first, a warm-up, left out), not the
    split's mean length: length-grouped batches come longest first."""
    from finetune import bench
    from finetune.engines import make_engine
    from helpers.cli import prepared

    cfg, task, tokenizer, features, model = prepared(
        f"trainer={engine}", f"model={tiny_bert}", f"data={sentiment_csv}", "data.text_column=review",
        "data.label_column=sentiment", "trainer.max_steps=3", "trainer.per_device_train_batch_size=4",
        "trainer.eval_strategy=no")
    seen = []
    collator = task.collator

    def spy(tok):  # the real tokens of every batch the engine trains on
        collate = collator(tok)
        return lambda rows: seen.append([len(r["input_ids"]) for r in rows]) or collate(rows)

    task.collator = spy
    engine_ = make_engine(cfg, task, model, tokenizer, features, tmp_path)
    engine_.train()
    mean = sum(features["train"]["length"]) / len(features["train"])
    counted = bench._trained_lengths(features["train"], 4, 3, cfg.seed, True)
    assert counted == [n for batch in seen[1:3] for n in batch] and sum(counted) != round(mean * 8)
