"""Shared fixtures: tiny random models with small real tokenizers, small data files, one finished run pushed to a fake
Hub. They are built from tests/helpers/ (helpers/__init__.py lists what lives where); a test imports helpers, never
another test module or this file."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

# keep the tests' many small datasets out of the user's cache (read by `datasets` at import)
os.environ.setdefault("HF_DATASETS_CACHE", os.path.join(tempfile.mkdtemp(prefix="finetune-tests-"), "datasets"))

import sys  # noqa: E402

import absl.logging  # noqa: E402

# absl (rouge-score's) makes its log handler on the sys.stderr of the moment it is imported -- pytest's captured stream
# here -- and closes that stream when logging is configured again (Hydra's job logging, in a later in-process run,
# closes every handler): every test after it would write to a closed file. Its own stderr is never closed.
absl.logging.get_absl_handler().python_handler.stream = sys.__stderr__

from helpers import seq2seq_models  # noqa: E402
from helpers.data import make_sentences, ner_corpus, write_sentiment_csv  # noqa: E402
from helpers.models import build_tiny_bert, build_tiny_lm  # noqa: E402


@pytest.fixture(scope="module")
def one_thread():
    """For a module of tiny-model tests: on shared cores several threads per matmul only wait on each other."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# --- tiny models ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> Path:
    """A 2-layer BERT whose vocabulary holds every word of make_sentences."""
    corpus = [t for t, _ in make_sentences(400)] + ["[unused] a b c d e f g h i j k l m n o p q r s t u v w x y z"]
    return build_tiny_bert(tmp_path_factory.mktemp("tiny-bert"), corpus)


@pytest.fixture(scope="module")
def ner_bert(tmp_path_factory) -> Path:
    """A tiny BERT whose WordPiece vocabulary holds every word make_ner uses as one piece."""
    return build_tiny_bert(tmp_path_factory.mktemp("ner-bert"), ner_corpus())


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> Path:
    """A tiny Llama with a ChatML template, declaring its 256 positions as the tokenizer's model_max_length."""
    return build_tiny_lm(tmp_path_factory.mktemp("tiny-llama"), max_length=256)


@pytest.fixture(scope="module")
def tiny_gpt2(tmp_path_factory) -> Path:
    """A tiny GPT-2 without a chat template."""
    return build_tiny_lm(tmp_path_factory.mktemp("tiny-gpt2"), family="gpt2", chat=False)


@pytest.fixture(scope="module")
def s2s_models(tmp_path_factory) -> dict[str, str]:
    """The tiny sequence-to-sequence models by family: t5, bart, mbart, bert (a BERT2BERT's encoder and decoder),
    llama (decoder-only, ChatML) and llama_plain (decoder-only, no chat template)."""
    root = tmp_path_factory.mktemp("s2s-models")
    out = {}
    for name, build in (("t5", seq2seq_models.build_t5), ("bart", seq2seq_models.build_bart),
                        ("mbart", seq2seq_models.build_mbart50), ("bert", seq2seq_models.build_bert),
                        ("llama", seq2seq_models.build_decoder_only)):
        (root / name).mkdir()
        out[name] = str(build(root / name))
    (root / "gpt").mkdir()
    out["llama_plain"] = str(seq2seq_models.build_decoder_only(root / "gpt", chat=False))
    return out


# --- data -------------------------------------------------------------------------------------------------------
@pytest.fixture
def sentiment_csv(tmp_path) -> Path:
    """tmp_path/reviews.csv: 160 rows (columns review, sentiment) the tiny BERT learns."""
    return write_sentiment_csv(tmp_path / "reviews.csv")


@pytest.fixture(scope="module")
def sweep_work(tmp_path_factory) -> Path:
    """A working directory for sweeps (helpers.sweeps.TINY): reviews.csv of SWEEP_ROWS rows."""
    from helpers.sweeps import SWEEP_ROWS

    path = tmp_path_factory.mktemp("sweeps")
    write_sentiment_csv(path / "reviews.csv", SWEEP_ROWS)
    return path


# --- a finished run ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def pushed_run(tiny_bert, tmp_path_factory):
    """One finished sentiment run on the tiny model (train.csv + test.csv), pushed by hub=push to a fake Hub on
    127.0.0.1 (branch dev): for the push, predict, evaluate, tracking and permission tests (marked slow: they share
    its cost)."""
    from types import SimpleNamespace

    from helpers.cli import TINY_TRAINER
    from helpers.fake_hub import FakeHub, hub_env
    from helpers.processes import run_cli

    work = tmp_path_factory.mktemp("pushed")
    rows = make_sentences(200)
    (work / "data").mkdir()
    write_sentiment_csv(work / "data" / "train.csv", rows=rows[:160])
    write_sentiment_csv(work / "data" / "test.csv", rows=rows[160:])
    with FakeHub() as hub:
        proc = run_cli("task=sentiment", f"model={tiny_bert}", "data=data", "data.text_column=review",
                       "data.label_column=sentiment", *TINY_TRAINER, "hub=push", "hub.repo_id=me/tiny-sentiment",
                       "hub.revision=dev", cwd=work, env=hub_env(hub.url, work / "hf_home"))
        assert proc.returncode == 0, proc.stderr[-3000:]
        (run_dir,) = (work / "runs" / "sentiment").iterdir()
        yield SimpleNamespace(run_dir=run_dir, hub=hub, work=work, proc=proc)
