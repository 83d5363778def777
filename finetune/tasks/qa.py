"""Extractive question answering (SQuAD v1.1 / v2.0): answer spans in long contexts, exact match and F1.

Data: SQuAD JSON files (nested data/paragraphs/qas), flattened JSON/JSONL/csv/parquet rows or Hub
datasets with `question`, `context` and `answers` = {text: [...], answer_start: [...]} (a list of
{text, answer_start} dicts works too). Every answer is checked against its context on load: when
context[answer_start:][:len(text)] is not the text but the text occurs elsewhere in the context,
answer_start moves to the nearest occurrence (logged); when the text is nowhere in the context the
run stops, naming the example.

Contexts longer than task.max_seq_length are read in windows overlapping by task.doc_stride tokens;
a window that does not hold the whole answer is labelled with position 0 (the classifier token).
Evaluation and the exported pipeline share the windowing and answer selection code
(finetune/pipelines/question_answering.py, copied into the exported directory).
"""

from __future__ import annotations

import bz2
import gzip
import json
import logging
import lzma
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from finetune import progress
from finetune.config import DataConfig, TaskConfig
from finetune.errors import FinetuneError
from finetune.metrics import squad_metrics
from finetune.tasks.base import MetricsFn, Task, device, jsonable

if TYPE_CHECKING:
    from datasets import Dataset, DatasetDict

log = logging.getLogger(__name__)

_OPEN = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}


@dataclass
class QaConfig(TaskConfig):
    max_seq_length: int = 384
    doc_stride: int = 128  # overlap between context windows
    max_answer_length: int = 30
    n_best_size: int = 20
    null_score_diff_threshold: float = 0.0
    version_2_with_negative: bool = False


@dataclass
class QaData(DataConfig):
    question_column: str = "question"
    context_column: str = "context"
    answers_column: str = "answers"  # {text: [...], answer_start: [...]}


