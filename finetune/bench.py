"""python -m finetune.bench — throughput and quality of the project's setups, side by side.

Each row trains in its own process (forked from one that imported the libraries once, so peak RSS is the
row's own), on this machine; the bundled MiniLM on the bundled Rotten Tomatoes training split unless it says.
Rows train --steps optimizer steps of --batch-size unless they set their own (short: speed figures; the whole
bench's time: docs/benchmarks.md#bench-table):

  default     the project's sentiment setup: dynamic padding + length-grouped batches (trainer=hf)
  accelerate  the same setup on the plain accelerate loop (trainer=accelerate)
  run_glue    a baseline configured like HF run_glue.py defaults: pad to max_length 128, random batches; 6 steps
  lora        the default setup with peft=lora (frozen base weights, low-rank adapters, its own learning rate)
  ner         task=ner on WNUT-17 (../shared/data beside the repository; skipped when it is absent); 40 steps
  qa          task=qa on SQuAD v1.1 articles, 256-token windows (../shared/data, as ner); 10 steps
  multi_label task=classification on GoEmotions (28 labels a comment, ../shared/data, as ner): BCE, and the test
              split (dev.tsv, 1,000 comments) decided at the thresholds tuned on 1,000 held-out training comments
  mlm         task=mlm: masked-LM domain adaptation on the snippets' text (metric: test perplexity); 30 steps
  generation  task=generation: the bundled SmolLM2-135M fully fine-tuned on Hamlet, 2 512-token blocks a step (one
              a micro-batch, as the task trains), 3 steps; also new tokens/s of batched greedy generation from 8 test
              prompts (KV cache)
  generation_lora  the same with peft=lora
  translation task=translation: SmolLM2 fine-tuned on Multi30k en->de (../shared/data), 8 sentence pairs a step (4
              a micro-batch), 6 steps; BLEU and new tokens/s of batched greedy generation on 16 held-out sentences
  summarization  task=summarization: SmolLM2 on SciTLDR abstracts -> TLDRs (../shared/data), 2 pairs a step (1 a
              micro-batch), 4 steps; ROUGE-L and generation speed on 8 held-out abstracts
  preference  task=preference (DPO): SmolLM2 fully fine-tuned on hh-rlhf harmless pairs (../shared/data), 4 pairs a
              step (2 a micro-batch: 4 sequences), 4 steps, after the reference log-probs of its 32 training pairs;
              test reward accuracy on 16 held-out pairs
  preference_lora  the same with peft=lora (the reference is the model with its adapter disabled, in every step)
  preference_two_pass  the same as preference with chosen and rejected in two forward passes (task.concatenate)
  mem_*       memory rows: task=generation on Hamlet's 512-token blocks, 2 steps, training only (no evaluation): peak
              memory, the memory once the model is loaded, bytes per parameter (in total and above the loaded model)
              and tokens/s. SmolLM2-135M full fine-tuning at the task's own micro-batch (mem_135m: 1 x 512 tokens);
              at 4 x 512 tokens (the task's micro-batch before): full fine-tuning (_4x512), with gradient checkpointing
              (_ckpt), LoRA on its fp32 weights (_lora), on a bf16 base (_lora_bf16, and with checkpointing);
              SmolLM2-360M's and SmolLM2-1.7B's shapes with random weights (no download) at 1 x 512

and prints samples/s, peak RSS, the test metric after those steps (comparable between rows of the same steps
only: rows this short are speed figures, not trained models), and model-FLOPs utilisation (MFU):
(4 + 2 x trainable fraction) x non-embedding parameters (plus an LM head's output layer, whose matmul runs
even when its weights are the input embeddings) x real (non-pad) tokens per second of the batches trained (the
engines' training order replayed: length-grouped batches come longest first) -- 6N for full fine-tuning, about 4N
for LoRA, which computes no gradients for frozen weights -- plus attention's matmuls, 12 x layers x width x T^2 for
a sequence of T real tokens (as PaLM's MFU), over the best matmul rate measured right after the row on the shapes
the row runs (each linear layer's forward, input-gradient and weight-gradient matmuls at the row's tokens a
micro-batch, and 2048 x 2048 x 2048), in the dtype of its weights, each the best of 5 timings: the speed of a
shared machine drifts within minutes (docs/benchmarks.md#bench-stability). Each row prints its FLOPs a token, its
tokens/s and the probe's best shape, so the division can be redone.
Padding is work the hardware does but the model does not need, so it lowers MFU.
Time is what the engines measure themselves (engine.step_times): forward, backward and optimizer
update of every step but the first (a warm-up: it allocates the buffers and picks the kernels), not evaluation or
checkpointing; a row evaluates only its test split, after training. Beside it: evaluation speed (examples of the test
split per second, metrics included, and its ratio to training's per token), and, for the default row, export +
verify: the seconds a run spends after its last evaluation writing model/ and re-scoring the test split through the
exported pipeline. Each row's wall time and the whole bench's are printed too.
"""

