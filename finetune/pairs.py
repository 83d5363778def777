"""`python -m finetune.pairs`: preference pairs from a judge, and a judged sample of a model's answers.

    python -m finetune.pairs make <model> --judge <classifier> --prompts <file> --output pairs.jsonl
        each prompt's --samples answers sampled from <model>, scored by the judge (a text-classification export, e.g.
        a task=sentiment run) on prompt + answer; the best and the worst become a pair (prompt, chosen, rejected)
        for task=preference. Prompts with all answers alike are skipped.
    python -m finetune.pairs judge <model> --judge <classifier> --prompts <file> [--reference <base>] --output x.json
        fresh answers of <model>: the share the judge calls positive (--label), their mean score, and with
        --reference the KL divergence of <model> from it, estimated on the same answers: the mean of
        log p_model(answer) - log p_reference(answer) over the samples (nats a sequence; the models loaded one after
        the other, never both)

<model>, --reference: a run or its model/ directory, a checkpoint directory, a Hub id or bundled:smollm2. --prompts: a
csv/tsv/jsonl/json/parquet/txt file (optionally compressed) or bundled:<asset>/<file>; a prompt is the first --words
words of a row's --column (the DPO paper's controlled-sentiment prompts are review beginnings), rows taken in a
--seed shuffled order from --skip, --limit of them (so make and judge can take disjoint prompts of one file).
Answers are sampled from the model's distribution itself (temperature 1, no top-p), so the KL estimate holds.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import random
import sys
import tempfile
from pathlib import Path
from typing import Any

from finetune import assets, cpu
from finetune.errors import FinetuneError

log = logging.getLogger("finetune")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m finetune.pairs", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    for name, text in (("make", "write preference pairs judged by a classifier"),
                       ("judge", "judge fresh answers of a model (and its KL divergence from a reference)")):
        sub = commands.add_parser(name, help=text, description=text)
        sub.add_argument("model", help="the model that answers: a run or model directory, a Hub id, bundled:smollm2")
        sub.add_argument("--judge", required=True, help="a text-classification export (a run or its model/)")
        sub.add_argument("--label", help="the judge's label to maximize (default: the second of two labels)")
        sub.add_argument("--prompts", required=True, help="a file of texts whose beginnings are the prompts")
        sub.add_argument("--column", default="text", help="the prompts file's text column (default: text)")
        sub.add_argument("--keep", help="COLUMN=V1,V2: only rows whose COLUMN is one of the values")
        sub.add_argument("--words", type=int, default=4, help="words of a text that make its prompt (4)")
        sub.add_argument("--skip", type=int, default=0, help="shuffled rows to pass over first (0)")
        sub.add_argument("--limit", type=int, default=200, help="prompts to use (200)")
        sub.add_argument("--samples", type=int, default=4 if name == "make" else 1, help="answers a prompt")
        sub.add_argument("--max-new-tokens", type=int, default=24, help="tokens an answer at most (24)")
        sub.add_argument("--batch-size", type=int, default=16, help="prompts a generation batch (16)")
        sub.add_argument("--seed", type=int, default=0)
        sub.add_argument("--output", type=Path, required=True, help="pairs.jsonl (make) or a JSON report (judge)")
        if name == "judge":
            sub.add_argument("--reference", help="the model the KL divergence is measured from (e.g. its base)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    cpu.tune()
    try:
        result = make(args) if args.command == "make" else judge(args)
    except FinetuneError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    log.info("%s -> %s", ", ".join(f"{k}={v:.4g}" for k, v in result.items() if isinstance(v, float)), args.output)


def make(args) -> dict[str, Any]:
    prompts = read_prompts(args)
    answers, _ = sample(args.model, prompts, args, scored=False)
    scores = judged(args, prompts, answers)
    rows, positive = [], 0
    for prompt, texts, values in zip(prompts, answers, scores):
        positive += sum(v > 0.5 for v in values)
        best, worst = max(range(len(texts)), key=values.__getitem__), min(range(len(texts)), key=values.__getitem__)
        if texts[best] != texts[worst] and values[best] > values[worst]:
            rows.append({"prompt": prompt, "chosen": texts[best], "rejected": texts[worst],
                         "chosen_score": values[best], "rejected_score": values[worst]})
    if not rows:
        raise FinetuneError("the judge scored every prompt's answers alike: no pair to write; raise --samples")
    _write(args.output, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    result = {"prompts": len(prompts), "pairs": len(rows), "positive_rate": positive / (len(prompts) * args.samples)}
    log.info("%d pairs from %d prompts (%d answers each)", len(rows), len(prompts), args.samples)
    return result


def judge(args) -> dict[str, Any]:
    prompts = read_prompts(args)
    answers, sequences = sample(args.model, prompts, args, scored=bool(args.reference))
    flat = [v for values in judged(args, prompts, answers) for v in values]
    result: dict[str, Any] = {"model": args.model, "prompts": len(prompts), "samples": len(flat),
                              "positive_rate": sum(v > 0.5 for v in flat) / len(flat),
                              "mean_positive_score": sum(flat) / len(flat)}
    if args.reference:
        policy = sequences.pop("log_probs")
        reference = log_probs(load_causal_lm(args.reference)[0], sequences)
        kl = [p - r for p, r in zip(policy, reference)]
        mean = sum(kl) / len(kl)
        spread = math.sqrt(sum((x - mean) ** 2 for x in kl) / max(len(kl) - 1, 1) / len(kl))
        result.update(reference=args.reference, kl=mean, kl_standard_error=spread)
    result["examples"] = [{"prompt": p, "answer": a[0]} for p, a in zip(prompts[:5], answers)]
    _write(args.output, json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    return result


def read_prompts(args) -> list[str]:
    """The first --words words of the chosen rows' texts, without repeats."""
    from finetune.predict import read_rows

    path = Path(assets.resolve(args.prompts)).expanduser()
    if not path.is_file():
        raise FinetuneError(f"prompts file not found: {args.prompts}")
    column, (keep_column, _, values) = args.column, (args.keep or "").partition("=")
    columns = [column, keep_column] if keep_column else [column]
    chunks, _, _ = read_rows(path, columns, chunk_rows=4096)
    texts = [t for chunk, _ in chunks for t, *kept in zip(*(chunk[c] for c in columns))
             if not keep_column or kept[0] in values.split(",")]
    random.Random(args.seed).shuffle(texts)
    prompts = list(dict.fromkeys(" ".join(str(t).split()[: args.words]) for t in texts[args.skip:] if str(t).split()))
    if not prompts[: args.limit]:
        raise FinetuneError(f"no prompt in {args.prompts} (column {column}) after --skip {args.skip}; check --column")
    return prompts[: args.limit]


