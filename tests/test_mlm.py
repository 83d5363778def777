"""task=mlm on the tiny BERT: masking (training and the fixed held-out mask), whole-word masking, metrics, the
fill-mask probes and pipeline round trip, both engines, LoRA, resume, chaining into task=sentiment, errors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from datasets import Dataset, DatasetDict

from helpers.cli import TINY_TRAINER, cli_main, compose_cfg, fail
from helpers.data import make_sentences
from helpers.processes import assert_same_scores, kill_and_resume, run_cli

TEXTS = [t for t, _ in make_sentences(300)]
# words outside the tiny vocabulary: split into several pieces
RARE = ["an unforgettable screenplay", "the cinematography was breathtaking", "a forgettable sequel", "overlong"]
ENV = {"OMP_NUM_THREADS": "1"}
NEW_HEAD = ["cls.predictions.bias", "cls.predictions.decoder.bias", "cls.predictions.transform.LayerNorm.bias",
            "cls.predictions.transform.LayerNorm.weight", "cls.predictions.transform.dense.bias",
            "cls.predictions.transform.dense.weight"]


def _tokenized(tiny_bert, texts, *overrides, held_out=None):
    from finetune.tasks import get_task

    cfg = compose_cfg("task=mlm", f"model={tiny_bert}", *overrides)
    task = get_task(cfg.task)
    tokenizer = task.load_tokenizer(str(tiny_bert), cfg.model)
    raw = DatasetDict({"train": Dataset.from_dict({"text": texts}),
                       "validation": Dataset.from_dict({"text": held_out or texts}),
                       "test": Dataset.from_dict({"text": texts})})
    return task, tokenizer, task.tokenize(raw, tokenizer)


def _rows(ds):
    return [ds[i] for i in range(len(ds))]


def _padded(tokenizer, ids):
    return tokenizer.pad({"input_ids": ids}, return_tensors="pt")["input_ids"]


@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> Path:
    lines = []
    for i, text in enumerate(t for t, _ in make_sentences(160)):
        lines += [text, ""] if i % 20 == 0 else [text]  # blank lines are dropped
    path = tmp_path_factory.mktemp("text") / "reviews.txt"
    path.write_text("\n".join(lines) + "\n\n  \n")
    return path


def test_training_batches_mask_15_percent_of_tokens_80_10_10(tiny_bert, one_thread):
    task, tokenizer, features = _tokenized(tiny_bert, TEXTS)
    rows = _rows(features["train"])
    batch = task.collator(tokenizer)(rows)
    original = _padded(tokenizer, [r["input_ids"] for r in rows])
    special = _padded(tokenizer, [r["special_tokens_mask"] for r in rows]).bool() | (original == tokenizer.pad_token_id)
    masked = batch["labels"] != -100
    assert not (masked & special).any()  # [CLS], [SEP] and padding are never predicted
    assert torch.equal(batch["labels"][masked], original[masked])
    assert 0.13 <= masked.sum() / (~special).sum() <= 0.17
    inputs = batch["input_ids"][masked]
    to_mask = (inputs == tokenizer.mask_token_id).float().mean()
    unchanged = (inputs == original[masked]).float().mean()
    assert 0.75 <= to_mask <= 0.85 and 0.05 <= unchanged <= 0.15 and 0.05 <= 1 - to_mask - unchanged <= 0.15
    assert torch.equal(batch["input_ids"][~masked], original[~masked])
    # seeded by the run's seed and the batch: the same batch gets the same mask, another batch (order) a new one
    again = task.collator(tokenizer)(rows)
    assert torch.equal(again["input_ids"], batch["input_ids"]) and torch.equal(again["labels"], batch["labels"])
    assert not torch.equal(task.collator(tokenizer)(rows[::-1])["labels"], batch["labels"].flip(0))


def test_held_out_rows_are_masked_once_and_identically(tiny_bert, one_thread):
    task, tokenizer, first = _tokenized(tiny_bert, TEXTS, held_out=TEXTS[::-1])
    _, _, second = _tokenized(tiny_bert, TEXTS)  # a new task and tokenization: the same masks
    assert first["test"]["input_ids"] == second["test"]["input_ids"] and first["test"]["labels"] == second["test"]["labels"]
    # the mask depends on the text, not its position or split
    assert first["validation"]["labels"] == first["test"]["labels"][::-1]
    original = first["train"]["input_ids"]
    for ids, labels, clean in zip(first["test"]["input_ids"], first["test"]["labels"], original):
        positions = [i for i, label in enumerate(labels) if label != -100]
        assert all(labels[i] == clean[i] for i in positions) and 0 not in positions and len(ids) - 1 not in positions
        assert all(ids[i] == clean[i] for i in range(len(ids)) if i not in positions)
    assert 0.13 <= sum(label != -100 for row in first["test"]["labels"] for label in row) / sum(
        len(r) - 2 for r in original) <= 0.17
    _, _, reseeded = _tokenized(tiny_bert, TEXTS, "task.eval_mask_seed=1")
    assert reseeded["test"]["labels"] != first["test"]["labels"]
    # evaluation batches are padded, not masked again
    rows = _rows(first["test"])[:5]
    batch = task.collator(tokenizer)(rows)
    for i, row in enumerate(rows):
        n = len(row["input_ids"])
        assert batch["input_ids"][i, :n].tolist() == row["input_ids"] and batch["labels"][i, :n].tolist() == row["labels"]
        assert (batch["labels"][i, n:] == -100).all()


def test_whole_word_masking_masks_every_piece_of_a_word(tiny_bert, one_thread):
    texts = [f"{a} {b}" for a, b in zip(TEXTS, RARE * 75)]
    task, tokenizer, features = _tokenized(tiny_bert, texts, "task.whole_word_mask=true", "task.mlm_probability=0.3")
    assert "offset_mapping" not in features["test"].column_names
    rows = _rows(features["train"])
    batch = task.collator(tokenizer)(rows)
    words_masked = multi_piece = 0
    for i, text in enumerate(texts):
        enc = tokenizer(text, truncation=True, max_length=128)
        pieces: dict[int, list[bool]] = {}
        for j, word in enumerate(enc.word_ids()):
            if word is not None:
                pieces.setdefault(word, []).append(bool(batch["labels"][i, j] != -100))
        for flags in pieces.values():
            assert all(flags) or not any(flags), (text, flags)  # a word is masked whole or not at all
            words_masked += all(flags)
            multi_piece += all(flags) and len(flags) > 1
    assert multi_piece >= 10 and words_masked >= 200
    masked = batch["labels"] != -100
    assert (batch["input_ids"][masked] == tokenizer.mask_token_id).all()  # transformers' wwm always uses the mask


def test_metrics_are_token_weighted_over_masked_tokens():
    import torch.nn.functional as F
    from transformers import EvalPrediction

    from finetune.metrics import masked_lm_metrics
    from finetune.tasks import get_task

    labels = np.array([[5, -100, 7, -100], [-100, 9, -100, -100]])  # the last column: padding
    top1 = np.array([[5, 1, 2, -100], [3, 9, 0, -100]])
    nll = np.array([[math.log(2), 9.0, math.log(8), -100], [9.0, math.log(4), 9.0, -100]])
    m = masked_lm_metrics(labels, top1, nll)
    assert m["accuracy"] == pytest.approx(2 / 3) and m["perplexity"] == pytest.approx(4.0) and m["masked_tokens"] == 3

    task = get_task(compose_cfg("task=mlm").task)
    torch.manual_seed(0)
    logits, labels_t = torch.randn(2, 4, 11), torch.tensor(labels)
    kept_top1, kept_nll = task.preprocess_logits((logits,), labels_t)
    assert torch.equal(kept_top1, logits.argmax(-1))
    where = labels_t != -100
    torch.testing.assert_close(kept_nll[where], F.cross_entropy(logits[where], labels_t[where], reduction="none"))
    assert (kept_nll[~where] == 0).all()
    scored = task.compute_metrics("test", None)(EvalPrediction((kept_top1.numpy(), kept_nll.numpy()), labels))
    expected = math.exp(F.cross_entropy(logits[where], labels_t[where]).item())
    assert scored["perplexity"] == pytest.approx(expected, rel=1e-5)


def test_probes_hide_one_single_token_word_each(tiny_bert, one_thread):
    task, tokenizer, _ = _tokenized(tiny_bert, TEXTS[:2])
    texts = TEXTS[:40] + ["overlong, unforgettable"]  # no word of it is one token here: left out
    probes, targets = task.probes(tokenizer, texts)
    assert len(probes) == 40
    for text, probe, target in zip(texts, probes, targets):
        ids, hidden = tokenizer(text)["input_ids"], tokenizer(probe)["input_ids"]
        assert hidden.count(tokenizer.mask_token_id) == 1 and len(hidden) == len(ids)
        j = hidden.index(tokenizer.mask_token_id)
        assert ids[j] == target and tokenizer.convert_ids_to_tokens(target).isalpha()
        assert hidden[:j] + hidden[j + 1:] == ids[:j] + ids[j + 1:]
    assert task.probes(tokenizer, texts) == (probes, targets)  # fixed
    task.cfg.eval_mask_seed = 1
    assert task.probes(tokenizer, texts)[0] != probes


def test_fill_mask_pipeline_predicts_what_the_model_does(tiny_bert, tmp_path, one_thread):
    """The pipeline round trip, token by token: the exported directory through pipeline('fill-mask') gives the
    in-memory model's top-1 token at every probe (the random new head makes these varied)."""
    from finetune.tasks import get_task

    cfg = compose_cfg("task=mlm", f"model={tiny_bert}")
    task = get_task(cfg.task)
    tokenizer = task.load_tokenizer(str(tiny_bert), cfg.model)
    torch.manual_seed(0)
    model = task.load_model(str(tiny_bert), cfg.model)
    assert task.new_weights == NEW_HEAD
    assert "`cls.predictions.transform.dense.weight`" in task.card_section()
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    probes, _ = task.probes(tokenizer, TEXTS[:50])
    assert len({len(tokenizer(p)["input_ids"]) for p in probes}) > 5  # fill() batches them by length, in another order
    predicted = task.fill(model, tokenizer, probes)
    assert len(set(predicted)) > 5
    scores = task.verify(tmp_path, Dataset.from_dict({"text": TEXTS[:50]}))
    assert scores["fill_mask_probes"] == 50
    from transformers import pipeline

    out = pipeline("fill-mask", model=str(tmp_path))(probes, top_k=1)
    assert [o[0]["token"] for o in out] == predicted