class QaTask(Task):
    name = "qa"
    schema, data_schema = QaConfig, QaData
    pipeline_task = "question-answering"
    peft_task_type = "QUESTION_ANS"
    main_metric = "f1"
    auto_model = "AutoModelForQuestionAnswering"
    head = "question-answering head (answer start and end)"
    columns = {"question": "question_column", "context": "context_column", "answers": "answers_column"}
    input_columns = ("question", "context")
    verify_tolerance = 0.01  # 1 point: batches padded differently can move a near-tie answer span
    pipeline_needs_remote_code = True  # transformers 5 has no question-answering pipeline: export() ships one
    pipeline_batch_size = 32

    def __init__(self, cfg):
        super().__init__(cfg)
        self.examples: DatasetDict | None = None

    @classmethod
    def check_config(cls, cfg, data) -> None:
        if not 0 <= cfg.doc_stride <= cfg.max_seq_length // 2:
            raise FinetuneError(
                f"task.doc_stride={cfg.doc_stride} must be between 0 and half of task.max_seq_length="
                f"{cfg.max_seq_length}: the windows' overlap has to leave room for the question"
            )

    # --- data ---------------------------------------------------------------------------------
    def read_file(self, path: str) -> Dataset | None:
        """SQuAD JSON ({"data": [{"title", "paragraphs": [{"context", "qas": [...]}]}]}); None for other files."""
        from datasets import Dataset, Features, Value
        suffixes = [s.lower() for s in Path(path).suffixes][-2:]
        opener = _OPEN.get(suffixes[-1]) if suffixes else None
        if (suffixes[-2:-1] if opener else suffixes[-1:]) != [".json"]:
            return None
        with (opener or open)(path, "rt", encoding="utf-8") as f:
            try:
                doc = json.load(f)
            except ValueError:
                return None  # JSON lines or not JSON: the generic reader decides
        articles = doc.get("data") if isinstance(doc, dict) else None
        if not isinstance(articles, list) or not all(isinstance(a, dict) and "paragraphs" in a for a in articles):
            return None
        rows: dict[str, list] = {"id": [], "title": [], "context": [], "question": [], "answers": []}
        for article in articles:
            for paragraph in article["paragraphs"]:
                for qa in paragraph["qas"]:
                    answers = [] if qa.get("is_impossible") else qa.get("answers", [])
                    rows["id"].append(str(qa.get("id", len(rows["id"]))))
                    rows["title"].append(article.get("title", ""))
                    rows["context"].append(paragraph["context"])
                    rows["question"].append(qa["question"])
                    rows["answers"].append({"text": [a["text"] for a in answers],
                                            "answer_start": [int(a["answer_start"]) for a in answers]})
        log.info("read %d questions from SQuAD file %s (version %s)", len(rows["id"]), path, doc.get("version", "?"))
        features = Features({"id": Value("string"), "title": Value("string"), "context": Value("string"),
                             "question": Value("string"), "answers": _answers_feature()})
        return Dataset.from_dict(rows, features=features)

    def prepare(self, raw: DatasetDict, data_cfg) -> DatasetDict:
        from datasets import DatasetDict

        out = {}
        for split, ds in raw.items():
            keep, answers, moved = [], [], []
            for row, (question, context, given) in enumerate(zip(ds["question"], ds["context"], ds["answers"])):
                if question and question.strip() and context:
                    keep.append(row)
                    answers.append(_check_answers(f"{split} row {row}", context, given, moved))
            if len(keep) < len(ds):
                log.info("%s: dropped %d rows without a question or context", split, len(ds) - len(keep))
            if moved:
                log.warning("%s: %d answers were not at their answer_start; moved to the nearest occurrence of their "
                            "text (%s)", split, len(moved), "; ".join(moved[:3]))
            unanswerable = sum(not a["text"] for a in answers)
            if unanswerable and not self.cfg.version_2_with_negative:
                raise FinetuneError(
                    f"{unanswerable} {split} questions have no answer (SQuAD v2 style); set "
                    "task.version_2_with_negative=true to learn unanswerable questions, or remove them"
                )
            out[split] = ds.select(keep).remove_columns("answers").add_column("answers", answers, feature=_answers_feature())
        return DatasetDict(out)

    def tokenize(self, raw: DatasetDict, tokenizer) -> DatasetDict:
        from finetune.pipelines import question_answering as qa_pipeline

        if not getattr(tokenizer, "is_fast", False):
            raise FinetuneError("question answering needs a fast tokenizer (offset mapping); pick a model that has "
                                "a tokenizer.json")
        self.examples = raw  # compute_metrics maps window predictions back to these examples
        max_len, stride = self.cfg.max_seq_length, self.cfg.doc_stride

        def encode(batch: dict[str, list], indices: list[int]) -> dict[str, Any]:
            enc = qa_pipeline.encode_windows(tokenizer, batch["question"], batch["context"], max_len, stride)
            sample = enc.pop("overflow_to_sample_mapping")
            offsets = [qa_pipeline.context_offsets(enc, i) for i in range(len(sample))]
            spans = [answer_tokens(offsets[i], batch["answers"][s]) for i, s in enumerate(sample)]
            enc.pop("offset_mapping")
            return {**enc, "start_positions": [s for s, _ in spans], "end_positions": [e for _, e in spans],
                    "example_id": [indices[s] for s in sample], "offset_mapping": offsets,
                    "length": [len(ids) for ids in enc["input_ids"]]}

        features = raw.map(encode, batched=True, with_indices=True, remove_columns=raw["train"].column_names,
                           desc="tokenizing")
        # training needs no way back to the examples
        features["train"] = features["train"].remove_columns(["example_id", "offset_mapping"])
        return features

    def collator(self, tokenizer):
        from transformers import DataCollatorWithPadding

        pad = DataCollatorWithPadding(tokenizer)
        keep = {*tokenizer.model_input_names, "start_positions", "end_positions"}

        def collate(features: list[dict[str, Any]]) -> dict[str, Any]:
            return pad([{k: v for k, v in f.items() if k in keep} for f in features])  # no example_id / offsets

        return collate

    # --- evaluation and export ----------------------------------------------------------------
    def settings(self) -> dict[str, Any]:
        """The exported pipeline's defaults: what evaluation used."""
        c = self.cfg
        return {"max_seq_len": c.max_seq_length, "doc_stride": c.doc_stride, "max_answer_len": c.max_answer_length,
                "n_best_size": c.n_best_size, "handle_impossible_answer": c.version_2_with_negative,
                "null_score_diff_threshold": c.null_score_diff_threshold}

    def compute_metrics(self, split: str, features: Dataset) -> MetricsFn:
        references = [a["text"] for a in self.examples[split]["answers"]]
        labels = np.array(list(features["start_positions"])), np.array(list(features["end_positions"]))

        def fn(pred) -> dict[str, float]:
            if pred.label_ids is not None and not all(np.array_equal(a, b) for a, b in zip(pred.label_ids, labels)):
                raise FinetuneError(  # the predictions cannot be mapped back to their windows
                    f"the {split} predictions came back in another order than the {split} windows; question answering "
                    "needs evaluation in dataset order (a Trainer with train_sampling_strategy='group_by_length' "
                    "reorders evaluation batches: leave it at its default)"
                )
            return squad_metrics(self.predict(split, features, pred.predictions[0], pred.predictions[1]), references)

        return fn

    def predict(self, split: str, features: Dataset, start_logits: np.ndarray, end_logits: np.ndarray) -> list[str]:
        """The answer to each example of the split, from its windows' logits (rows in `features` order)."""
        from finetune.pipelines import question_answering as qa_pipeline

        settings = self.settings()
        post = {k: settings[k] for k in ("n_best_size", "max_answer_len", "handle_impossible_answer",
                                         "null_score_diff_threshold")}
        windows = defaultdict(list)
        for i, example in enumerate(features["example_id"]):
            windows[example].append(i)
        offsets = list(features["offset_mapping"])
        contexts = list(self.examples[split]["context"])
        return [
            qa_pipeline.best_answers(contexts[e], [(start_logits[i], end_logits[i], offsets[i]) for i in windows[e]],
                                     **post)[0]["answer"]
            for e in range(len(contexts))
        ]

    def export(self, model_dir: Path) -> None:
        """Ship the question-answering pipeline: its code beside the model, registered in config.json."""
        from transformers import AutoConfig
        from transformers.dynamic_module_utils import custom_object_save

        from finetune.pipelines import question_answering as qa_pipeline

        custom_object_save(qa_pipeline.QuestionAnsweringPipeline, model_dir)
        config = AutoConfig.from_pretrained(model_dir)
        config.custom_pipelines = {self.pipeline_task: {
            "impl": "question_answering.QuestionAnsweringPipeline", "pt": ["AutoModelForQuestionAnswering"],
            "type": "text"}}
        config.question_answering = self.settings()
        config.save_pretrained(model_dir)

    def verify(self, model_dir: Path, raw: Dataset) -> dict[str, float]:
        qa = self.load_pipeline(model_dir)
        inputs = progress.bar(self.pipeline_inputs(raw.to_dict()), total=len(raw), desc="pipeline check", unit="rows")
        answers = [self.prediction_record(o)["answer"] for o in self.run_pipeline(qa, inputs)]
        return squad_metrics(answers, [a["text"] for a in raw["answers"]])

    def load_pipeline(self, model_dir: Path):
        from transformers import pipeline

        return pipeline(model=str(model_dir), trust_remote_code=True, device=device())  # the code export() wrote

    def pipeline_inputs(self, rows: dict[str, list]) -> list:
        return [{"question": q, "context": c} for q, c in zip(rows["question"], rows["context"])]

    def prediction_record(self, output: dict) -> dict[str, Any]:
        return jsonable(output)  # answer, score, start, end (characters of the context)


