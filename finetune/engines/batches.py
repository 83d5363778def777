"""The order in which both engines see the data: training batches (finetune/training_order.py) and evaluation longest
first, its predictions put back in dataset order."""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
from transformers import EvalPrediction


def without_length(collator: Callable) -> Callable:
    """The `length` column feeds the length-grouped sampler only; the model must not see it."""

    def collate(features: list[dict[str, Any]]) -> Any:
        return collator([{k: v for k, v in f.items() if k != "length"} for f in features])

    return collate


def eval_order(dataset):
    """A split in evaluation order -- longest first, so each batch pads to lengths alike and memory peaks at the
    first batch -- and the permutation that puts its predictions back in dataset order (None: kept as it was)."""
    if "length" not in dataset.column_names:
        return dataset, None
    order = np.argsort(-np.asarray(dataset["length"]), kind="stable")
    return dataset.select(order), np.argsort(order)


def restore_order(pred, inverse):
    """An EvalPrediction of a split evaluated in eval_order, in the split's own order (what the metrics expect)."""
    if inverse is None:
        return pred

    def put(x):
        return None if x is None else type(x)(put(a) for a in x) if isinstance(x, (tuple, list)) else x[inverse]

    return EvalPrediction(predictions=put(pred.predictions), label_ids=put(pred.label_ids))