def load_causal_lm(name: str):
    """(model, tokenizer) of a run, an exported or checkpoint directory, a Hub id or a bundled asset."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(name).expanduser()
    path = path / "model" if (path / "model" / "config.json").is_file() else path
    location = str(path) if path.is_dir() else assets.resolve(name)
    tokenizer = AutoTokenizer.from_pretrained(location)
    tokenizer.padding_side = "left"  # prompts end where the answers start
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return AutoModelForCausalLM.from_pretrained(location).eval(), tokenizer


def sample(name: str, prompts: list[str], args, scored: bool) -> tuple[list[list[str]], dict[str, list]]:
    """--samples answers to each prompt, sampled from the model's own distribution: their texts, and the token ids of
    every (prompt, answer) with (`scored`) the model's log-probability of the answer."""
    import torch

    model, tokenizer = load_causal_lm(name)
    torch.manual_seed(args.seed)
    texts, sequences = [], {"prompt_ids": [], "answer_ids": []}
    for start in range(0, len(prompts), args.batch_size):
        batch = tokenizer(prompts[start:start + args.batch_size], return_tensors="pt", padding=True)
        with torch.inference_mode():
            out = model.generate(**batch, do_sample=True, temperature=1.0, top_p=1.0, top_k=0,
                                 num_return_sequences=args.samples, max_new_tokens=args.max_new_tokens,
                                 pad_token_id=tokenizer.pad_token_id)
        width = batch["input_ids"].shape[1]
        for i, row in enumerate(out.tolist()):
            prompt = batch["input_ids"][i // args.samples][batch["attention_mask"][i // args.samples].bool()].tolist()
            answer = row[width:]
            if tokenizer.eos_token_id in answer:  # up to and including the end (what follows is padding)
                answer = answer[: answer.index(tokenizer.eos_token_id) + 1]
            sequences["prompt_ids"].append(prompt)
            sequences["answer_ids"].append(answer)
            if i % args.samples == 0:
                texts.append([])
            texts[-1].append(tokenizer.decode(answer, skip_special_tokens=True))
        log.info("sampled answers to %d of %d prompts", min(start + args.batch_size, len(prompts)), len(prompts))
    if scored:  # (a KL estimate needs them; pairs do not)
        sequences["log_probs"] = log_probs(model, sequences)
    return texts, sequences


def log_probs(model, sequences: dict[str, list]) -> list[float]:
    """Each answer's summed log-probability given its prompt, through the chunked output layer (finetune/lm_loss.py)."""
    import torch

    from finetune import lm_loss

    lm_loss.attach(model, 1, 512)
    out = []
    for start in range(0, len(sequences["prompt_ids"]), 16):
        rows = list(zip(sequences["prompt_ids"][start:start + 16], sequences["answer_ids"][start:start + 16]))
        width = max(len(p) + len(a) for p, a in rows)
        ids = torch.full((len(rows), width), 0, dtype=torch.long)
        mask, targets = torch.zeros_like(ids), torch.full_like(ids, -100)
        for i, (p, a) in enumerate(rows):
            ids[i, : len(p) + len(a)], mask[i, : len(p) + len(a)] = torch.tensor(p + a), 1
            targets[i, len(p): len(p) + len(a)] = torch.tensor(a, dtype=torch.long)
        with torch.inference_mode():
            out += model(input_ids=ids, attention_mask=mask, labels=targets, per_sequence=True,
                         use_cache=False).sequence_log_probs.tolist()
    return out


def judged(args, prompts: list[str], answers: list[list[str]]) -> list[list[float]]:
    """The judge's probability of --label for each prompt + answer."""
    from transformers import pipeline

    from finetune.export import model_dir_of

    classifier = pipeline("text-classification", model=str(model_dir_of(args.judge)), top_k=None)
    labels = [classifier.model.config.id2label[i] for i in sorted(classifier.model.config.id2label)]
    label = args.label or (labels[1] if len(labels) == 2 else None)
    if label not in labels:
        raise FinetuneError(f"--label {args.label} is not one of the judge's labels ({', '.join(labels)}); name one"
                            if args.label else f"the judge has {len(labels)} labels: name the one to maximize "
                            f"with --label ({', '.join(labels)})")
    texts = [f"{p}{a}" for p, group in zip(prompts, answers) for a in group]
    scores = [next(s["score"] for s in out if s["label"] == label) for out in classifier(texts, batch_size=32)]
    per = len(answers[0])
    return [scores[i:i + per] for i in range(0, len(scores), per)]


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}-")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


if __name__ == "__main__":
    main()
