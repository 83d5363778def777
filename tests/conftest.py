"""Shared fixtures: a tiny random BERT with a real (trained-here) WordPiece tokenizer, and small data files."""

from __future__ import annotations

import os
import random
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

# keep the tests' many small datasets out of the user's cache (read by `datasets` at import)
os.environ.setdefault("HF_DATASETS_CACHE", os.path.join(tempfile.mkdtemp(prefix="finetune-tests-"), "datasets"))

REPO = Path(__file__).resolve().parent.parent

POSITIVE = ["great", "wonderful", "excellent", "loved", "brilliant", "moving", "superb", "delightful"]
NEGATIVE = ["awful", "terrible", "boring", "hated", "dull", "tedious", "clumsy", "lifeless"]
FILLER = ["the", "movie", "film", "plot", "acting", "was", "really", "quite", "and", "story", "cast", "ending",
          "a", "truly", "experience", "script", "director", "scenes"]


def make_sentences(n: int, seed: int = 0) -> list[tuple[str, str]]:
    """(text, label) pairs whose label is decided by one sentiment word among fillers."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = "pos" if i % 2 == 0 else "neg"
        words = rng.sample(FILLER, rng.randint(3, 9))
        words.insert(rng.randrange(len(words) + 1), rng.choice(POSITIVE if label == "pos" else NEGATIVE))
        rows.append((" ".join(words), label))
    rng.shuffle(rows)
    return rows


def build_tiny_bert(path: Path, corpus: list[str]) -> Path:
    """A 2-layer, 32-wide BERT with random weights and a WordPiece vocabulary of `corpus`'s words plus single
    characters (other words split into pieces); the same files in every session."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import BertConfig, BertModel, BertTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    normalizer, pre_tokenizer = normalizers.BertNormalizer(lowercase=True), pre_tokenizers.BertPreTokenizer()
    # built, not trained: tokenizers' WordPieceTrainer breaks frequency ties differently in every process
    words = {w for text in corpus for w, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text))}
    chars = {c for w in words for c in w}
    pieces = specials + sorted(words | chars) + sorted(f"##{c}" for c in chars)
    tok = Tokenizer(models.WordPiece({p: i for i, p in enumerate(pieces)}, unk_token="[UNK]"))
    tok.normalizer, tok.pre_tokenizer = normalizer, pre_tokenizer
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls), ("[SEP]", sep)]
    )
    tok.decoder = decoders.WordPiece()
    tokenizer = BertTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                  sep_token="[SEP]", mask_token="[MASK]", model_max_length=128)
    tokenizer.save_pretrained(path)
    config = BertConfig(vocab_size=tok.get_vocab_size(), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128)
    import torch

    torch.manual_seed(0)
    BertModel(config).save_pretrained(path)
    return path


def tiny_variant(bert_dir: Path, path: Path, family: str) -> Path:
    """bert_dir's tokenizer with a tiny random encoder of another family: distilbert (no token_type_ids)
    or deberta-v2 (relative attention, no absolute positions)."""
    import torch
    from transformers import AutoTokenizer, DebertaV2Config, DebertaV2Model, DistilBertConfig, DistilBertModel

    inputs = {"model_input_names": ["input_ids", "attention_mask"]} if family == "distilbert" else {}
    tokenizer = AutoTokenizer.from_pretrained(bert_dir, **inputs)  # distilbert's tokenizer has no token types
    size = dict(vocab_size=len(tokenizer), max_position_embeddings=128, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    if family == "distilbert":
        model = DistilBertModel(DistilBertConfig(dim=32, n_layers=2, n_heads=2, hidden_dim=64, **size))
    else:
        model = DebertaV2Model(DebertaV2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                               intermediate_size=64, relative_attention=True, position_buckets=16,
                                               pos_att_type=["p2c", "c2p"], position_biased_input=False, **size))
    tokenizer.save_pretrained(path)
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def one_thread():
    """For a module of tiny-model tests: on shared cores several threads per matmul only wait on each other."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> Path:
    corpus = [t for t, _ in make_sentences(400)] + ["[unused] a b c d e f g h i j k l m n o p q r s t u v w x y z"]
    return build_tiny_bert(tmp_path_factory.mktemp("tiny-bert"), corpus)


@pytest.fixture
def sentiment_csv(tmp_path) -> Path:
    import pandas as pd

    path = tmp_path / "reviews.csv"
    pd.DataFrame(make_sentences(160), columns=["review", "sentiment"]).to_csv(path, index=False)
    return path


def run_cli(*args: str, cwd: Path, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """`python -m finetune ...` in a subprocess, as a user runs it."""
    full_env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    return subprocess.run([sys.executable, "-m", "finetune", *args], cwd=cwd, env=full_env, capture_output=True,
                          text=True, timeout=timeout)


# Fast trainer settings for runs on the tiny model.
TINY_TRAINER = ["trainer.num_train_epochs=2", "trainer.learning_rate=1e-3", "trainer.per_device_train_batch_size=16",
                "trainer.logging_steps=5", "trainer.warmup_ratio=0.0"]


HUB_SECRET = "hf_fake_hub_token_never_written_0123456789"


def hub_env(endpoint: str, home: Path, token: str | None = HUB_SECRET) -> dict:
    """The environment of a CLI that talks to a fake Hub: its endpoint, a token (or none: HF_TOKEN empty and an
    empty HF_HOME, so no login cache either), no Xet transfers (the fake Hub speaks the LFS protocol)."""
    return {"HF_ENDPOINT": endpoint, "HF_TOKEN": token or "", "HF_HOME": str(home), "HF_HUB_DISABLE_XET": "1",
            "HF_HUB_OFFLINE": "0"}


@pytest.fixture(scope="session")
def pushed_run(tiny_bert, tmp_path_factory):
    """One finished sentiment run on the tiny model (train.csv + test.csv), pushed by hub=push to a fake Hub on
    127.0.0.1 (branch dev): for the push, predict, evaluate, tracking and permission tests."""
    from types import SimpleNamespace

    import pandas as pd

    from fake_hub import FakeHub

    work = tmp_path_factory.mktemp("pushed")
    rows = make_sentences(200)
    (work / "data").mkdir()
    pd.DataFrame(rows[:160], columns=["review", "sentiment"]).to_csv(work / "data" / "train.csv", index=False)
    pd.DataFrame(rows[160:], columns=["review", "sentiment"]).to_csv(work / "data" / "test.csv", index=False)
    with FakeHub() as hub:
        proc = run_cli("task=sentiment", f"model={tiny_bert}", "data=data", "data.text_column=review",
                       "data.label_column=sentiment", *TINY_TRAINER, "hub=push", "hub.repo_id=me/tiny-sentiment",
                       "hub.revision=dev", cwd=work, env=hub_env(hub.url, work / "hf_home"))
        assert proc.returncode == 0, proc.stderr[-3000:]
        (run_dir,) = (work / "runs" / "sentiment").iterdir()
        yield SimpleNamespace(run_dir=run_dir, hub=hub, work=work, proc=proc)