@pytest.fixture(scope="module")
def cli_run(tiny_bert, text_file):
    """One real CLI run (its tests are marked slow: they share its cost)."""
    work = text_file.parent
    proc = run_cli("task=mlm", f"model={tiny_bert}", f"data={text_file}", *TINY_TRAINER, cwd=work, env=ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run_dir,) = list((work / "runs" / "mlm").iterdir())
    return run_dir


@pytest.mark.slow
def test_cli_run_reports_base_and_fine_tuned_and_verifies_the_pipeline(cli_run):
    m = json.loads((cli_run / "metrics.json").read_text())
    assert m["num_train_examples"] == 128 and m["num_test_examples"] == 16  # 160 lines; blank lines dropped
    assert m["test_perplexity"] < 0.9 * m["base_test_perplexity"]  # it learned the domain
    assert m["test_masked_tokens"] == m["base_test_masked_tokens"] > 0  # scored on the same masked tokens
    assert m["test_fill_mask_probes"] == m["pipeline_test_fill_mask_probes"] == 16
    assert abs(m["pipeline_test_fill_mask_accuracy"] - m["test_fill_mask_accuracy"]) <= 0.01
    assert {"test_accuracy", "base_test_accuracy", "base_test_fill_mask_accuracy", "validation_perplexity"} <= set(m)
    cfg = yaml.safe_load((cli_run / "config.yaml").read_text())
    assert cfg["task"]["name"] == "mlm" and "label_column" not in cfg["data"]  # its own schemas only
    card = (cli_run / "model" / "README.md").read_text()
    assert "pipeline_tag: fill-mask" in card and "`cls.predictions.transform.dense.weight`" in card
    assert "| base_test_perplexity |" in card and "preparation_time" not in card
    log = (cli_run / "finetune.log").read_text()
    assert "[finetune.load][WARNING] - not in the checkpoint, initialized new and trained: cls.predictions, " in log
    assert "LOAD REPORT" not in log and "\x1b[" not in log  # one plain line, not transformers' table


