"""The order in which both engines train on the data: batches drawn from a seed per epoch (a resumed run replays them)
and grouped by length, the longest first; and the micro-batches a run will train, which the memory estimate reads."""

from __future__ import annotations

import math
import os

import torch
from transformers.trainer_pt_utils import LengthGroupedSampler


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


def first_epoch(train_features, micro_batch: int, accumulation: int, seed: int, group_by_length: bool = True,
                max_steps: int = -1, epochs: float = 1.0) -> list[list[int]] | None:
    """The micro-batches (example indices) a run trains, in order, when they all lie in its first epoch and one process
    trains them; None when it meets an epoch again or several processes share the data (then any step may hold the
    longest examples)."""
    per_step, n = micro_batch * accumulation, len(train_features["length"])
    wanted = max_steps * per_step if max_steps > 0 else math.ceil(epochs * n)
    if wanted > n or int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return None
    order = list(train_sampler(train_features, per_step, seed, group_by_length))[:wanted]
    return [order[i:i + micro_batch] for i in range(0, len(order), micro_batch)]
