"""Token classification (named-entity recognition): a tag per word, seqeval entity F1, pipeline check.

Data: CoNLL-style files (read here), or json/jsonl/csv/parquet/Hub data with a list of tokens and a list
of tags per sentence (string tags, or integers named by a ClassLabel feature or data.label_names).
The data's tag scheme (IOB1, IOB2/BIO, BIOES) is detected or given, validated, and converted to IOB2:
the model always predicts B-/I-/O tags, the only prefixes the token-classification pipeline groups.
Words are aligned to sub-tokens: a word's first sub-token carries its tag, the others -100 (or, with
task.label_all_tokens, the tag with B- turned into I-). Metrics are word-level, as conlleval scores.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

from datasets import ClassLabel, Dataset, DatasetDict, Features, List, Value
from transformers import AutoModelForTokenClassification, AutoTokenizer, DataCollatorForTokenClassification

from finetune import progress
from finetune.data import file_format
from finetune.errors import FinetuneError
from finetune.metrics import entity_metrics
from finetune.tasks.base import MetricsFn, Task, _load, exported_labels, jsonable

log = logging.getLogger(__name__)

# Files read as CoNLL (token first, tag last, one token per line); any other format goes to data.py's readers.
CONLL_FORMATS = frozenset({".conll", ".conll03", ".iob", ".iob2", ".bio", ".bioes", ".iobes", ".ner", ".txt", ".tsv"})
SCHEMES = {"IOB1": ("B", "I"), "IOB2": ("B", "I"), "BIOES": ("B", "I", "E", "S")}
_ALIASES = {"BIO": "IOB2", "IOBES": "BIOES"}


class TokenClassificationTask(Task):
    pipeline_task = "token-classification"
    peft_task_type = "TOKEN_CLS"
    main_metric = "f1"
    auto_model = AutoModelForTokenClassification
    head = "token-classification head"
    columns = {"tokens": "text_column", "tags": "label_column"}
    input_columns = ("tokens",)
    # The trainer scores each word by its first sub-token; the pipeline's "simple" aggregation groups all
    # sub-tokens, so a continuation piece predicted differently can split or cut an entity (see verify).
    verify_tolerance = 0.01
    pipeline_options = {"aggregation_strategy": "simple"}  # entities, not per-sub-token tags

    labels: list[str]
    file_formats = CONLL_FORMATS  # data=<name with one of these suffixes> is a file, never a Hub id

    def read_file(self, path: str) -> Dataset | None:
        return read_conll(path) if file_format(path) in self.file_formats else None

    # --- data ---------------------------------------------------------------------------------
    def prepare(self, raw: DatasetDict, data_cfg) -> DatasetDict:
        wanted = list(data_cfg.label_names) if data_cfg.label_names else None
        rows = {split: _sentences(ds, split, wanted) for split, ds in raw.items()}
        train = "train" if "train" in raw else next(iter(raw))  # a missing train split is data.py's error to raise
        given = _tag_names(raw[train].features["tags"], wanted) or wanted
        scheme = self._scheme([tags for _, _, sentence_tags in rows.values() for tags in sentence_tags])
        detected = " (detected)" if self.cfg.tag_scheme.lower() == "auto" else ""
        for split, (_, _, sentence_tags) in rows.items():
            for i, tags in enumerate(sentence_tags):
                if why := scheme_error(tags, scheme):
                    raise FinetuneError(
                        f"{split} sentence {i + 1} ({' '.join(rows[split][1][i][:6])} ...): {why}, which {scheme}"
                        f"{detected} does not allow; fix the tags or set task.tag_scheme=<{'|'.join(SCHEMES)}>"
                    )
        converted = {split: [to_iob2(tags, scheme) for tags in r[2]] for split, r in rows.items()}
        self.labels = _label_list(given, converted, scheme)
        ids = {name: i for i, name in enumerate(self.labels)}
        out = {}
        for split, ds in raw.items():
            keep, tokens, _ = rows[split]
            rest = ds.select(keep).remove_columns(["tokens", "tags"])  # e.g. data.group_column
            features = Features({**rest.features, "tokens": List(Value("string")),
                                 "tags": List(ClassLabel(names=self.labels))})
            out[split] = Dataset.from_dict({**{c: list(rest[c]) for c in rest.column_names}, "tokens": tokens,
                                            "tags": [[ids[t] for t in s] for s in converted[split]]}, features=features)
        if not any(t != "O" for s in converted[train] for t in s):
            raise FinetuneError("the training data has no entities (every tag is O); check data.label_column")
        log.info("tags: %s%s, as %d IOB2 labels: %s", scheme, detected, len(self.labels), ", ".join(self.labels))
        return DatasetDict(out)

    def _scheme(self, sentences: list[list[str]]) -> str:
        name = self.cfg.tag_scheme.upper()
        name = _ALIASES.get(name, name)
        if name in SCHEMES:
            return name
        if name != "AUTO":
            raise FinetuneError(
                f"unknown task.tag_scheme '{self.cfg.tag_scheme}': choose auto, IOB1, IOB2 (BIO) or BIOES")
        if any(t[:2] in ("E-", "S-") for tags in sentences for t in tags):
            return "BIOES"
        starts = sum(scheme_error(tags, "IOB2") is not None for tags in sentences)
        if starts:  # valid IOB1 (conlleval reads it the same way): an I- tag that starts an entity
            log.info("%d sentences start an entity with I-: reading the tags as IOB1 (task.tag_scheme=IOB2 would "
                     "reject them)", starts)
            return "IOB1"
        return "IOB2"

    def tokenize(self, raw: DatasetDict, tokenizer) -> DatasetDict:
        label2id = {name: i for i, name in enumerate(self.labels)}
        # a continuation piece of a B-X word is inside the entity: I-X (HF run_ner's convention)
        b_to_i = [label2id.get("I-" + name[2:], i) if name.startswith("B-") else i
                  for i, name in enumerate(self.labels)]

        def encode(batch: dict[str, list], all_tokens: bool) -> dict[str, Any]:
            enc = tokenizer(batch["tokens"], is_split_into_words=True, truncation=True,
                            max_length=self.cfg.max_seq_length)
            enc["labels"] = [align_labels(enc.word_ids(i), tags, b_to_i, all_tokens)
                             for i, tags in enumerate(batch["tags"])]
            enc["length"] = [len(ids) for ids in enc["input_ids"]]
            enc["cut"] = [n == self.cfg.max_seq_length and max(w for w in enc.word_ids(i) if w is not None) + 1
                          < len(words) for i, (n, words) in enumerate(zip(enc["length"], batch["tokens"]))]
            return enc

        out = {}
        for split, ds in raw.items():
            # label_all_tokens shapes training only: evaluation always scores words by their first piece
            all_tokens = self.cfg.label_all_tokens and split == "train"
            feats = ds.map(encode, batched=True, remove_columns=ds.column_names, fn_kwargs={"all_tokens": all_tokens},
                           desc=f"tokenizing {split}")
            if cut := sum(feats["cut"]):
                log.warning("%d of %d %s sentences are longer than task.max_seq_length=%d sub-tokens: their last "
                            "words are neither trained nor scored", cut, len(feats), split, self.cfg.max_seq_length)
            out[split] = feats.remove_columns("cut")
        return DatasetDict(out)

    def collator(self, tokenizer):
        return DataCollatorForTokenClassification(tokenizer)  # pads labels with -100

    # --- model --------------------------------------------------------------------------------
    def model_kwargs(self) -> dict[str, Any]:
        return {
            "num_labels": len(self.labels),
            "id2label": dict(enumerate(self.labels)),
            "label2id": {name: i for i, name in enumerate(self.labels)},
        }

    def load_tokenizer(self, path: str, model_cfg):
        tokenizer = super().load_tokenizer(path, model_cfg)
        if not tokenizer.is_fast:
            raise FinetuneError(f"the tokenizer of '{model_cfg.name_or_path}' is not a fast (tokenizers) one; token "
                                "classification needs its word alignment: use a checkpoint with a tokenizer.json")
        if not splits_like_text(tokenizer):
            # byte-level BPE (RoBERTa, GPT-2, DeBERTa v1) marks word starts with a space: give pre-split words one
            tokenizer = _load(AutoTokenizer, path, model_cfg, add_prefix_space=True)
            tokenizer.model_max_length = self.cfg.max_seq_length
            if not splits_like_text(tokenizer):
                log.warning("this tokenizer splits pre-tokenized words unlike running text: the exported pipeline "
                            "(which reads text) may score below the trainer")
        return tokenizer

    # --- evaluation and export ----------------------------------------------------------------
    def preprocess_logits(self, logits, labels):
        """Each token's tag id, not its logits over every tag."""
        return (logits[0] if isinstance(logits, tuple) else logits).argmax(-1)

    def compute_metrics(self, split: str, features: Dataset) -> MetricsFn:
        def fn(pred) -> dict[str, float]:
            preds = pred.predictions[0] if isinstance(pred.predictions, tuple) else pred.predictions
            y_true, y_pred = [], []
            for p, gold in zip(preds, pred.label_ids):
                scored = gold != -100  # each word's first sub-token
                y_true.append([self.labels[i] for i in gold[scored]])
                # read as conlleval and the pipeline do: an I- tag after O or another type starts an entity
                y_pred.append(to_iob2([self.labels[i] for i in p[scored]], "IOB1"))
            return entity_metrics(y_true, y_pred)

        return fn

    def verify(self, model_dir: Path, raw: Dataset) -> dict[str, float]:
        """Tag the test sentences (tokens joined by spaces, as a user would) with the pipeline's "simple"
        aggregation, map each entity's character span back to the words whose first sub-token it covers,
        and score like the trainer: the same words (those within max_seq_length), seqeval entity F1."""
        ner = self.load_pipeline(model_dir)
        sentences = [list(words) for words in raw["tokens"]]
        texts = self.pipeline_inputs({"tokens": sentences})
        outputs = self.run_pipeline(ner, progress.bar(texts, total=len(texts), desc="pipeline check", unit="rows"))
        enc = ner.tokenizer(texts, truncation=True, return_offsets_mapping=True, return_special_tokens_mask=True)
        y_true, y_pred = [], []
        for words, tags, entities, offsets, special in zip(sentences, raw["tags"], outputs, enc["offset_mapping"],
                                                            enc["special_tokens_mask"]):
            anchors = word_anchors(words, [o for o, s in zip(offsets, special) if not s])
            seen = [i for i, a in enumerate(anchors) if a is not None]
            y_true.append([self.labels[tags[i]] for i in seen])
            y_pred.append(entities_to_tags([anchors[i] for i in seen], entities))
        return entity_metrics(y_true, y_pred)

    def pipeline_inputs(self, rows: dict[str, list]) -> list:
        """Text as it is; a list of words joined by spaces."""
        return [words if isinstance(words, str) else " ".join(map(str, words)) for words in rows["tokens"]]

    def prediction_record(self, output: list[dict]) -> dict[str, Any]:
        return {"entities": jsonable(output)}  # entity_group, score, word, start, end (characters of the text)

    def from_export(self, model_dir: Path, data_cfg) -> None:
        data_cfg.label_names = exported_labels(model_dir)  # the model's tags, in its id order


