"""Extractive question answering pipeline, shipped inside exported model directories.

transformers 5 removed its `question-answering` pipeline (v5.3). finetune copies this file into the
exported directory and registers it in config.json `custom_pipelines`, so that

    qa = transformers.pipeline(model="path/to/model", trust_remote_code=True)
    qa(question="...", context="...")  # {"answer": ..., "score": ..., "start": ..., "end": ...}

works without finetune installed. The finetune `qa` task imports `encode_windows`, `context_offsets`
and `best_answers` from here, so evaluation during training and this pipeline window long contexts
and pick answers with the same code. Self-contained on purpose: imports only numpy, torch, transformers.
"""

from __future__ import annotations

import numpy as np
import torch
from transformers.pipelines.base import ChunkPipeline  # not re-exported at the top level

# Settings when config.json has no "question_answering" entry (HF run_qa.py defaults).
DEFAULTS = {
    "max_seq_len": 384,
    "doc_stride": 128,
    "max_answer_len": 30,
    "n_best_size": 20,
    "handle_impossible_answer": False,
    "null_score_diff_threshold": 0.0,
}


def encode_windows(tokenizer, questions, contexts, max_seq_len, doc_stride):
    """Tokenize (question, context) pairs into windows of at most max_seq_len tokens that overlap by doc_stride
    tokens of context; `overflow_to_sample_mapping` tells which pair each window came from."""
    room = max_seq_len - doc_stride - tokenizer.num_special_tokens_to_add(pair=True) - 1
    if room < 1:
        raise ValueError(f"doc_stride={doc_stride} leaves no room for the question in max_seq_len={max_seq_len}")
    questions = [q.lstrip() for q in questions]  # leading blanks in questions only waste window space
    # a question longer than `room` tokens is cut there: the tokenizer cannot window the context otherwise
    cut = tokenizer(questions, add_special_tokens=False, truncation=True, max_length=room + 1,
                    return_offsets_mapping=True)
    for i, offsets in enumerate(cut["offset_mapping"]):
        if len(offsets) > room:
            questions[i] = questions[i][: offsets[room - 1][1]]
    return tokenizer(
        questions,
        contexts,
        truncation="only_second",
        max_length=max_seq_len,
        stride=doc_stride,
        return_overflowing_tokens=True,
        return_offsets_mapping=True,
    )


def context_offsets(encoding, i):
    """Character offsets of window i's tokens into its context; None for question and special tokens."""
    sequence_ids = encoding.sequence_ids(i)
    return [tuple(o) if s == 1 else None for o, s in zip(encoding["offset_mapping"][i], sequence_ids)]


def best_answers(context, windows, n_best_size=20, max_answer_len=30, handle_impossible_answer=False,
                 null_score_diff_threshold=0.0):
    """Ranked answers for one question from its windows' (start_logits, end_logits, offsets).

    As HF utils_qa.postprocess_qa_predictions: the n_best_size best starts x ends of every window, kept
    when both are context tokens, end >= start and the span is at most max_answer_len tokens; a span
    scores start + end logit; scores become probabilities by a softmax over the kept candidates. With
    handle_impossible_answer (SQuAD v2), the null answer (position 0 in every window, the smallest such
    score over windows) comes first when it beats the best span by more than null_score_diff_threshold.
    """
    spans, null_score = {}, None
    for start_logits, end_logits, offsets in windows:
        n = len(offsets)
        start_logits, end_logits = np.asarray(start_logits[:n], float), np.asarray(end_logits[:n], float)
        score = start_logits[0] + end_logits[0]
        null_score = score if null_score is None else min(null_score, score)
        starts = np.argsort(start_logits)[::-1][:n_best_size]
        ends = np.argsort(end_logits)[::-1][:n_best_size]
        for s in starts:
            for e in ends:
                if offsets[s] is None or offsets[e] is None or e < s or e - s + 1 > max_answer_len:
                    continue
                span = (int(offsets[s][0]), int(offsets[e][1]))
                spans[span] = max(spans.get(span, -np.inf), start_logits[s] + end_logits[e])  # windows overlap
    ranked = sorted(((score, span) for span, score in spans.items()), key=lambda x: -x[0])[:n_best_size]
    if handle_impossible_answer:
        null = (null_score, None)
        if not ranked or null_score - ranked[0][0] > null_score_diff_threshold:
            ranked = [null, *ranked]
        else:
            ranked = [*ranked, null]
    if not ranked:
        return [{"score": 0.0, "start": 0, "end": 0, "answer": ""}]
    scores = np.array([s for s, _ in ranked])
    probs = np.exp(scores - scores.max())
    probs /= probs.sum()
    return [
        {"score": float(p), "start": span[0] if span else 0, "end": span[1] if span else 0,
         "answer": context[span[0]:span[1]] if span else ""}
        for p, (_, span) in zip(probs, ranked)
    ]


