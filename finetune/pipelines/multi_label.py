"""Multi-label text classification pipeline with decision thresholds, shipped inside exported model directories.

transformers' text-classification pipeline gives every label's probability (a sigmoid for a multi-label model,
`top_k=None`) and leaves the decision to the caller. finetune tunes a threshold for each label on the validation
split, saves them in config.json (`decision_thresholds`: {label: threshold}), copies this file beside the model and
registers it in config.json `custom_pipelines`, so that

    clf = transformers.pipeline(model="path/to/model", trust_remote_code=True)
    clf("I love it, thank you!")   # {"labels": ["gratitude", "love"], "scores": {"admiration": 0.02, ...}}

returns the predicted label set (best first) with every label's probability. `thresholds=` (a number for every
label, or {label: threshold}) overrides the saved ones for a call. Text pairs: {"text": ..., "text_pair": ...}.
The plain `pipeline("text-classification", model=..., top_k=None)` still loads the same directory without remote code.
finetune's classification task decides with `decide` from here, so its metrics and this pipeline agree.
Self-contained on purpose: imports only numpy and transformers.
"""

from __future__ import annotations

import numpy as np
from transformers.pipelines.base import Pipeline
from transformers.pipelines.text_classification import TextClassificationPipeline

TASK = "multi-label-classification"  # its name in custom_pipelines (not "text-classification": that stays plain)
DEFAULT_THRESHOLD = 0.5


def sigmoid(logits):
    """Probabilities of a multi-label head's logits (float32, as the text-classification pipeline computes them)."""
    return 1.0 / (1.0 + np.exp(-np.asarray(logits, dtype=np.float32)))


def decide(scores, thresholds):
    """The labels predicted: a boolean array of scores' shape, True where a score reaches its label's threshold."""
    return np.asarray(scores) >= np.asarray(thresholds)


def thresholds_of(config, override=None):
    """One threshold per label id: `override` (a number, or {label: number}) or config.decision_thresholds; 0.5 for a
    label neither names."""
    names = [config.id2label[i] for i in range(config.num_labels)]
    given = getattr(config, "decision_thresholds", None) if override is None else override
    if isinstance(given, dict):
        unknown = sorted(set(given) - set(names))
        if unknown:
            raise ValueError(f"thresholds for unknown labels {unknown}; the labels are {names}")
        return np.array([float(given.get(name, DEFAULT_THRESHOLD)) for name in names])
    return np.full(len(names), DEFAULT_THRESHOLD if given is None else float(given))


class MultiLabelClassificationPipeline(TextClassificationPipeline):
    """clf(text or {"text", "text_pair"}, or a list of them) -> {"labels": [...], "scores": {label: probability}}
    for each input; options: thresholds=<number or {label: number}>, and the tokenizer's (truncation=True, ...)."""

    def __call__(self, inputs, **kwargs):
        return Pipeline.__call__(self, inputs, **kwargs)  # one result a text (no list around a single one)

    def _sanitize_parameters(self, thresholds=None, **tokenizer_kwargs):
        post = {} if thresholds is None else {"thresholds": thresholds}
        return tokenizer_kwargs, {}, post

    def postprocess(self, model_outputs, thresholds=None):
        config = self.model.config
        scores = sigmoid(model_outputs["logits"][0].float().numpy())
        chosen = np.flatnonzero(decide(scores, thresholds_of(config, thresholds)))
        return {"labels": [config.id2label[int(i)] for i in chosen[np.argsort(-scores[chosen], kind="stable")]],
                "scores": {config.id2label[i]: float(s) for i, s in enumerate(scores)}}