# --- CoNLL files ------------------------------------------------------------------------------
def read_conll(path: str) -> Dataset:
    """One token per line, the token in the first column and the tag in the last (spaces or tabs between);
    a blank or whitespace-only line ends a sentence; -DOCSTART- lines are document breaks."""
    import fsspec

    sentences: list[tuple[list[str], list[str]]] = []
    tokens: list[str] = []
    tags: list[str] = []
    try:
        with fsspec.open(path, "rt", encoding="utf-8", compression="infer") as f:
            for number, line in enumerate(f, 1):
                fields = re.split(r"[ \t]+", line.strip(" \t\r\n"))
                if fields == [""] or fields[0] == "-DOCSTART-":
                    if tokens:
                        sentences.append((tokens, tags))
                    tokens, tags = [], []
                elif len(fields) < 2:
                    raise FinetuneError(f"{path}:{number}: expected a token and its tag separated by spaces or tabs, "
                                        f"got {line.strip()!r}; fix the line (a blank line ends a sentence)")
                else:
                    tokens.append(fields[0])
                    tags.append(fields[-1])
    except UnicodeDecodeError as e:
        raise FinetuneError(f"cannot read {path}: not UTF-8 text ({e.reason}); re-encode it as UTF-8") from e
    if tokens:
        sentences.append((tokens, tags))
    if not sentences:
        raise FinetuneError(f"{path} holds no sentences; give it one token and tag per line")
    return Dataset.from_dict({"tokens": [s[0] for s in sentences], "tags": [s[1] for s in sentences]})


