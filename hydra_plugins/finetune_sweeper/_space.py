"""Hydra's sweep syntax -> Optuna distributions (the search space asked of the sampler) and fixed overrides.

    choice(a, b, ...), a,b,... (command line), shuffle(...)   -> CategoricalDistribution([a, b, ...])
    interval(lo, hi)                                          -> FloatDistribution(lo, hi); IntDistribution when both
                                                                 are written as ints (Hydra itself makes them floats)
    tag(log, interval(lo, hi))                                -> the same with log=True
    range(start, stop[, step])                                -> Int/FloatDistribution(start, last, step=step): Hydra's
                                                                 values, so stop is excluded (as in Python's range)
    anything else (key=value, group=option, +key=value, ~key) -> a fixed override every trial gets
"""

from __future__ import annotations

import re

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import IntervalSweep, Override, RangeSweep, Transformer
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution

from finetune.errors import FinetuneError


def search_space(overrides: list[str]) -> tuple[dict[str, BaseDistribution], list[str]]:
    """The distributions of the swept keys and the overrides every trial shares (a later override of a key wins)."""
    space: dict[str, BaseDistribution] = {}
    fixed: dict[str, str] = {}
    for override in OverridesParser.create().parse_overrides(overrides):
        key = override.get_key_element()
        space.pop(key, None)
        fixed.pop(key, None)
        if override.is_sweep_override():
            space[key] = distribution(override)
        else:
            fixed[key] = override.input_line or f"{key}={override.get_value_element_as_str()}"
    return space, list(fixed.values())


def distribution(override: Override) -> BaseDistribution:
    sweep, key = override.value(), override.get_key_element()
    log = "log" in getattr(sweep, "tags", ())
    if isinstance(sweep, IntervalSweep):
        ends = _INTERVAL.search(override.input_line or "")
        if ends and all(_INT.fullmatch(end) for end in ends.groups()):
            return IntDistribution(int(sweep.start), int(sweep.end), log=log)
        return FloatDistribution(float(sweep.start), float(sweep.end), log=log)
    if log:
        raise FinetuneError(f"{key}: tag(log, ...) applies to interval(lo, hi) only; write "
                            f"{key}=tag(log, interval(lo, hi))")
    values = list(override.sweep_iterator(transformer=Transformer.encode))
    if isinstance(sweep, RangeSweep) and not sweep.shuffle:
        if not values:
            raise FinetuneError(f"{override.input_line} is empty (range excludes its stop value)")
        numbers = [float(v) if isinstance(sweep.start, float) or isinstance(sweep.step, float) else int(v)
                   for v in values]
        step = abs(sweep.step)
        if all(isinstance(n, int) for n in numbers):
            return IntDistribution(min(numbers), max(numbers), step=int(step))
        return FloatDistribution(min(numbers), max(numbers), step=float(step))
    if getattr(sweep, "shuffle", False):  # the same choices in every launch: a resumed study must get the same ones
        values.sort(key=lambda v: (type(v).__name__, v))
    return CategoricalDistribution(values)  # choice, a command-line a,b,c and shuffle(...): the listed values


_INTERVAL = re.compile(r"interval\(\s*(?:start\s*=\s*)?([^,()]+?)\s*,\s*(?:end\s*=\s*)?([^,()]+?)\s*\)")
_INT = re.compile(r"[+-]?\d[\d_]*")
