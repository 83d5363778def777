"""trainer=accelerate: a plain training loop on accelerate.Accelerator, for the same task objects as trainer=hf.

One loop, top to bottom: prepare model, optimizer and loaders; each epoch seeds the sampler (and skips what a resumed
run already trained) and takes a step's micro-batches at a time: their items counted (engines.step_items), each one's
task loss backpropagated, then clip, step and log; at each evaluation point it scores the validation split, tracks the
best main metric, stops early if asked, and checkpoints (accelerator.save_state + trainer_state.json). The best
checkpoint is restored at the end. Hyperparameters mean what they mean for the Trainer (same optimizer, decay groups,
scheduler, warmup, step counting and loss normalisation), so both engines train the same way. Where the model lives
across processes, and how it is checkpointed, is finetune/engines/sharding.py's.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs
from torch.utils.data import DataLoader
from transformers import EvalPrediction, get_scheduler, set_seed
from transformers.integrations.integration_utils import rewrite_logs
from transformers.trainer_pt_utils import get_parameter_names, nested_concat, nested_numpify
from transformers.trainer_utils import rotate_checkpoints
from transformers.utils import find_labels

from finetune import adapters, cpu, interrupt, optim, progress
from finetune.engines import (CHECKPOINTING, CHECKPOINTS, STATE_FILE, TrainLogs, bare, checkpoint_write,
                              drop_training_state, eval_keys, eval_step, logged_validation, mixed_precision,
                              new_parameters, param_groups, process_scale, step_items, step_size)
from finetune.engines.batches import eval_order, restore_order, without_length
from finetune.engines.sharding import CpuFsdp, Replicated
from finetune.engines.tracking import accelerate_trackers, setup_tracking
from finetune.training_order import train_sampler

log = logging.getLogger("finetune.train")
logging.getLogger("accelerate").setLevel(logging.WARNING)  # its per-file checkpoint messages drown the run's log

# Trainer.get_decay_parameter_names: no weight decay on biases and normalisation weights
_NO_DECAY = [r"bias", r"layernorm", r"rmsnorm", r"(?:^|\.)norm(?:$|\.)", r"_norm(?:$|\.)"]


@dataclass
class TrainState:
    """What a checkpoint's trainer_state.json holds, besides accelerate's own state."""

    global_step: int = 0
    epoch: float = 0.0
    loss_sum: float = 0.0  # of every logged step's loss, for the run's mean
    unlogged_losses: list[float] = field(default_factory=list)
    best_metric: float | None = None
    best_checkpoint: str | None = None  # checkpoint-<step>
    patience_counter: int = 0  # evaluations without improvement (early stopping)
    log_history: list[dict] = field(default_factory=list)

    def write(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self), indent=1))

    @classmethod
    def read(cls, path: Path) -> TrainState:
        return cls(**json.loads(path.read_text()))


class AccelerateEngine:
    def __init__(self, cfg, task, model, tokenizer, features, output_dir: Path, on_evaluate=None):
        t = self.args = cfg.trainer
        self.task, self.features, self.seed, self.on_evaluate = task, features, cfg.seed, on_evaluate
        set_seed(cfg.seed)  # as the Trainer does: training randomness starts from the seed, whatever ran before
        self.checkpoints = output_dir / CHECKPOINTS
        setup_tracking(cfg)
        self.accelerator = acc = Accelerator(
            mixed_precision=mixed_precision(t.mixed_precision),
            # the loop accumulates a step's micro-batches itself, as the Trainer does (their losses are normalised
            # over the step: engines.step_items), so accelerate divides nothing
            gradient_accumulation_steps=1,
            log_with=accelerate_trackers(t.report_to, output_dir) or None,
            project_dir=str(output_dir),
            # as the Trainer: a head that leaves some weights unused (e.g. an unused pooler) must not fail DDP
            kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
        )
        self.label_names = find_labels(type(adapters.base_model(model)))
        self.ignore_keys = eval_keys(model)
        self.collate = without_length(task.collator(tokenizer))
        self.sampler = train_sampler(features["train"], t.per_device_train_batch_size * t.gradient_accumulation_steps,
                                     cfg.seed, t.group_by_length)
        loader = self._loader(features["train"], t.per_device_train_batch_size, sampler=self.sampler)
        if t.gradient_checkpointing:  # (with frozen embeddings, LoRA, it also makes the inputs require grad)
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=CHECKPOINTING)
        self.placement = CpuFsdp() if t.fsdp else Replicated()
        new, new_lr = new_parameters(model, t)  # (named before FSDP2 replaces the parameters: it keeps the names)
        model = self.placement.shard(model)  # before the optimizer is built
        optimizer = optim.build(t.optim, t.optim_args, _param_groups(model, t.weight_decay, new, new_lr),
                                t.learning_rate, acc.device, t.optimizer_in_backward)
        self._model, self.optimizer, self.train_loader = self.placement.prepare(acc, model, optimizer, loader)
        self.steps_per_epoch = math.ceil(len(self.train_loader) / t.gradient_accumulation_steps)
        self.max_steps = t.max_steps if t.max_steps > 0 else math.ceil(t.num_train_epochs * self.steps_per_epoch)
        warmup = int(t.warmup_ratio) if t.warmup_ratio >= 1 else math.ceil(self.max_steps * t.warmup_ratio)
        self.scheduler = get_scheduler(t.lr_scheduler_type, self.optimizer, num_warmup_steps=warmup,
                                       num_training_steps=self.max_steps)
        acc.register_for_checkpointing(self.scheduler)
        self.eval_loaders: dict[str, DataLoader] = {}
        self.eval_sets = {split: eval_order(ds) for split, ds in features.items() if split != "train"}
        self.tracking = False  # trackers are open (while training)
        self.meter = progress.Meter(t.per_device_train_batch_size * t.gradient_accumulation_steps * acc.num_processes)
        self.step_times: list[float] = []
        self.heap = cpu.StepHeap()
        self.best_step: int | None = None  # the step of the checkpoint restored after training
        self._pending: list[torch.Tensor] = []  # per-step losses not yet read back from the device
        self.train_logs = TrainLogs()
        self.state = TrainState()

    # --- training ---------------------------------------------------------------------------------
    def train(self, resume_from: str | Path | None = None) -> dict[str, float]:
        try:
            return self._train(resume_from)
        except BaseException:  # stopped (a sweep's pruner, a signal): the trackers flush and close as at the end
            if self.tracking:
                for tracker in self.accelerator.trackers:
                    tracker.finish()
                self.tracking = False
            raise

    def _train(self, resume_from: str | Path | None) -> dict[str, float]:
        acc, t = self.accelerator, self.args
        if resume_from:
            # weights, optimizer, scheduler, RNG states of every process
            self.placement.load(acc, self._model, self.optimizer, Path(resume_from))
            self.state = TrainState.read(Path(resume_from) / STATE_FILE)
            self._info("resumed from %s (step %d)", resume_from, self.state.global_step)
        s = self.state
        self.tracking = bool(t.report_to)
        if self.tracking:
            acc.init_trackers("finetune")
        first_epoch, steps_done_in_epoch = divmod(s.global_step, self.steps_per_epoch)
        start, start_step = time.time(), s.global_step
        self.meter.start(start_step, self.max_steps)
        bar = progress.bar(total=self.max_steps, initial=start_step, desc="training", unit="step",
                           enabled=acc.is_main_process and progress.is_terminal())
        self._model.train()
        for epoch in range(first_epoch, math.ceil(self.max_steps / self.steps_per_epoch)):
            if self._done():
                break
            loader, seen = self.train_loader, 0
            if epoch == first_epoch and steps_done_in_epoch:
                seen = steps_done_in_epoch * t.gradient_accumulation_steps
                loader = acc.skip_first_batches(self.train_loader, seen)
            # accelerate re-applies a loader's epoch counter to the sampler when iterating it; a loader
            # wrapped for several processes does not reach the sampler, so set both
            loader.set_epoch(epoch)
            self.sampler.set_epoch(epoch)
            batches = iter(loader)
            while step_batches := list(itertools.islice(batches, t.gradient_accumulation_steps)):
                grad_norm, learning_rate = self._step(step_batches)
                seen += len(step_batches)
                s.global_step += 1
                bar.update()
                s.epoch = epoch + seen / len(self.train_loader)
                if s.global_step % t.logging_steps == 0 or s.global_step == 1:
                    self._log_train(grad_norm, learning_rate)
                last = s.global_step >= self.max_steps  # evaluated too, as the Trainer does
                if t.eval_strategy == "steps" and (s.global_step % t.eval_steps == 0 or last):
                    self._evaluate_and_save()
                if (signum := interrupt.stop_requested(acc)) is not None:
                    raise self._interrupted(signum)
                if self._done():
                    break
            if t.eval_strategy == "epoch":
                self._evaluate_and_save()
        bar.close()
        return self._finish(time.time() - start, s.global_step - start_step)

    def _step(self, batches: list[dict]) -> tuple[torch.Tensor | None, float]:
        """One optimizer step over its micro-batches: (the gradient norm before clipping, the learning rate used)."""
        acc, t, model = self.accelerator, self.args, self._model
        self.heap.before(step_size(batches))
        start = time.perf_counter()
        items = step_items(self.task, batches, acc)
        losses = []
        for i, batch in enumerate(batches):
            # gradients are reduced across the processes once, after the step's last micro-batch
            with contextlib.nullcontext() if i == len(batches) - 1 else acc.no_sync(model):
                loss, outputs = self.task.loss(model, batch, items)
                loss = process_scale(loss, acc.num_processes)
                acc.backward(loss)
            losses.append(loss.detach().float())
            self.train_logs.add(outputs)
        grad_norm = acc.clip_grad_norm_(model.parameters(), t.max_grad_norm) if t.max_grad_norm > 0 else None
        self.optimizer.step()
        learning_rate = self.scheduler.get_last_lr()[0]
        if not acc.optimizer_step_was_skipped:
            self.scheduler.step()
        self.optimizer.zero_grad()
        self.step_times.append(time.perf_counter() - start)
        self._pending.append(torch.stack(losses).sum())
        return grad_norm, learning_rate

    def _interrupted(self, signum: int) -> interrupt.Interrupted:
        """A signal stops training after this step: its checkpoint written (unless an evaluation just wrote it)."""
        s = self.state
        checkpoint = self.checkpoints / f"checkpoint-{s.global_step}"
        if not checkpoint.is_dir():
            self._save()
        return interrupt.Interrupted(signum, f"at step {s.global_step} of {self.max_steps}", checkpoint)

    def _done(self) -> bool:
        patience = self.args.early_stopping_patience
        if patience and self.state.patience_counter >= patience:
            return True
        return self.state.global_step >= self.max_steps

    def _evaluate_and_save(self) -> None:
        with self.meter.paused():  # samples/s and the ETA count training time only
            self._evaluate_and_save_now()

    def _evaluate_and_save_now(self) -> None:
        s, main = self.state, self.task.main_metric
        metrics = self._evaluate("validation", prefix="eval")
        self._log(metrics)
        value, best = metrics[f"eval_{main}"], s.best_metric
        if self.on_evaluate:  # before the checkpoint: a pruned trial stops here
            self.on_evaluate(value)
        better = best is None or (value > best if self.task.greater_is_better else value < best)
        # early stopping counts evaluations that do not beat the best by more than the threshold
        if best is None or (better and abs(value - best) > self.args.early_stopping_threshold):
            s.patience_counter = 0
        else:
            s.patience_counter += 1
        if better:
            s.best_metric, s.best_checkpoint = value, f"checkpoint-{s.global_step}"
        self._save()
        if self._done() and s.global_step < self.max_steps:
            self._info("early stopping: %s did not improve for %d evaluations", main, s.patience_counter)

    def _save(self) -> None:
        """Checkpoint into a temp dir, then rename: a run killed while saving leaves no partial checkpoint."""
        acc, s = self.accelerator, self.state
        self._flush_losses()
        final = self.checkpoints / f"checkpoint-{s.global_step}"
        tmp = self.checkpoints / f".tmp-{final.name}"
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        acc.wait_for_everyone()
        with checkpoint_write(tmp, self._model, self.optimizer):
            self.placement.save(acc, self._model, self.optimizer, tmp)
            acc.wait_for_everyone()
            if acc.is_main_process:
                s.write(tmp / STATE_FILE)
        if acc.is_main_process:
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            best = str(self.checkpoints / s.best_checkpoint) if s.best_checkpoint else None
            rotate_checkpoints(str(self.checkpoints), self.args.save_total_limit, best_model_checkpoint=best)
        acc.wait_for_everyone()

    def _finish(self, runtime: float, steps: int) -> dict[str, float]:
        acc, s, t = self.accelerator, self.state, self.args
        best = s.best_checkpoint and self.checkpoints / s.best_checkpoint
        self.best_step = None
        if best and best.is_dir():
            self.best_step = int(best.name.split("-")[-1])
            if self.best_step != s.global_step:  # the last one's weights are the model's: no second copy
                # the best weights (optimizer and RNG state no longer matter)
                self.placement.load(acc, self._model, self.optimizer, best)
            self._info("restored the best checkpoint %s (%s=%.4f)", best.name, self.task.main_metric, s.best_metric)
        drop_training_state(self.optimizer, self._model)
        self._flush_losses()
        samples = steps * t.per_device_train_batch_size * t.gradient_accumulation_steps * acc.num_processes
        metrics = {"train_runtime": round(runtime, 4), "train_samples_per_second": round(samples / max(runtime, 1e-9), 3),
                   "train_steps_per_second": round(steps / max(runtime, 1e-9), 3),
                   "train_loss": s.loss_sum / max(s.global_step, 1), "epoch": s.epoch}
        self._log(metrics)
        if self.tracking:  # trackers record the training, as the Trainer's do; they close with it
            for tracker in acc.trackers:
                tracker.finish()
            self.tracking = False
        return metrics

    # --- evaluation -------------------------------------------------------------------------------
    def evaluate(self, split: str) -> dict[str, float]:
        metrics = self._evaluate(split, prefix=split)
        self._log(metrics)
        return {**metrics, "epoch": self.state.epoch}

    def _evaluate(self, split: str, prefix: str) -> dict[str, float]:
        with adapters.merged_for_inference(self.model, sharded=self.placement.sharded):
            return self._evaluate_now(split, prefix)

    def _evaluate_now(self, split: str, prefix: str) -> dict[str, float]:
        """Predict the split on all processes (in eval_order), gather, score in dataset order with the task's metrics."""
        acc, model = self.accelerator, self._model
        start = time.time()
        losses = preds = labels = None
        model.eval()
        loader = self._eval_loader(split)
        for batch in progress.bar(loader, total=len(loader), desc=f"evaluating {split}", leave=False,
                                  enabled=acc.is_main_process and progress.is_terminal()):
            loss, kept, batch_labels = eval_step(self.task, model, batch, self.ignore_keys, self.label_names)
            losses = self._gather(losses, loss.float().repeat(len(next(iter(batch.values())))))
            kept = self.task.preprocess_logits(kept, batch_labels)
            preds = self._gather(preds, kept if isinstance(kept, tuple) else (kept,))
            if batch_labels is not None:
                labels = self._gather(labels, batch_labels if isinstance(batch_labels, tuple) else (batch_labels,))
        metrics_fn = self.task.compute_metrics(split, self.features[split])
        scores = metrics_fn(restore_order(EvalPrediction(predictions=bare(preds), label_ids=bare(labels)),
                                          self.eval_sets[split][1]))
        scores.update(self.task.evaluate_model(self.model, split))
        model.train()
        runtime, n = time.time() - start, len(self.features[split])
        out = {f"{prefix}_loss": float(losses.mean())}
        out.update({f"{prefix}_{k}": v for k, v in scores.items()})
        out.update({f"{prefix}_runtime": round(runtime, 4), f"{prefix}_samples_per_second": round(n / runtime, 3),
                    f"{prefix}_steps_per_second": round(len(self._eval_loader(split)) / runtime, 3)})
        return out

    def _gather(self, so_far, tensors):
        # per-token outputs differ in length between batches and processes: pad with -100, as the Trainer does
        tensors = self.accelerator.pad_across_processes(tensors, dim=1, pad_index=-100)
        tensors = nested_numpify(self.accelerator.gather_for_metrics(tensors))
        return tensors if so_far is None else nested_concat(so_far, tensors, padding_index=-100)

    def _eval_loader(self, split: str) -> DataLoader:
        if split not in self.eval_loaders:
            loader = self._loader(self.eval_sets[split][0], self.args.per_device_eval_batch_size)
            self.eval_loaders[split] = self.accelerator.prepare(loader)
        return self.eval_loaders[split]

    def _loader(self, dataset, batch_size: int, sampler=None) -> DataLoader:
        # a loader's own generator: starting an epoch must not draw from the global RNG that dropout uses,
        # or a resumed run (whose RNG state is restored before its first batch) would drift
        return DataLoader(dataset, batch_size=batch_size, sampler=sampler, collate_fn=self.collate,
                          num_workers=self.args.dataloader_num_workers, pin_memory=torch.cuda.is_available(),
                          generator=torch.Generator().manual_seed(self.seed))

    # --- logging ----------------------------------------------------------------------------------
    def _flush_losses(self) -> None:
        """Read the step losses back from the device in one go (not every step: that would stall it)."""
        if self._pending:
            values = self.accelerator.reduce(torch.stack(self._pending), "mean").tolist()
            self._pending = []
            self.state.unlogged_losses += values
            self.state.loss_sum += sum(values)

    def _log_train(self, grad_norm, learning_rate: float) -> None:
        self._flush_losses()
        losses, self.state.unlogged_losses = self.state.unlogged_losses, []
        entry = {"loss": round(sum(losses) / max(len(losses), 1), 4), "learning_rate": learning_rate}
        if grad_norm is not None:
            entry["grad_norm"] = float(grad_norm)
        if (rate := self.meter.read(self.state.global_step)) is not None:
            entry["samples_per_second"] = rate
        entry.update(self.train_logs.pop(self.accelerator))
        self._log(entry)

    def _log(self, metrics: dict[str, float]) -> None:
        s = self.state
        entry = {**metrics, "epoch": s.epoch, "step": s.global_step}
        s.log_history.append(entry)
        if self.tracking:  # under the names the Trainer's callbacks use: TensorBoard train/loss, MLflow loss
            numbers = {k: v for k, v in entry.items() if isinstance(v, (int, float)) and k != "step"}
            for tracker in self.accelerator.trackers:
                tracker.log(rewrite_logs(numbers) if tracker.name == "tensorboard" else numbers, step=s.global_step)
        self._info(self.meter.line(s.global_step, entry))

    def _info(self, msg: str, *args) -> None:
        if self.accelerator.is_main_process:
            log.info(msg, *args)

    # --- engine interface -------------------------------------------------------------------------
    def best_validation(self) -> dict[str, float] | None:
        return logged_validation(self.log_history, self.best_step)

    @property
    def model(self):
        return self.accelerator.unwrap_model(self._model)

    @property
    def log_history(self) -> list[dict]:
        return self.state.log_history

    def full_state_dict(self) -> dict | None:
        return self.placement.full_state_dict(self.accelerator, self._model)


def _param_groups(model, weight_decay: float, new: set[str], new_lr: float) -> list[dict]:
    decay = set(get_parameter_names(model, [torch.nn.LayerNorm], _NO_DECAY))
    return param_groups(model, decay, weight_decay, new, new_lr)