@pytest.mark.slow
def test_engines_score_the_same_base_and_lora_exports_merged_and_adapter(tiny_bert, text_file, cli_run, tmp_path):
    from finetune.run import run

    hf = json.loads((cli_run / "metrics.json").read_text())
    common = ["task=mlm", f"model={tiny_bert}", f"data={text_file}", *TINY_TRAINER, f"runs_dir={tmp_path}"]
    acc = run(compose_cfg(*common, "trainer=accelerate"), tmp_path / "accelerate")
    # same seed, same fixed mask: the base model scores the same on both engines
    assert acc["base_test_perplexity"] == pytest.approx(hf["base_test_perplexity"], rel=1e-5)
    assert acc["test_perplexity"] < 0.9 * acc["base_test_perplexity"]
    assert acc["test_perplexity"] == pytest.approx(hf["test_perplexity"], rel=0.02)  # same training, other loop
    lora = run(compose_cfg(*common, "peft=lora"), tmp_path / "lora")
    assert lora["test_perplexity"] < lora["base_test_perplexity"]
    assert abs(lora["pipeline_test_fill_mask_accuracy"] - lora["test_fill_mask_accuracy"]) <= 0.01
    adapter = json.loads((tmp_path / "lora" / "model" / "adapter" / "adapter_config.json").read_text())
    assert adapter["modules_to_save"] == ["cls.predictions.transform"]  # the new head, not the tied decoder
    assert (tmp_path / "lora" / "model" / "model.safetensors").is_file()


