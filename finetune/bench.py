"""python -m finetune.bench — throughput and quality of the project's setups, side by side.

Each row trains the bundled MiniLM for the same number of optimizer steps, in its own subprocess (so
peak RSS is its own), on this machine; on the bundled Rotten Tomatoes training split unless it says:

  default     the project's sentiment setup: dynamic padding + length-grouped batches (trainer=hf)
  accelerate  the same setup on the plain accelerate loop (trainer=accelerate)
  run_glue    a baseline configured like HF run_glue.py defaults: pad to max_length 128, random batches
  lora        the default setup with peft=lora (frozen base weights, low-rank adapters, its own learning rate)
  ner         task=ner on WNUT-17 (../shared/data beside the repository; skipped when it is absent)
  qa          task=qa on SQuAD v1.1 articles (../shared/data, as ner)
  generation  task=generation: the bundled SmolLM2-135M fully fine-tuned on Hamlet, 4 x 512-token blocks a step,
              its own 10 steps; also new tokens/s of batched greedy generation from 8 test prompts (KV cache)
  generation_lora  the same with peft=lora
  mlm         task=mlm: masked-LM domain adaptation on the snippets' text (metric: test perplexity, lower is better)
  translation task=translation: SmolLM2 fine-tuned on Multi30k en->de (../shared/data), 8 sentence pairs a step, its
              own 10 steps; BLEU and new tokens/s of batched greedy generation on 64 held-out sentences
  summarization  task=summarization: SmolLM2 on SciTLDR abstracts -> TLDRs (../shared/data), 4 pairs a step, its own
              10 steps; ROUGE-L and generation speed on 32 held-out abstracts

and prints samples/s, peak RSS, the test metric after those steps, and model-FLOPs utilisation (MFU):
(4 + 2 x trainable fraction) x non-embedding parameters (plus an LM head's output layer, whose matmul runs
even when its weights are the input embeddings) x real (non-pad) tokens per second -- 6N for full
fine-tuning, about 4N for LoRA, which computes no gradients for frozen weights -- over an fp32 matmul peak
measured in the same invocation. Padding is work the hardware does but the model does not need, so it lowers MFU.
Time is what the engines measure themselves (engine.step_times): forward, backward and optimizer
update of every step but the first (a warm-up: it allocates the buffers and picks the kernels), not evaluation or
checkpointing; a row evaluates only its test split, after training. Beside it: evaluation speed (examples of the test
split per second, metrics included, and its ratio to training's), and export + verify: the seconds a run
spends after its last evaluation writing model/ and re-scoring the test split through the exported pipeline.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# public data files beside the repository (not shipped); "{shared}" in a row's overrides points there
SHARED_DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data"
WNUT = "{shared}/wnut17"
SQUAD = "{shared}/squad_v1.1/train.json"
MULTI30K = "{shared}/multi30k_en_de"
SCITLDR = "{shared}/scitldr"

_GEN = ["trainer.max_steps=10", "trainer.per_device_train_batch_size=4", "trainer.gradient_accumulation_steps=1",
        "task.eval_prompts=8"]
_S2S = ["trainer.max_steps=10", "trainer.gradient_accumulation_steps=1", "data.max_eval_samples=16"]
# name -> (config overrides, pad every example to this length or None, description)
ROWS: dict[str, tuple[list[str], int | None, str]] = {
    "default": ([], None, "dynamic padding, length-grouped (trainer=hf)"),
    "accelerate": (["trainer=accelerate"], None, "dynamic padding, length-grouped (trainer=accelerate)"),
    "run_glue": (["trainer.group_by_length=false"], 128, "pad to 128, random order (HF run_glue.py defaults)"),
    "lora": (["peft=lora"], None, "default + peft=lora (configs/peft/lora.yaml)"),
    "ner": (["task=ner", f"data.train_file={WNUT}/wnut17train.conll", f"data.test_file={WNUT}/emerging.dev.conll"],
            None, "task=ner, WNUT-17 train / emerging.dev as test, dynamic padding"),
    "generation": (["task=generation", *_GEN], None, "task=generation, SmolLM2 on Hamlet, 4 x 512 tokens, 10 steps"),
    "generation_lora": (["task=generation", *_GEN, "peft=lora"], None, "the same with peft=lora"),
    "translation": (["task=translation", f"data.source={MULTI30K}", *_S2S, "trainer.per_device_train_batch_size=8",
                     "data.max_test_samples=64"],
                    None, "task=translation, SmolLM2 on Multi30k en->de, 8 pairs, 10 steps"),
    "summarization": (["task=summarization", f"data.source={SCITLDR}", *_S2S, "trainer.per_device_train_batch_size=4",
                       "data.max_test_samples=32"], None, "task=summarization, SmolLM2 on SciTLDR, 4 pairs, 10 steps"),
    "qa": (["task=qa", f"data.source={SQUAD}", "data.group_column=title", "task.max_seq_length=256",
            "task.doc_stride=64", "data.max_test_samples=300"],
           None, "task=qa, SQuAD v1.1 split by article, 256-token windows, 300 test questions"),
    "mlm": (["task=mlm"], None, "task=mlm, 15% of tokens masked, dynamic padding, length-grouped"),
}


def matmul_peak_flops(n: int = 2048, reps: int = 10) -> float:
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(3):
        a @ b
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n**3 * reps / (time.perf_counter() - start)


def run_row(name: str, steps: int, batch_size: int, extra: list[str]) -> dict:
    """Train one row in this process and return its measurements."""
    import torch
    from transformers import set_seed

    from finetune import adapters, assets, data
    from finetune.config import CONFIG_DIR, register_configs
    from finetune.engines import make_engine
    from finetune.export import export, verify
    from finetune.tasks import get_task
    from hydra import compose, initialize_config_dir

    overrides, pad_to, _ = ROWS[name]
    overrides = [o.replace("{shared}", str(SHARED_DATA)) for o in overrides]
    overrides = [f"trainer.max_steps={steps}", f"trainer.per_device_train_batch_size={batch_size}",
                 *overrides, *extra]  # a row's own overrides (steps, batch size) win
    # no evaluation (nor checkpoint) during training: the step after the last never comes
    overrides += ["trainer.eval_strategy=steps", "trainer.eval_steps=1000000"]
    register_configs()
    with initialize_config_dir(version_base=None, config_dir=str(CONFIG_DIR)):
        cfg = compose("config", overrides=overrides)
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    set_seed(cfg.seed)
    task = get_task(cfg.task)
    raw = data.load(cfg.data, task)
    path = assets.resolve(cfg.model.name_or_path)
    tokenizer = task.load_tokenizer(path, cfg.model)
    features = task.tokenize(raw, tokenizer)
    mean_len = sum(features["train"]["length"]) / len(features["train"])
    if pad_to:
        features = features.map(lambda b: tokenizer.pad(b, padding="max_length", max_length=pad_to), batched=True)
    model = adapters.wrap(task.load_model(path, cfg.model), cfg.peft, task)
    flops_per_token = _flops_per_token(model)

    with tempfile.TemporaryDirectory() as tmp:
        engine = make_engine(cfg, task, model, tokenizer, features, Path(tmp))
        engine.train()
        metrics = engine.evaluate("test")
        metrics.update({f"test_{k}": v for k, v in task.model_metrics(engine.model, tokenizer, raw["test"]).items()})
        start = time.perf_counter()  # what a run does after its last evaluation: export, then the pipeline check
        verify(task, export(engine.model, tokenizer, task, cfg, metrics, Path(tmp) / "model"), raw["test"], metrics,
               cfg.verify_tolerance)
        export_seconds = time.perf_counter() - start
    if len(engine.step_times) < 2:
        raise SystemExit(f"bench row {name} needs at least 2 optimizer steps (the first is a warm-up)")
    seconds = sum(engine.step_times[1:])
    t = cfg.trainer
    samples = (len(engine.step_times) - 1) * t.per_device_train_batch_size * t.gradient_accumulation_steps
    return {
        "row": name,
        "samples_per_s": samples / seconds,
        "eval_samples_per_s": metrics["test_samples_per_second"],
        "export_verify_s": export_seconds,
        "real_tokens_per_s": samples * mean_len / seconds,
        "model_flops_per_s": flops_per_token * samples * mean_len / seconds,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "metric": task.main_metric,
        "test_" + task.main_metric: metrics["test_" + task.main_metric],
        "generation_tokens_per_s": metrics.get("test_generation_new_tokens_per_second"),
        "train_seconds": seconds,
    }


def _flops_per_token(model) -> float:
    """(4 + 2 x trainable fraction) x N: forward 2N, input gradients 2N, weight gradients 2N of the trained part.
    N counts the weights that multiply: not the input embedding table (a lookup), unless the LM head shares it."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    lookup = {id(p) for n, p in base.named_parameters() if "embed" in n}
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    if head is not None:
        lookup -= {id(head.weight)}
    weights = [(p, n) for n, p in model.named_parameters() if id(p) not in lookup and "lora_" not in n]
    params = sum(p.numel() for p, _ in weights)
    trainable = sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and "embed" not in n)
    return (4 + 2 * min(trainable / params, 1)) * params


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m finetune.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=120, help="optimizer steps per row (default 120)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--rows", nargs="*", default=list(ROWS), choices=list(ROWS))
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one row, print JSON
    parser.add_argument("overrides", nargs="*", help="extra config overrides for every row")
    args = parser.parse_args(argv)
    if args.one:
        print("BENCH " + json.dumps(run_row(args.one, args.steps, args.batch_size, args.overrides)), flush=True)
        return 0

    bench_start = time.perf_counter()
    peak = matmul_peak_flops()
    print(f"fp32 matmul peak on this machine: {peak / 1e9:.1f} GFLOP/s ({len(os.sched_getaffinity(0))} cores)")
    results = []
    for name in args.rows:
        if any("{shared}" in o for o in ROWS[name][0]) and not SHARED_DATA.is_dir():
            print(f"skipping {name}: its data is not in {SHARED_DATA}", flush=True)
            continue
        print(f"running {name}: {ROWS[name][2]} ...", flush=True)
        cmd = [sys.executable, "-m", "finetune.bench", "--one", name, "--steps", str(args.steps),
               "--batch-size", str(args.batch_size), *args.overrides]
        row_start = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        lines = [line for line in proc.stdout.splitlines() if line.startswith("BENCH ")]
        if proc.returncode != 0 or not lines:
            print(proc.stderr[-3000:], file=sys.stderr)
            print(f"error: bench row {name} failed", file=sys.stderr)
            return 1
        results.append({**json.loads(lines[-1][6:]), "row_seconds": time.perf_counter() - row_start})

    print(f"\n{args.steps} steps x batch {args.batch_size}, bundled MiniLM (on bundled Rotten Tomatoes unless said)\n")
    print("| row | setup | samples/s | real tokens/s | peak RSS MB | test metric | MFU | eval samples/s (x train) "
          "| export + verify s | generated tokens/s | row s |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        gen = f"{r['generation_tokens_per_s']:.1f}" if r.get("generation_tokens_per_s") else "-"
        print(f"| {r['row']} | {ROWS[r['row']][2]} | {r['samples_per_s']:.1f} | {r['real_tokens_per_s']:.0f} | "
              f"{r['peak_rss_mb']:.0f} | {r['metric']} {r['test_' + r['metric']]:.4f} | "
              f"{r['model_flops_per_s'] / peak:.1%} | {r['eval_samples_per_s']:.1f} "
              f"({r['eval_samples_per_s'] / r['samples_per_s']:.1f}x) | {r['export_verify_s']:.1f} | {gen} | "
              f"{r['row_seconds']:.0f} |")
    print(f"\nwhole bench: {time.perf_counter() - bench_start:.0f} s")
    base = {r["row"]: r for r in results}
    for row, reference in (("default", "run_glue"), ("accelerate", "default"), ("lora", "default")):
        if row in base and reference in base and base[row]["metric"] == base[reference]["metric"]:
            metric = "test_" + base[row]["metric"]
            ratio = base[row]["samples_per_s"] / base[reference]["samples_per_s"]
            delta = base[row][metric] - base[reference][metric]
            print(f"\n{row} / {reference} samples/s: {ratio:.2f}x; {metric} {delta * 100:+.1f} points")
    return 0


if __name__ == "__main__":
    sys.exit(main())
