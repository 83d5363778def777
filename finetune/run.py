"""One run, one straight walk: config -> data -> task -> engine -> export -> verify -> report. Its config was checked
before (finetune/validate.py: the command line, a sweep's trial); what needs the model is checked here.

With several processes (accelerate launch / torchrun) every process trains and evaluates; the main
process alone writes files: config, export, verification, metrics, plot. A model sharded over the
processes (FSDP, DeepSpeed ZeRO-3) is gathered by all of them and exported from an unsharded copy. A
resumed run (resume=...) continues from the newest complete checkpoint of its run directory, chosen by the CLI.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import time
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from finetune import adapters, assets, cpu, data, hub, interrupt, memory, progress, report, resume, validate
from finetune.engines import CHECKPOINTS, last_checkpoint, make_engine, own_precision
from finetune.errors import FinetuneError
from finetune.export import export, verify
from finetune.tasks import get_task

log = logging.getLogger("finetune")


def run(cfg: DictConfig, run_dir: Path, on_evaluate=None) -> dict[str, float]:
    """on_evaluate(value): called with the validation main metric of each evaluation during training (a sweep's
    trial reports it to its pruner, which stops the run by raising)."""
    with progress.console(), interrupt.handled():  # in a terminal, log lines print above the progress bars
        return _run(cfg, run_dir, on_evaluate)


def _run(cfg: DictConfig, run_dir: Path, on_evaluate=None) -> dict[str, float]:
    from accelerate import PartialState
    from accelerate.utils import set_seed  # transformers' seeds the same generators, but imports peft (seconds)

    start = time.time()
    state = PartialState()
    main = state.is_main_process
    _set_up_process()
    set_seed(cfg.seed)
    resume_from = None
    if resume.target(cfg.resume):
        resume_from = last_checkpoint(run_dir)  # the CLI pointed run_dir at the run to continue
        if resume_from is None:
            raise FinetuneError(f"nothing to resume in {run_dir}: it has no complete checkpoint")
        log.info("resuming %s from %s", run_dir, resume_from.name)
    elif main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / resume.CONFIG_FILE).write_text(OmegaConf.to_yaml(cfg, resolve=True))

    task = get_task(cfg.task)
    model_path = assets.resolve(cfg.model.name_or_path)
    tokenizer = task.load_tokenizer(model_path, cfg.model)  # first: a wrong model name fails before data work
    raw = data.load(cfg.data, task)
    features = task.tokenize(raw, tokenizer)

    dtype = memory.model_dtype(cfg)

    def build():  # the model to train; built again for the export of a sharded run
        return adapters.wrap(task.load_model(model_path, cfg.model, dtype), cfg.peft, task)

    model = build()
    validate.training(cfg, model)
    params = adapters.parameter_counts(model)
    log.info("trainable parameters: %d of %d (%.2f%%)", params["trainable_params"], params["total_params"],
             100 * params["trainable_params"] / params["total_params"])

    engine = make_engine(cfg, task, model, tokenizer, features, run_dir, on_evaluate)
    loaded_mb = memory.usage_mb()  # the model loaded and on its device: the baseline of bytes per parameter
    base = {}
    if task.report_base_metrics:  # the pretrained model's score on the same test data, for comparison
        base = {f"base_{k}": v for k, v in engine.evaluate("test").items() if _is_score(k)}
        generated = task.model_metrics(engine.model, tokenizer, raw["test"], base=True)
        base.update({f"base_test_{k}": v for k, v in generated.items()})
        log.info("base model: %s", ", ".join(f"{k}={v:.4g}" for k, v in base.items()))
    metrics = {f"train_{k}" if not k.startswith("train") else k: v for k, v in engine.train(resume_from).items()}
    interrupt.check("after training")
    metrics.update(engine.best_validation() or engine.evaluate("validation"))
    _check_finite_loss(metrics, cfg.trainer.learning_rate)
    metrics.update(engine.evaluate("test"))
    trained = own_precision(engine.model)  # after a bf16 run on a GPU, generate in the weights' precision, as model/ will
    metrics.update({f"test_{k}": v for k, v in task.model_metrics(trained, tokenizer, raw["test"]).items()})
    metrics.update(base)
    metrics.update({f"num_{split}_examples": len(ds) for split, ds in raw.items()})
    metrics.update(params)
    peaks = memory.gather_peaks()  # every process's peak (the main process adds its export and check to its own)
    interrupt.check("before the export")
    model = _whole_model(engine, build, main)
    history = engine.log_history
    model_dir = export(model, tokenizer, task, cfg, metrics, run_dir / "model") if main else None
    del model, trained, engine  # the export was their last use: the pipeline check's copy takes their memory
    cpu.release_freed_memory()
    if main:
        _verify_and_report(cfg, run_dir, task, model_dir, history, raw, metrics, start, (loaded_mb, peaks))
    # the other processes wait for the export, then all leave the process group together: a process that
    # exits while gloo's threads still run aborts ("terminate called without an active exception")
    state.wait_for_everyone()
    state.destroy_process_group()
    return metrics


def _set_up_process() -> None:
    """This process's share of the cores; the libraries' logs through the run's (bars only at a terminal)."""
    import datasets
    import huggingface_hub
    import transformers

    cpu.tune(processes_here=int(os.environ.get("LOCAL_WORLD_SIZE", "1")))  # share the cores between this machine's processes
    if "MASTER_ADDR" in os.environ and "WORLD_SIZE" not in os.environ:
        log.warning("accelerate launch started a single process: on a machine without GPUs add --multi_gpu "
                    "(or use torchrun --nproc_per_node N) to train with several")
    transformers.utils.logging.disable_default_handler()  # transformers logs go through ours (console + log file)
    transformers.utils.logging.enable_propagation()
    if not progress.is_terminal():  # bars are for people at a terminal; a log file gets log lines
        datasets.disable_progress_bars()
        transformers.utils.logging.disable_progress_bar()
        huggingface_hub.utils.disable_progress_bars()