# --- tags ------------------------------------------------------------------------------------
def _tag_names(feature: Any, wanted: list[str] | None) -> list[str] | None:
    """The names of integer tags (a ClassLabel feature or data.label_names), or None for string tags."""
    inner = getattr(feature, "feature", feature)
    if isinstance(inner, ClassLabel):
        if wanted and len(wanted) != inner.num_classes:
            raise FinetuneError(f"data.label_names has {len(wanted)} names but the tags have {inner.num_classes} "
                                f"classes ({', '.join(inner.names)}); give one name per class or drop data.label_names")
        return wanted or inner.names
    if isinstance(inner, Value) and inner.dtype.startswith("int"):
        if not wanted:
            raise FinetuneError("the tags are integers without names; set data.label_names=[O,B-PER,I-PER,...] "
                                "(the name of tag 0, 1, ...)")
        return wanted
    return None


def _sentences(ds: Dataset, split: str, wanted: list[str] | None) -> tuple[list[int], list[list[str]], list[list[str]]]:
    """(kept row indices, tokens, string tags) of one split; empty sentences are dropped."""
    names = _tag_names(ds.features["tags"], wanted)
    keep, tokens, tags = [], [], []
    for i, (words, labels) in enumerate(zip(ds["tokens"], ds["tags"])):
        if words is None or labels is None:
            continue
        words = words.split() if isinstance(words, str) else [str(w) for w in words]
        labels = labels.split() if isinstance(labels, str) else list(labels)
        if names is not None:
            if bad := [t for t in labels if not 0 <= int(t) < len(names)]:
                raise FinetuneError(f"{split} sentence {i + 1} has tag id {bad[0]}, but there are {len(names)} tag "
                                    "names (data.label_names); give a name for every id")
            labels = [names[int(t)] for t in labels]
        labels = [str(t).strip() for t in labels]
        if len(words) != len(labels):
            raise FinetuneError(f"{split} sentence {i + 1} has {len(words)} tokens but {len(labels)} tags; give one "
                                "tag per token (check data.text_column and data.label_column)")
        if words:
            keep.append(i)
            tokens.append(words)
            tags.append(labels)
    return keep, tokens, tags