from __future__ import annotations

import argparse
import importlib
import os
import pickle
import sys
import tempfile
import time
import traceback
from pathlib import Path

from finetune.bench_rows import EXPORTED, ROWS, SHAPES, SHARED_DATA, row_overrides
from finetune.flops import SQUARE, flops_per_token, matmul_peak_flops, matmul_shapes


def run_row(name: str, steps: int, batch_size: int, extra: list[str]) -> dict:
    """Train one row in this process and return its measurements."""
    from finetune import memory, memory_estimate
    from finetune.engines import make_engine
    from finetune.export import export, verify

    cfg, task, raw, tokenizer, features, model = _build(name, steps, batch_size, extra)
    dtype = memory.model_dtype(cfg)
    # the run's estimate of its peak, where a run makes it (the model built, before the engine); padded rows' length
    pad_to = ROWS[name][1]
    lengths = {"train": {"length": [pad_to] * len(features["train"])}} if pad_to else features
    estimate = memory_estimate.measure(cfg, model, lengths)
    dense_flops = flops_per_token(model)
    only_training = name.startswith("mem_")

    with tempfile.TemporaryDirectory() as tmp:
        engine = make_engine(cfg, task, model, tokenizer, features, Path(tmp))
        loaded_mb = memory.usage_mb()
        train_loss = engine.train()["train_loss"]
        metrics = {} if only_training else engine.evaluate("test")
        # base=True where nothing is exported: no samples, nor the outputs the pipeline check would compare against
        scores = {} if only_training else task.model_metrics(engine.model, tokenizer, raw["test"],
                                                             base=name not in EXPORTED)
        metrics.update({f"test_{k}": v for k, v in scores.items()})
        export_seconds = None
        if name in EXPORTED:  # what a run does after its last evaluation: export, then the pipeline check
            start = time.perf_counter()
            verify(task, export(engine.model, tokenizer, task, cfg, metrics, Path(tmp) / "model"), raw["test"],
                   metrics, cfg.verify_tolerance)
            export_seconds = time.perf_counter() - start
    if len(engine.step_times) < 2:
        raise SystemExit(f"bench row {name} needs at least 2 optimizer steps (the first is a warm-up)")
    seconds = sum(engine.step_times[1:])
    t = cfg.trainer
    per_step = t.per_device_train_batch_size * t.gradient_accumulation_steps
    trained = _trained_lengths(features["train"], per_step, len(engine.step_times), cfg.seed, t.group_by_length)
    samples, tokens, squares = len(trained), sum(trained), sum(n * n for n in trained)
    # attention's matmuls (QK^T, weights x V), forward and backward: 12 x layers x width x T^2 a sequence (PaLM's MFU)
    text = model.config.get_text_config()
    attention_flops = 12 * text.num_hidden_layers * text.hidden_size * squares
    peak_mb, params = memory.peak_mb(), sum(p.numel() for p in model.parameters())
    return {
        "row": name,
        "samples_per_s": samples / seconds,
        "eval_samples_per_s": metrics.get("test_samples_per_second"),
        # per token: a short row trains the longest batches first, while the test split has every length
        "eval_tokens_per_s": metrics.get("test_samples_per_second", 0) * _mean(features["test"]["length"]),
        "export_verify_s": export_seconds,
        "real_tokens_per_s": tokens / seconds,
        "flops_per_token": dense_flops + attention_flops / tokens,  # dense (6N-style) + attention's share
        "model_flops_per_s": (dense_flops * tokens + attention_flops) / seconds,
        "matmul_shapes": matmul_shapes(model, round(per_step / t.gradient_accumulation_steps * tokens / samples)),
        "peak_rss_mb": memory.rss_peak_mb(),
        "peak_mb": peak_mb, "loaded_mb": loaded_mb, "params": params, "dtype": dtype,
        "estimate_mb": estimate.total / 2**20, "estimate_parts_mb": estimate.figures()["memory_estimate_parts_mb"],
        "estimate_step_mb": estimate.step / 2**20, "estimate_first": estimate.first,
        "metric": task.main_metric,
        "test_" + task.main_metric: metrics.get("test_" + task.main_metric, float("nan")),
        "generation_tokens_per_s": metrics.get("test_generation_new_tokens_per_second"),
        "train_seconds": seconds,
        "train_loss": train_loss,
        "all_steps_seconds": sum(engine.step_times),
        "steps": len(engine.step_times),
    }


