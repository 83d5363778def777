"""Small data sets the tiny models learn in seconds (sentiment sentences, NER sentences, running text), the files the
tests write them to, and readers of what a run writes (jsonl, TensorBoard events)."""

from __future__ import annotations

import json
import random
from pathlib import Path

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


def write_sentiment_csv(path: Path, n: int = 160, rows: list[tuple] | None = None) -> Path:
    """A csv with columns review, sentiment: make_sentences(n), or the rows given. 160 rows split 128 train /
    16 validation / 16 test."""
    import pandas as pd

    pd.DataFrame(make_sentences(n) if rows is None else rows, columns=["review", "sentiment"]).to_csv(path, index=False)
    return path


# --- NER ----------------------------------------------------------------------------------------------------------
ENTITIES = {"PER": ["alice", "bob smith", "carol"], "LOC": ["paris", "new york", "berlin"],
            "ORG": ["acme", "globex corp"]}


def make_ner(n: int, seed: int) -> list[tuple[list[str], list[str]]]:
    """Sentences of filler words with one or two entities (some of two words), IOB2-tagged."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        words = rng.sample(FILLER, rng.randint(3, 8))
        tags = ["O"] * len(words)
        for _ in range(rng.randint(1, 2)):
            kind = rng.choice(sorted(ENTITIES))
            entity = rng.choice(ENTITIES[kind]).split()
            at = rng.randrange(len(words) + 1)
            words[at:at] = entity
            tags[at:at] = [f"B-{kind}"] + [f"I-{kind}"] * (len(entity) - 1)
        out.append((words, tags))
    return out


def write_conll(path: Path, sentences) -> Path:
    path.write_text("\n\n".join("\n".join(f"{w}\t{t}" for w, t in zip(*s)) for s in sentences) + "\n")
    return path


def ner_corpus() -> list[str]:
    """Every word make_ner uses (and single letters): the vocabulary of the NER tests' tokenizers."""
    return [" ".join(w) for w, _ in make_ner(300, 0)] + ["[unused] a b c d e f g h i j k l m n o p q r s t u v w x y z"]


# --- running text for the tiny decoders ----------------------------------------------------------------------------
LM_WORDS = ["to", "be", "or", "not", "that", "is", "the", "question", "whether", "tis", "nobler", "in", "mind",
            "suffer", "slings", "and", "arrows", "of", "outrageous", "fortune", "hello", "world", "say", "answer",
            "yes", "no", "what", "who", "are", "you", "i", "am", "a", "bot", "user", "assistant", "system", "ok"]


def lm_corpus(n: int, seed: int = 0) -> list[str]:
    """Lines of 4 to 12 words of LM_WORDS' first 20."""
    rng = random.Random(seed)
    return [" ".join(rng.choice(LM_WORDS[:20]) for _ in range(rng.randint(4, 12))) for _ in range(n)]


# --- files ----------------------------------------------------------------------------------------------------------
def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def scalars(folder: Path) -> dict[str, list]:
    """Every scalar of the one TensorBoard event file in folder: tag -> [(step, value), ...]."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (events,) = [p for p in folder.iterdir() if p.name.startswith("events.out.tfevents")]
    acc = EventAccumulator(str(events))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}