@pytest.mark.slow
def test_a_run_model_dir_is_a_valid_model_for_sentiment(cli_run, sentiment_csv, monkeypatch, capfd, one_thread):
    work = sentiment_csv.parent
    code, _, err = cli_main(["task=sentiment", f"model={cli_run / 'model'}", f"data={sentiment_csv}",
                             "data.text_column=review", "data.label_column=sentiment", *TINY_TRAINER], work, monkeypatch,
                            capfd)
    assert code == 0, err[-3000:]
    (run_dir,) = list((work / "runs" / "sentiment").iterdir())
    m = json.loads((run_dir / "metrics.json").read_text())
    assert "pipeline_test_accuracy" in m
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["model"]["name_or_path"] == str(cli_run / "model")


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_metrics(tiny_bert, text_file, tmp_path):
    """Training masks are seeded by the batch, so a resumed run replays them. Also the full fine-tuning case on the
    default engine (hf) of tests/test_resume.py, which covers the other engine and LoRA."""
    args = ["task=mlm", f"model={tiny_bert}", f"data={text_file}", "trainer.num_train_epochs=2",
            "trainer.learning_rate=3e-3", "trainer.per_device_train_batch_size=8", "trainer.warmup_ratio=0",
            "trainer.eval_strategy=steps", "trainer.eval_steps=6", "trainer.logging_steps=6"]
    resumed = kill_and_resume(args, tmp_path, "mlm", 18)
    assert "step 1/" in resumed.log  # the resumed launch appended to the run's log
    assert resumed.step > 16 and resumed.step % 16, resumed.step  # mid-epoch (128 lines / batch 8), epoch 2
    assert_same_scores(resumed.run_dir, resumed.reference, abs=1e-4)
    expected = json.loads((resumed.reference / "metrics.json").read_text())
    assert expected["test_perplexity"] < 0.9 * expected["base_test_perplexity"]  # it learned: the metrics moved


@pytest.mark.parametrize("problem", ["no mask token", "empty file"])
def test_input_errors_are_one_line(problem, tiny_bert, tmp_path, monkeypatch, capfd):
    import shutil

    model, data = tiny_bert, tmp_path / "text.txt"
    data.write_text("a good film\nthe plot was dull\n")
    if problem == "no mask token":  # a tokenizer class without a default mask token, as a causal LM's
        model = tmp_path / "no-mask"
        shutil.copytree(tiny_bert, model)
        config = json.loads((model / "tokenizer_config.json").read_text())
        config.pop("mask_token")
        (model / "tokenizer_config.json").write_text(json.dumps({**config, "tokenizer_class": "PreTrainedTokenizerFast"}))
        message = f"task=mlm needs a tokenizer with a mask token and '{model}' has none"
    else:
        data.write_text("")
        message = f"the train split is empty: {data} is an empty file; give it data"
    assert fail(["task=mlm", f"model={model}", f"data={data}"], tmp_path, monkeypatch, capfd).startswith(message)


def test_blank_lines_only_is_one_line_error(tmp_path):
    from finetune import data
    from finetune.errors import FinetuneError
    from finetune.tasks import get_task

    path = tmp_path / "blank.txt"
    path.write_text("\n   \n\n")
    cfg = compose_cfg("task=mlm", f"data={path}")
    with pytest.raises(FinetuneError, match="the train data has no text"):
        data.load(cfg.data, get_task(cfg.task))


@pytest.mark.integration
def test_default_mlm_data_holds_out_the_sentiment_movies():
    """The same rows reach the same group split: task=mlm's test texts are task=sentiment's (data only, no model)."""
    from finetune import data
    from finetune.tasks import get_task

    splits = {}
    for task in ("sentiment", "mlm"):
        cfg = compose_cfg(f"task={task}")
        splits[task] = data.load(cfg.data, get_task(cfg.task))
    for split in ("train", "validation", "test"):
        assert splits["mlm"][split]["text"] == splits["sentiment"][split]["text"], split
    assert len(splits["mlm"]["test"]) > 1000
