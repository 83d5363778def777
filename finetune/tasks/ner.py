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
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from finetune import loading, progress
from finetune.config import DataConfig, TaskConfig
from finetune.errors import FinetuneError
from finetune.metrics import entity_metrics
from finetune.sources import file_format
from finetune.tagging import CONLL_FORMATS, SCHEMES, read_conll, scheme_error, scheme_name, to_iob2
from finetune.tasks.base import MetricsFn, Task, exported_labels, jsonable

if TYPE_CHECKING:
    from datasets import Dataset, DatasetDict

log = logging.getLogger(__name__)


@dataclass
class NerConfig(TaskConfig):
    max_seq_length: int = 128
    label_all_tokens: bool = False  # label every sub-token, not only a word's first
    tag_scheme: str = "auto"  # auto | IOB1 | IOB2 | BIOES: the data's tags (the model uses IOB2)


@dataclass
class NerData(DataConfig):
    text_column: str = "tokens"  # a list of words per row
    label_column: str = "tags"  # a list of tags per row
    label_names: Optional[list[str]] = None  # names of integer tags, in id order


class NerTask(Task):
    name = "ner"
    aliases = ("token_classification",)
    schema, data_schema = NerConfig, NerData
    pipeline_task = "token-classification"
    peft_task_type = "TOKEN_CLS"
    main_metric = "f1"
    auto_model = "AutoModelForTokenClassification"
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
        from datasets import ClassLabel, Dataset, DatasetDict, Features, List, Value

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

    @classmethod
    def check_config(cls, cfg, data) -> None:
        if scheme_name(cfg.tag_scheme) not in (*SCHEMES, "AUTO"):
            raise FinetuneError(f"unknown task.tag_scheme '{cfg.tag_scheme}': choose auto, IOB1, IOB2 (BIO) or BIOES")

    def _scheme(self, sentences: list[list[str]]) -> str:
        name = scheme_name(self.cfg.tag_scheme)
        if name in SCHEMES:
            return name
        if any(t[:2] in ("E-", "S-") for tags in sentences for t in tags):
            return "BIOES"
        starts = sum(scheme_error(tags, "IOB2") is not None for tags in sentences)
        if starts:  # valid IOB1 (conlleval reads it the same way): an I- tag that starts an entity
            log.info("%d sentences start an entity with I-: reading the tags as IOB1 (task.tag_scheme=IOB2 would "
                     "reject them)", starts)
            return "IOB1"
        return "IOB2"

    def tokenize(self, raw: DatasetDict, tokenizer) -> DatasetDict:
        from datasets import DatasetDict

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
        from transformers import DataCollatorForTokenClassification

        return DataCollatorForTokenClassification(tokenizer)  # pads labels with -100

    # --- model --------------------------------------------------------------------------------
    def model_kwargs(self) -> dict[str, Any]:
        return {
            "num_labels": len(self.labels),
            "id2label": dict(enumerate(self.labels)),
            "label2id": {name: i for i, name in enumerate(self.labels)},
        }

    def load_tokenizer(self, path: str, model_cfg):
        from transformers import AutoTokenizer

        tokenizer = super().load_tokenizer(path, model_cfg)
        if not tokenizer.is_fast:
            raise FinetuneError(f"the tokenizer of '{model_cfg.name_or_path}' is not a fast (tokenizers) one; token "
                                "classification needs its word alignment: use a checkpoint with a tokenizer.json")
        if not splits_like_text(tokenizer):
            # byte-level BPE (RoBERTa, GPT-2, DeBERTa v1) marks word starts with a space: give pre-split words one
            tokenizer = loading.load(AutoTokenizer, path, model_cfg, add_prefix_space=True)
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


# --- tags ------------------------------------------------------------------------------------
def _tag_names(feature: Any, wanted: list[str] | None) -> list[str] | None:
    """The names of integer tags (a ClassLabel feature or data.label_names), or None for string tags."""
    from datasets import ClassLabel, Value

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