def scheme_error(tags: list[str], scheme: str) -> str | None:
    """Why one sentence's tags break `scheme`, or None when they fit it."""
    prefixes = SCHEMES[scheme]
    open_type = None  # IOB: the previous tag's type; BIOES: the type of the entity still open
    for i, tag in enumerate(tags, 1):
        prefix, _, kind = tag.partition("-")
        if tag == "O":
            prefix, kind = "O", None
        elif prefix not in prefixes or not kind:
            return f"tag '{tag}' at word {i} is neither O nor {'/'.join(prefixes)}-<type>"
        if scheme == "IOB2" and prefix == "I" and open_type != kind:
            after = tags[i - 2] if i > 1 else "the sentence start"
            return f"'{tag}' at word {i} follows {after}, not B-{kind} or I-{kind}"
        if scheme == "BIOES":
            if prefix in ("I", "E") and open_type != kind:
                return f"'{tag}' at word {i} continues no open {kind} entity (it starts with B-{kind})"
            if prefix in ("O", "B", "S") and open_type is not None:
                return f"'{tag}' at word {i} comes before the open {open_type} entity ends (with E-{open_type})"
            kind = kind if prefix in ("B", "I") else None
        open_type = kind
    if scheme == "BIOES" and open_type is not None:
        return f"the sentence ends inside a {open_type} entity (it ends with E-{open_type})"
    return None


