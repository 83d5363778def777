"""One run, one straight walk: config -> data -> task -> engine -> export -> verify -> report.

With several processes (accelerate launch / torchrun) every process trains and evaluates; the main
process alone writes files: config, export, verification, metrics, plot. A resumed run (resume=...)
continues from the newest complete checkpoint of its run directory, chosen by the CLI.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import time
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from finetune import adapters, assets, data, report, resume
from finetune.engines import CHECKPOINTS, last_checkpoint, make_engine
from finetune.errors import FinetuneError
from finetune.export import export, verify
from finetune.tasks import get_task

log = logging.getLogger("finetune")


def run(cfg: DictConfig, run_dir: Path) -> dict[str, float]:
    import datasets
    import torch
    import transformers

    from accelerate import PartialState

    start = time.time()
    state = PartialState()
    main = state.is_main_process
    processes_here = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))  # share the cores between this machine's processes
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS") or max(1, len(os.sched_getaffinity(0)) // processes_here)))
    if "MASTER_ADDR" in os.environ and "WORLD_SIZE" not in os.environ:
        log.warning("accelerate launch started a single process: on a machine without GPUs add --multi_gpu "
                    "(or use torchrun --nproc_per_node N) to train with several")
    transformers.set_seed(cfg.seed)
    transformers.utils.logging.disable_default_handler()  # transformers logs go through ours (console + log file)
    transformers.utils.logging.enable_propagation()
    if not sys.stderr.isatty():
        datasets.disable_progress_bars()
    resume_from = None
    if resume.target(cfg.resume):
        resume_from = last_checkpoint(run_dir)  # the CLI pointed run_dir at the run to continue
        if resume_from is None:
            raise FinetuneError(f"nothing to resume in {run_dir}: it has no complete checkpoint")
        log.info("resuming %s from %s", run_dir, resume_from.name)
    elif main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
        (run_dir / resume.HASH_FILE).write_text(resume.config_hash(cfg) + "\n")

    task = get_task(cfg.task)
    model_path = assets.resolve(cfg.model.name_or_path)
    tokenizer = task.load_tokenizer(model_path, cfg.model)  # first: a wrong model name fails before data work
    raw = data.load(cfg.data, task)
    features = task.tokenize(raw, tokenizer)
    model = adapters.wrap(task.load_model(model_path, cfg.model), cfg.peft, task)
    params = adapters.parameter_counts(model)
    log.info("trainable parameters: %d of %d (%.2f%%)", params["trainable_params"], params["total_params"],
             100 * params["trainable_params"] / params["total_params"])

    engine = make_engine(cfg, task, model, tokenizer, features, run_dir)
    base = {}
    if task.report_base_metrics:  # the pretrained model's score on the same test data, for comparison
        base = {f"base_{k}": v for k, v in engine.evaluate("test").items() if _is_score(k)}
        base.update({f"base_test_{k}": v for k, v in task.model_metrics(engine.model, tokenizer, raw["test"]).items()})
        log.info("base model: %s", ", ".join(f"{k}={v:.4g}" for k, v in base.items()))
    metrics = {f"train_{k}" if not k.startswith("train") else k: v for k, v in engine.train(resume_from).items()}
    metrics.update(engine.evaluate("validation"))
    metrics.update(engine.evaluate("test"))
    metrics.update({f"test_{k}": v for k, v in task.model_metrics(engine.model, tokenizer, raw["test"]).items()})
    metrics.update(base)
    metrics.update({f"num_{split}_examples": len(ds) for split, ds in raw.items()})
    metrics.update(params)
    if main:
        _export_and_report(cfg, run_dir, task, engine, tokenizer, raw, metrics, start)
    # the other processes wait for the export, then all leave the process group together: a process that
    # exits while gloo's threads still run aborts ("terminate called without an active exception")
    state.wait_for_everyone()
    state.destroy_process_group()
    return metrics


def _is_score(key: str) -> bool:
    return not key.endswith(("_runtime", "_per_second", "_preparation_time")) and key != "epoch"


def _export_and_report(cfg, run_dir: Path, task, engine, tokenizer, raw, metrics: dict, start: float) -> None:
    model_dir = export(engine.model, tokenizer, task, cfg, metrics, run_dir / "model")
    metrics.update(verify(task, model_dir, raw["test"], metrics, cfg.verify_tolerance))
    shutil.rmtree(run_dir / CHECKPOINTS, ignore_errors=True)  # the run finished: nothing left to resume
    metrics["total_runtime_s"] = round(time.time() - start, 1)

    report.write_json(run_dir / "metrics.json", metrics)
    report.learning_curve(engine.log_history, task.main_metric, run_dir / "learning_curve.png")
    key, checked = f"test_{task.main_metric}", f"test_{task.verify_metric or task.main_metric}"
    log.info("done in %.0fs: %s=%.4f (pipeline %s %.4f) -> %s", metrics["total_runtime_s"], key, metrics[key],
             checked, metrics[f"pipeline_{checked}"], model_dir)
