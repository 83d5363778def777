"""`accelerate launch` with 2 CPU processes (gloo): one run directory, logs and export from the main process,
evaluation gathered over both processes, input errors reported once."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from helpers.processes import REPO, accelerate_launch

pytestmark = pytest.mark.slow  # every test launches 2 processes
# on a machine without GPUs `accelerate launch` starts several processes only through its torchrun path:
# --multi_gpu on the command line, or an accelerate config with distributed_type MULTI_GPU (our ddp.yaml)
LAUNCHES = [pytest.param(["--multi_gpu", "--num_processes", "2"], ["trainer=hf"], id="hf-multi_gpu-flag"),
            pytest.param(["--config_file", str(REPO / "configs" / "accelerate" / "ddp.yaml")],
                         ["trainer=accelerate", "trainer.gradient_checkpointing=true"],
                         id="accelerate-ddp.yaml-checkpointing")]
TRAINER = ["trainer.num_train_epochs=2", "trainer.learning_rate=3e-3", "trainer.per_device_train_batch_size=8",
           "trainer.per_device_eval_batch_size=4", "trainer.logging_steps=1", "trainer.warmup_ratio=0.0"]


@pytest.fixture
def work(sentiment_csv):
    return sentiment_csv.parent


@pytest.mark.parametrize("launcher_args, trainer", LAUNCHES)
def test_two_processes_one_run(launcher_args, trainer, tiny_bert, work):
    args = ["task=sentiment", f"model={tiny_bert}", "data=reviews.csv", "data.text_column=review",
            "data.label_column=sentiment", *trainer, *TRAINER]
    proc = accelerate_launch(launcher_args, *args, cwd=work)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "terminate called" not in proc.stderr  # every process left the process group cleanly
    (run_dir,) = list((work / "runs" / "sentiment").iterdir())  # both processes wrote into rank 0's run dir
    assert {"model", "metrics.json", "config.yaml", "finetune.log"} <= {p.name for p in run_dir.iterdir()}
    log = (run_dir / "finetune.log").read_text()
    # 128 rows / (2 processes x batch 8) = 8 optimizer steps per epoch: the processes split the data;
    # each step is logged once: only the main process logs
    steps = [int(line.split("step ")[1].split("/")[0]) for line in log.splitlines() if "] - step " in line
             and " loss=" in line]
    assert steps == list(range(1, 17)), steps

    # the metrics were gathered from both processes: they are those of the exported model on the whole test split
    metrics = json.loads((run_dir / "metrics.json").read_text())
    loss, accuracy = _single_process_test_scores(run_dir / "model", tiny_bert, work, args)
    assert metrics["test_loss"] == pytest.approx(loss, abs=1e-4)
    assert metrics["test_accuracy"] == pytest.approx(accuracy) and metrics["num_test_examples"] == 16
    peaks = metrics["peak_memory_mb_per_process"]  # each process's own peak, gathered
    assert len(peaks) == 2 and min(peaks) > 0 and metrics["peak_memory_mb"] == max(peaks)


def _single_process_test_scores(model_dir: Path, tiny_bert, work: Path, args) -> tuple[float, float]:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from finetune import data
    from finetune.engines.batches import without_length
    from finetune.tasks import get_task
    from helpers.cli import compose_cfg

    cfg = compose_cfg(*[a.replace("data=reviews.csv", f"data={work / 'reviews.csv'}") for a in args])
    task = get_task(cfg.task)
    raw = data.load(cfg.data, task)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    features = task.tokenize(raw, tokenizer)["test"]
    batch = without_length(task.collator(tokenizer))(list(features))
    with torch.no_grad():
        out = model(**batch)
    return out.loss.item(), (out.logits.argmax(-1) == batch["labels"]).float().mean().item()


def test_input_error_reported_once(work):
    proc = accelerate_launch(["--multi_gpu", "--num_processes", "2"], "data=missing.csv", cwd=work)
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert errors == ["error: data file or directory not found: missing.csv; check the path"], proc.stderr[-3000:]
    assert not (work / "runs").exists() or not any((work / "runs").rglob("*"))
