"""Decoding settings of the generative tasks (task.generation.*): their schema, and the transformers GenerationConfig
they make, validated as transformers validates it when generating (so a bad value fails before training)."""

from __future__ import annotations

from dataclasses import dataclass

from finetune.errors import FinetuneError


@dataclass
class GenerationSettings:
    """Decoding defaults, written to the exported generation_config.json (the pipeline uses them)."""

    max_new_tokens: int = 64
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    num_beams: int = 1
    repetition_penalty: float = 1.0


def generation_config(g, **token_ids):
    """The GenerationConfig of task.generation.* (and the tokenizer's token ids), validated as transformers validates
    it when generating: FinetuneError naming the setting."""
    from transformers import GenerationConfig
    from transformers.generation import (RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper,
                                         TopPLogitsWarper)
    from transformers.utils import logging as hf_logging

    settings = {"max_new_tokens": g.max_new_tokens, "num_beams": g.num_beams, "do_sample": g.do_sample,
                "temperature": g.temperature, "top_p": g.top_p, "repetition_penalty": g.repetition_penalty}

    def refuse(key: str | None, error: Exception) -> FinetuneError:
        lines = [line.strip(" -") for line in str(error).splitlines() if line.strip(" -")]
        message = next((line for line in lines if not line.endswith(":")), str(error))
        named = [k for k in settings if f"`{k}`" in message]
        key = key or min(named, key=lambda k: message.index(f"`{k}`"), default=None)
        message = message.removeprefix(f"`{key}`: ")  # (validate() starts its messages with the key)
        return FinetuneError(f"task.generation.{key}={settings[key]}: {message}" if key else
                             f"task.generation: {message}")

    if g.num_beams < 1:  # (transformers takes 0 here, and fails inside generate())
        raise FinetuneError(f"task.generation.num_beams={g.num_beams}: it must be at least 1 (1: greedy or sampling)")
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # strict: what it would warn about is the error
    try:
        config = GenerationConfig(**settings, **token_ids)
        config.validate(strict=True)
    except ValueError as e:
        raise refuse(None, e) from e
    finally:
        hf_logging.set_verbosity(verbosity)
    # generate() builds these processors, and so checks their values, only when it runs: build them now
    processors = {"temperature": TemperatureLogitsWarper, "top_p": TopPLogitsWarper} if g.do_sample else {}
    for key, processor in {**processors, "repetition_penalty": RepetitionPenaltyLogitsProcessor}.items():
        try:
            processor(settings[key])
        except ValueError as e:
            raise refuse(key, e) from e
    return config