def _estimate(row: dict) -> str:
    """The run's estimate of its peak (finetune/memory_estimate.py) and its error against the measured peak."""
    return f"{row['estimate_mb']:.0f} ({row['estimate_mb'] / row['peak_mb'] - 1:+.1%})"


def _build(name: str, steps: int, batch_size: int, extra: list[str]) -> tuple:
    """What run.py builds before its engine, for one row: (cfg, task, raw splits, tokenizer, features, model)."""
    from transformers import set_seed

    from finetune import adapters, assets, compose, cpu, data, memory, validate
    from finetune.tasks import get_task
    from finetune.tasks.base import auto_class

    # the bench makes the run's estimate itself (run_row), to print it beside the peak, and refuses no row
    overrides, pad_to = [*row_overrides(name, steps, batch_size, extra), "trainer.memory_check=false"], ROWS[name][1]
    compose.register_configs()
    cfg = compose.compose(overrides)
    validate.config(cfg)
    cpu.tune()
    set_seed(cfg.seed)
    task = get_task(cfg.task)
    raw = data.load(cfg.data, task)
    path = assets.resolve(cfg.model.name_or_path)
    tokenizer = task.load_tokenizer(path, cfg.model)
    features = task.tokenize(raw, tokenizer)
    if pad_to:
        features = features.map(lambda b: tokenizer.pad(b, padding="max_length", max_length=pad_to), batched=True)
    dtype = memory.model_dtype(cfg)
    shape = next((shape for prefix, shape in SHAPES.items() if name.startswith(prefix)), None)
    if shape:  # another model's shape, random weights
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(path)
        config.update(shape)
        base = auto_class(task.auto_model).from_config(config, dtype=dtype)
    else:
        base = task.load_model(path, cfg.model, dtype)
    model = adapters.wrap(base, cfg.peft, task)
    validate.training(cfg, model, features)
    return cfg, task, raw, tokenizer, features, model


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)


def _trained_lengths(train, per_step: int, steps: int, seed: int, group_by_length: bool) -> list[int]:
    """Real (non-pad) lengths of the examples the engines trained in steps 2..steps: the engines' own training order
    replayed (length-grouped batches come longest first, so a short run's batches are not the split's average)."""
    from finetune.training_order import train_sampler

    sampler, batches, epoch = train_sampler(train, per_step, seed, group_by_length), [], 0
    while len(batches) < steps:
        sampler.set_epoch(epoch)
        order = list(sampler)
        batches += [order[i:i + per_step] for i in range(0, len(order), per_step)]
        epoch += 1
    lengths = list(train["length"])
    return [lengths[i] for batch in batches[1:steps] for i in batch]


