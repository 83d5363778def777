"""The data shapes of task=preference, brought to one: a prompt and two answers, then token ids.

Shapes (the columns after data.prompt_column / chosen_column / rejected_column are applied; a dotted name such as
input.messages reads a nested field):
  strings        prompt, chosen, rejected texts: the prompt tokenized as is, each answer followed by the EOS token
  conversational prompt: a list of {role, content} messages; chosen / rejected: the assistant message(s) that follow
                 (a list, or a text taken as one assistant message). The conversation is rendered with the model's
                 chat template and only the answer's tokens are scored, up to and including its end-of-turn token
  two dialogues  no prompt column: chosen and rejected are whole dialogues (texts, or message lists) sharing their
                 start (the hh-rlhf shape); the prompt is their common prefix (texts: cut back to a whitespace, so the
                 answers start a word)

The functions here are module-level and take only plain arguments: datasets fingerprints a map by its function and
arguments, so the tokenized pairs (and the reference log-probs stored beside them) are reused by a resumed run and by
every trial of a sweep, whatever else the trials change.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from finetune.errors import FinetuneError
from finetune.memory_estimate import SCORED
from finetune.tasks.generation import render

REFUSED = "refused"  # the column saying why a pair is dropped ("" when kept)
REASONS = {"equal": "have equal answers", "empty": "have an empty answer",
           "truncated": "lose their answers' difference to task.max_seq_length"}


def normalize(batch: dict[str, list], with_prompt: bool) -> dict[str, list]:
    """Rows of any shape -> prompt, chosen, rejected (conversational: message lists throughout), and why a pair is
    refused."""
    out: dict[str, list] = {"prompt": [], "chosen": [], "rejected": [], REFUSED: []}
    for i, (chosen, rejected) in enumerate(zip(batch["chosen"], batch["rejected"])):
        prompt = batch["prompt"][i] if with_prompt else None
        if prompt is None:
            prompt, chosen, rejected = _shared_start(chosen, rejected)
        elif isinstance(prompt, list):
            chosen, rejected = _as_messages(chosen), _as_messages(rejected)
        elif isinstance(chosen, list) or isinstance(rejected, list):
            raise FinetuneError("a pair has a text prompt but message-list answers: give the prompt as messages "
                                "too (a list of {role, content}), or the answers as texts")
        for answer in (chosen, rejected):
            if isinstance(answer, list) and any(m["role"] != "assistant" for m in answer):
                raise FinetuneError(f"an answer holds a {next(m['role'] for m in answer if m['role'] != 'assistant')} "
                                    "message: chosen and rejected answers are the assistant's turn after the prompt")
        empty = not text_of(chosen).strip() or not text_of(rejected).strip()
        for key, value in (("prompt", prompt), ("chosen", chosen), ("rejected", rejected)):
            out[key].append(value)
        out[REFUSED].append("empty" if empty else "equal" if chosen == rejected else "")
    return out


def _shared_start(chosen: Any, rejected: Any) -> tuple[Any, Any, Any]:
    """(prompt, chosen answer, rejected answer) of two whole dialogues: their common start is the prompt."""
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    if isinstance(chosen, str):  # back to the whitespace before the first differing word: the answers start with it,
        while n > 0 and not chosen[n - 1].isspace():  # so they tokenize as they do inside the whole dialogue
            n -= 1
        while n > 0 and chosen[n - 1].isspace():
            n -= 1
    return chosen[:n], chosen[n:], rejected[n:]


def _as_messages(answer: Any) -> list[dict]:
    return answer if isinstance(answer, list) else [{"role": "assistant", "content": answer}]


def text_of(answer: Any) -> str:
    return answer if isinstance(answer, str) else "".join(str(m.get("content") or "") for m in answer)


def fingerprint(ds, function, kwargs: dict[str, Any]) -> str:
    """The cache key of ds.map(function, fn_kwargs=kwargs): datasets hashes a module's function by its name, not its
    code, so this module's source is part of the key (changed code maps the pairs again, not reading a stale result)."""
    from datasets.fingerprint import Hasher

    return Hasher.hash((ds._fingerprint, function.__name__, Path(__file__).read_bytes(), kwargs))


def encode(batch: dict[str, list], tokenizer, max_length: int, max_prompt: int | None = None) -> dict[str, list]:
    """Pairs -> prompt_ids (its last max_prompt tokens: TRL's keep_end), chosen_ids, rejected_ids (each answer's
    tokens, cut where prompt + answer reach max_length), `length` (the pair's tokens: both sequences), the answers'
    tokens (SCORED: the loss scores them, not the prompt's) and why a pair is refused."""
    out: dict[str, list] = {"prompt_ids": [], "chosen_ids": [], "rejected_ids": [], "length": [], SCORED: [],
                            REFUSED: []}
    for prompt, chosen, rejected in zip(batch["prompt"], batch["chosen"], batch["rejected"]):
        if isinstance(prompt, list):
            p = render(tokenizer, prompt, prompt=True)
            c, r = (_chat_answer(tokenizer, prompt, a, p) for a in (chosen, rejected))
        else:
            p = tokenizer(prompt)["input_ids"] if prompt else []
            p = p or [tokenizer.eos_token_id if tokenizer.bos_token_id is None else tokenizer.bos_token_id]  # (so the
            # answer's first token is scored: it is predicted from the position before)
            c, r = ([*tokenizer(a, add_special_tokens=False)["input_ids"], tokenizer.eos_token_id]
                    for a in (chosen, rejected))
        p = p[-max_prompt:] if max_prompt else p
        room = max(max_length - len(p), 0)
        c, r = c[:room], r[:room]
        out["prompt_ids"].append(p)
        out["chosen_ids"].append(c)
        out["rejected_ids"].append(r)
        out["length"].append(2 * len(p) + len(c) + len(r))
        out[SCORED].append(len(c) + len(r))
        out[REFUSED].append("truncated" if c == r else "")
    return out


def _chat_answer(tokenizer, prompt: list[dict], answer: list[dict], prompt_ids: list[int]) -> list[int]:
    """The answer's tokens in the rendered conversation, up to and including its last end-of-turn token."""
    full = render(tokenizer, [*prompt, *answer])
    if full[: len(prompt_ids)] != prompt_ids:
        raise FinetuneError("the chat template renders a conversation differently from its prompt; the answer's "
                            "tokens cannot be located: give the pairs as texts (prompt, chosen, rejected strings)")
    ids = full[len(prompt_ids):]
    ends = [i for i, token in enumerate(ids) if token == tokenizer.eos_token_id]
    return ids[: ends[-1] + 1] if ends else ids


def refusals(reasons: list[str]) -> dict[str, int]:
    """{reason: pairs} of the refused rows."""
    counts: dict[str, int] = {}
    for reason in reasons:
        if reason:
            counts[reason] = counts.get(reason, 0) + 1
    return counts


def describe(counts: dict[str, int]) -> str:
    return ", ".join(f"{n} {REASONS[reason]}" for reason, n in counts.items())