def _check_finite_loss(metrics: dict, learning_rate: float) -> None:
    """A NaN/inf loss means the weights diverged; argmax-based metrics would still look like scores."""
    for key in ("train_loss", "validation_loss"):
        if key in metrics and not math.isfinite(metrics[key]):
            raise FinetuneError(f"training diverged: {key} is {metrics[key]}; lower trainer.learning_rate "
                                f"(now {learning_rate:g})")


def _is_score(key: str) -> bool:
    return not key.endswith(("_runtime", "_per_second", "_preparation_time")) and key != "epoch"


def _whole_model(engine, build, main: bool):
    """The trained model, whole, on the main process (None elsewhere). A sharded one is gathered by every process
    and loaded into a fresh copy built as for training (adapters included, so they can be merged and saved)."""
    state_dict = engine.full_state_dict()
    if state_dict is None:
        return engine.model
    if not main:
        return None
    log.info("gathered the sharded model's %d tensors; exporting them from an unsharded copy", len(state_dict))
    load_line = logging.getLogger("finetune.load")
    level = load_line.level
    load_line.setLevel(logging.ERROR)  # the copy's load line ("new classification head") is no news
    try:
        model = build()
    finally:
        load_line.setLevel(level)
    model.load_state_dict(state_dict)  # strict: every tensor of the copy comes from the trained model
    return model


def _verify_and_report(cfg, run_dir: Path, task, model_dir: Path, history: list[dict], raw, metrics: dict,
                       start: float, memory_so_far: tuple[float, list[float]]) -> None:
    interrupt.check("before the pipeline check")
    metrics.update(verify(task, model_dir, raw["test"], metrics, cfg.verify_tolerance))
    shutil.rmtree(run_dir / CHECKPOINTS, ignore_errors=True)  # the run finished: nothing left to resume
    metrics["total_runtime_s"] = round(time.time() - start, 1)
    loaded_mb, peaks = memory_so_far
    peaks = [memory.peak_mb(), *peaks[1:]]  # the main process's own includes the export and its check
    metrics.update(memory.figures(loaded_mb, peaks, metrics["total_params"]))

    report.write_json(run_dir / "metrics.json", metrics)
    if task.samples():
        report.write_jsonl(run_dir / "samples.jsonl", task.samples())
    report.learning_curve(history, task.main_metric, run_dir / "learning_curve.png")
    key, checked = f"test_{task.main_metric}", f"test_{task.verify_metric or task.main_metric}"
    log.info("done in %.0fs: %s=%.4f (pipeline %s %.4f) -> %s", metrics["total_runtime_s"], key, metrics[key],
             checked, metrics[f"pipeline_{checked}"], model_dir)
    if cfg.hub.push:  # only a verified export gets here
        metrics.update(hub.push(run_dir, cfg.hub))
