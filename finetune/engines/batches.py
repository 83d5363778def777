"""The order in which both engines see the data: training batches drawn from a seed per epoch (a resumed run replays
them) and grouped by length; evaluation longest first, its predictions put back in dataset order."""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch
from transformers import EvalPrediction
from transformers.trainer_pt_utils import LengthGroupedSampler


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


def train_sampler(train_features, batch_size: int, seed: int, group_by_length: bool):
    """The training order of both engines: drawn from seed + epoch, so a resumed run replays it exactly."""

    class EpochSeededSampler(LengthGroupedSampler):
        # transformers' sampler draws from the global RNG, whose state at an epoch's start a resumed run cannot know
        def __init__(self):
            super().__init__(batch_size, lengths=list(train_features["length"]), generator=torch.Generator())
            self.set_epoch(0)

        def set_epoch(self, epoch: int) -> None:
            self.generator.manual_seed(seed + epoch)

        def __iter__(self):
            if group_by_length:
                return super().__iter__()
            return iter(torch.randperm(len(self.lengths), generator=self.generator).tolist())

    return EpochSeededSampler()