def _in_child(log: str, fn, *args):
    """fn(*args) in a forked copy of this process, its output (logs, warnings) going to `log`. A plain fork: the child
    stays multiprocessing's MainProcess, as a fresh process would be (the MLM collator seeds itself only there)."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: run, send back the pickled result (or the exception), leave without cleanup
        os.close(read)
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        try:
            out = (True, fn(*args))
        except BaseException as e:
            traceback.print_exc()
            out = (False, f"{type(e).__name__}: {e}")
        sys.stdout.flush()
        sys.stderr.flush()
        with os.fdopen(write, "wb") as pipe:
            pickle.dump(out, pipe)
        os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as pipe:
        data = pipe.read()
    os.waitpid(pid, 0)
    ok, value = pickle.loads(data) if data else (False, "the row's process died")
    if not ok:
        raise RuntimeError(value)
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m finetune.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=60, help="optimizer steps of rows without their own (60)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--rows", nargs="*", default=list(ROWS), choices=list(ROWS), help="rows (one may repeat)")
    parser.add_argument("overrides", nargs="*", help="extra config overrides for every row")
    args = parser.parse_args(argv)
    from finetune.__main__ import rewrite_overrides
    from finetune.errors import FinetuneError

    try:
        args.overrides = rewrite_overrides(args.overrides)  # as the CLI reads them: data=<file>, model=<dir>
    except FinetuneError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    bench_start = time.perf_counter()
    # the libraries are imported once, here; each row runs in a fresh fork (no thread pool is started before it)
    for module in ("peft", "finetune.data", "finetune.engines.accelerate", "finetune.engines.hf", "finetune.export",
                   "finetune.tasks"):
        importlib.import_module(module)

    log = tempfile.NamedTemporaryFile(prefix="finetune-bench-", suffix=".log", delete=False).name
    square = _in_child(log, matmul_peak_flops)[SQUARE]
    print(f"fp32 matmul peak on this machine: {square / 1e9:.1f} GFLOP/s at 2048 x 2048 x 2048 "
          f"({len(os.sched_getaffinity(0))} cores)")
    results, peaks = [], [square]
    for name in args.rows:
        if any("{shared}" in o for o in ROWS[name][0]) and not SHARED_DATA.is_dir():
            print(f"skipping {name}: its data is not in {SHARED_DATA}", flush=True)
            continue
        print(f"running {name}: {ROWS[name][2]} ...", flush=True)
        row_start = time.perf_counter()
        try:
            result = _in_child(log, run_row, name, args.steps, args.batch_size, args.overrides)
        except RuntimeError as e:
            print(Path(log).read_text()[-3000:], file=sys.stderr)
            print(f"error: bench row {name} failed ({e}); its output is in {log}", file=sys.stderr)
            return 1
        row_seconds = time.perf_counter() - row_start
        # the row's MFU is against the best rate of the matmuls it runs (and the square one), measured right after it
        rates = _in_child(log, matmul_peak_flops, [SQUARE, *result["matmul_shapes"]], result["dtype"])
        best = max(rates, key=rates.get)
        peaks.append(rates[best])
        print(f"  {result['flops_per_token'] / 1e6:.1f} MFLOP a token x {result['real_tokens_per_s']:.0f} tokens/s = "
              f"{result['model_flops_per_s'] / 1e9:.1f} GFLOP/s; matmul probe after it: best "
              f"{rates[best] / 1e9:.1f} GFLOP/s at {' x '.join(map(str, best))} (m x k x n), "
              f"{rates[SQUARE] / 1e9:.1f} at 2048^3, over {len(rates)} shapes in {result['dtype']}", flush=True)
        print(f"  peak {result['peak_mb']:.0f} MB, estimated {_estimate(result)}: "
              + ", ".join(f"{k} {v:.0f}" for k, v in result["estimate_parts_mb"].items())
              + f"; training step {result['estimate_step_mb']:.0f}"
              + (" at the first micro-batch" if result["estimate_first"] else "")
              + f", loaded {result['loaded_mb']:.0f}", flush=True)
        results.append({**result, "row_seconds": row_seconds, "peak": rates[best]})

    _report(results, args.steps, args.batch_size)
    print(f"\nwhole bench: {time.perf_counter() - bench_start:.0f} s; matmul peak {min(peaks) / 1e9:.1f}-"
          f"{max(peaks) / 1e9:.1f} GFLOP/s over the invocation\n")
    _compare(results)
    return 0


def _report(results: list[dict], steps: int, batch_size: int) -> None:
    """The rows' tables: training rows, then memory rows."""
    print(f"\n{steps} steps x batch {batch_size} unless said, bundled MiniLM on bundled Rotten Tomatoes "
          "unless said\n")
    print("| row | setup | samples/s | real tokens/s | peak RSS MB | estimate MB (error) | test metric | MFU (MFLOP a token) "
          "| eval samples/s (x train per token) "
          "| export + verify s | generated tokens/s | row s (training) | matmul peak GFLOP/s |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in (r for r in results if r["eval_samples_per_s"] is not None):
        gen = f"{r['generation_tokens_per_s']:.1f}" if r.get("generation_tokens_per_s") else "-"
        export_s = "-" if r["export_verify_s"] is None else f"{r['export_verify_s']:.1f}"
        print(f"| {r['row']} | {ROWS[r['row']][2]} | {r['samples_per_s']:.3g} | {r['real_tokens_per_s']:.0f} | "
              f"{r['peak_rss_mb']:.0f} | {_estimate(r)} | {r['metric']} {r['test_' + r['metric']]:.4f} | "
              f"{r['model_flops_per_s'] / r['peak']:.1%} ({r['flops_per_token'] / 1e6:.0f}) | "
              f"{r['eval_samples_per_s']:.1f} ({r['eval_tokens_per_s'] / r['real_tokens_per_s']:.1f}x) | {export_s} | "
              f"{gen} | {r['row_seconds']:.0f} ({r['all_steps_seconds']:.3g}) | {r['peak'] / 1e9:.1f} |")
    memory_rows = [r for r in results if r["eval_samples_per_s"] is None]
    if memory_rows:
        print("\n| row | setup | parameters | weights | loaded MB | peak MB | estimate MB (error) | bytes/param total "
              "| above loaded | real tokens/s | MFU (MFLOP a token) | train loss | row s |")
        print("|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in memory_rows:
        print(f"| {r['row']} | {ROWS[r['row']][2]} | {r['params'] / 1e6:.1f}M | {r['dtype']} | {r['loaded_mb']:.0f} | "
              f"{r['peak_mb']:.0f} | {_estimate(r)} | {r['peak_mb'] * 2**20 / r['params']:.1f} | "
              f"{(r['peak_mb'] - r['loaded_mb']) * 2**20 / r['params']:.1f} | {r['real_tokens_per_s']:.0f} | "
              f"{r['model_flops_per_s'] / r['peak']:.1%} ({r['flops_per_token'] / 1e6:.0f}) | {r['train_loss']:.4f} | "
              f"{r['row_seconds']:.0f} |")


def _compare(results: list[dict]) -> None:
    """How stable a repeated row's figure is, and the ratios of the rows measured against each other."""
    for name in dict.fromkeys(r["row"] for r in results):  # a repeated row: how stable its figure is
        rates = [r["samples_per_s"] for r in results if r["row"] == name]
        if len(rates) > 1:
            print(f"{name} x{len(rates)}: samples/s {' / '.join(f'{x:.3g}' for x in rates)}, spread "
                  f"{(max(rates) - min(rates)) / (sum(rates) / len(rates)):.1%} of the mean")
    base = {r["row"]: r for r in results}
    for row, reference in (("default", "run_glue"), ("accelerate", "default"), ("lora", "default")):
        if row in base and reference in base:
            a, b = base[row], base[reference]
            line = f"{row} / {reference} samples/s: {a['samples_per_s'] / b['samples_per_s']:.2f}x"
            if a["steps"] == b["steps"] and a["metric"] == b["metric"]:  # the metric compares after equal steps only
                metric = "test_" + a["metric"]
                line += f"; {metric} {(a[metric] - b[metric]) * 100:+.1f} points"
            print(line)


if __name__ == "__main__":
    sys.exit(main())