def _check_answers(where: str, context: str, answers: Any, moved: list[str]) -> dict[str, list]:
    """Answers as {text: [...], answer_start: [...]}, each a span of the context (see the module docstring)."""
    if isinstance(answers, list):  # [{"text": ..., "answer_start": ...}, ...]
        answers = {"text": [a["text"] for a in answers], "answer_start": [a["answer_start"] for a in answers]}
    if not isinstance(answers, dict) or not {"text", "answer_start"} <= set(answers):
        raise FinetuneError(
            f"{where}: answers must be {{text: [...], answer_start: [...]}} (SQuAD format), got {str(answers)[:80]}; "
            "point data.answers_column at such a column"
        )
    pairs = [(t, int(s)) for t, s in zip(answers["text"], answers["answer_start"]) if t]  # "" = no answer
    texts, starts = [t for t, _ in pairs], [s for _, s in pairs]
    for k, (text, start) in enumerate(pairs):
        if context[start:start + len(text)] == text:
            continue
        found, i = [], context.find(text)
        while i != -1:
            found.append(i)
            i = context.find(text, i + 1)
        if not found:
            raise FinetuneError(
                f"{where}: answer {text!r} does not occur in its context (answer_start={start}); answers must be "
                "spans of the context: fix the text or drop the example"
            )
        starts[k] = min(found, key=lambda i: abs(i - start))
        moved.append(f"{where}: {text!r} {start} -> {starts[k]}")
    return {"text": texts, "answer_start": starts}


def answer_tokens(offsets: list, answers: dict[str, list]) -> tuple[int, int]:
    """(start, end) token positions of the first answer in a window, or (0, 0) when the window does not hold
    all of it (or the question has no answer). offsets: a window's context_offsets."""
    if not answers["text"]:
        return 0, 0
    start_char = answers["answer_start"][0]
    end_char = start_char + len(answers["text"][0])
    context = [i for i, o in enumerate(offsets) if o is not None]
    if not context or offsets[context[0]][0] > start_char or offsets[context[-1]][1] < end_char:
        return 0, 0
    start = next(i for i in context if offsets[i][1] > start_char)
    end = next(i for i in reversed(context) if offsets[i][0] < end_char)
    return start, end


def _answers_feature() -> dict:
    from datasets import Sequence, Value

    return {"text": Sequence(Value("string")), "answer_start": Sequence(Value("int64"))}