def to_iob2(tags: list[str], scheme: str) -> list[str]:
    """The same entities in IOB2: every entity starts with B-, continues with I-."""
    out, previous = [], None
    for tag in tags:
        if tag == "O":
            out.append(tag)
            previous = None
            continue
        prefix, _, kind = tag.partition("-")
        if scheme == "BIOES":
            prefix = {"S": "B", "E": "I"}.get(prefix, prefix)
        elif scheme == "IOB1" and prefix == "I" and previous != kind:
            prefix = "B"
        out.append(f"{prefix}-{kind}")
        previous = kind
    return out


def _label_list(given: list[str] | None, sentences: dict[str, list[list[str]]], scheme: str) -> list[str]:
    """IOB2 labels: the given names as they are when they are IOB2, else O + B-/I- per entity type (in the
    given names' order, or sorted), so every type has the I- tag continuation pieces need."""
    found = {t for tags in sentences.values() for s in tags for t in s}
    if given and scheme == "IOB2":
        if missing := sorted(found - set(given)):
            raise FinetuneError(f"tags {', '.join(missing[:5])} are not in data.label_names; add them there")
        return list(given)
    tags = given if given else sorted(found)
    types = list(dict.fromkeys(t.partition("-")[2] for t in tags if t != "O" and "-" in t))
    if given and (missing := sorted({t.partition("-")[2] for t in found if t != "O"} - set(types))):
        raise FinetuneError(f"entity types {', '.join(missing[:5])} are not in data.label_names; add them there")
    return ["O"] + [f"{p}-{kind}" for kind in types for p in ("B", "I")]


# --- sub-word alignment and the pipeline's character spans -----------------------------------------
def align_labels(word_ids: list[int | None], tags: list[int], b_to_i: list[int], all_tokens: bool) -> list[int]:
    """One label per sub-token: the word's tag on its first piece; -100 (ignored by the loss and the metrics)
    on special tokens and, unless all_tokens, on the other pieces (which then get the tag, B- made I-)."""
    labels, previous = [], None
    for word in word_ids:
        if word is None:
            labels.append(-100)
        elif word != previous:
            labels.append(tags[word])
        else:
            labels.append(b_to_i[tags[word]] if all_tokens else -100)
        previous = word
    return labels


def splits_like_text(tokenizer) -> bool:
    """Whether pre-split words get the tokens the same words get as running text (what the pipeline reads)."""
    words = ["Hello", "world", "from", "Montreal"]
    return tokenizer(words, is_split_into_words=True)["input_ids"] == tokenizer(" ".join(words))["input_ids"]


def word_anchors(words: list[str], token_offsets: list[tuple[int, int]]) -> list[int | None]:
    """Where each word's first sub-token starts in " ".join(words); None for a word no token reaches (past
    max_seq_length, or made only of characters the tokenizer drops) — the trainer does not score those."""
    spans, start = [], 0
    for word in words:
        spans.append((start, start + len(word)))
        start += len(word) + 1
    anchors: list[int | None] = [None] * len(words)
    j = 0
    for s, e in sorted(token_offsets):
        if e <= s:
            continue
        while j < len(spans) and spans[j][1] <= s:
            j += 1
        if j < len(spans) and spans[j][0] < e and anchors[j] is None:
            anchors[j] = max(s, spans[j][0])
    return anchors


def entities_to_tags(anchors: list[int], entities: list[dict]) -> list[str]:
    """IOB2 word tags from the pipeline's entities: a word takes the entity covering its first sub-token."""
    tags, previous = [], None
    for anchor in anchors:
        hit = next((k for k, ent in enumerate(entities) if ent["start"] <= anchor < ent["end"]), None)
        tags.append("O" if hit is None else ("I-" if hit == previous else "B-") + entities[hit]["entity_group"])
        previous = hit
    return tags