class QuestionAnsweringPipeline(ChunkPipeline):
    """qa(question=..., context=...) or qa({"question": ..., "context": ...}) or a list of such dicts.

    Returns {"answer", "score", "start", "end"} (character offsets into the context), or a list of the
    top_k best when top_k > 1. A context longer than max_seq_len is read in overlapping windows.
    Options (call or pipeline() kwargs; defaults from the exported config.json): max_seq_len, doc_stride,
    max_answer_len, n_best_size, handle_impossible_answer, null_score_diff_threshold, top_k.
    """

    _load_processor = False
    _load_image_processor = False
    _load_feature_extractor = False
    _load_tokenizer = True

    def __call__(self, *args, **kwargs):
        if not args and "question" in kwargs and "context" in kwargs:
            question, context = kwargs.pop("question"), kwargs.pop("context")
            if isinstance(question, str):
                args = ({"question": question, "context": context},)
            else:
                contexts = [context] * len(question) if isinstance(context, str) else context
                args = ([{"question": q, "context": c} for q, c in zip(question, contexts, strict=True)],)
        return super().__call__(*args, **kwargs)

    def _sanitize_parameters(self, top_k=None, max_seq_len=None, doc_stride=None, max_answer_len=None,
                             n_best_size=None, handle_impossible_answer=None, null_score_diff_threshold=None):
        given = {"top_k": top_k, "max_seq_len": max_seq_len, "doc_stride": doc_stride, "max_answer_len": max_answer_len,
                 "n_best_size": n_best_size, "handle_impossible_answer": handle_impossible_answer,
                 "null_score_diff_threshold": null_score_diff_threshold}
        given = {k: v for k, v in given.items() if v is not None}
        pre = {k: given[k] for k in ("max_seq_len", "doc_stride") if k in given}
        post = {k: v for k, v in given.items() if k not in pre}
        return pre, {}, post

    def _settings(self, given):
        saved = getattr(self.model.config, "question_answering", None) or {}
        return {**DEFAULTS, **saved, **given}

    def preprocess(self, inputs, **params):
        settings = self._settings(params)
        if not isinstance(inputs, dict) or not {"question", "context"} <= set(inputs):
            raise ValueError("question answering takes question=..., context=... or {'question': ..., 'context': ...}")
        question, context = inputs["question"], inputs["context"]
        if not isinstance(question, str) or not question.strip() or not isinstance(context, str) or not context.strip():
            raise ValueError("question and context must be non-empty strings")
        encoding = encode_windows(self.tokenizer, [question], [context], settings["max_seq_len"], settings["doc_stride"])
        names = [k for k in self.tokenizer.model_input_names if k in encoding]
        for i in range(len(encoding["input_ids"])):
            yield {
                **{k: torch.tensor([encoding[k][i]]) for k in names},
                "offsets": context_offsets(encoding, i),
                "context": context,
                "is_last": i == len(encoding["input_ids"]) - 1,
            }

    def _forward(self, inputs):
        extra = {k: inputs.pop(k) for k in ("offsets", "context", "is_last")}
        output = self.model(**inputs)
        return {"start_logits": output.start_logits, "end_logits": output.end_logits, **extra}

    def postprocess(self, outputs, top_k=1, **params):
        settings = self._settings(params)
        windows = [(o["start_logits"][0].float().numpy(), o["end_logits"][0].float().numpy(), o["offsets"])
                   for o in outputs]
        answers = best_answers(
            outputs[0]["context"], windows, n_best_size=settings["n_best_size"],
            max_answer_len=settings["max_answer_len"], handle_impossible_answer=settings["handle_impossible_answer"],
            null_score_diff_threshold=settings["null_score_diff_threshold"],
        )
        return answers[0] if top_k == 1 else answers[:top_k]
