"""trainer=hf: the transformers Trainer, configured from the trainer config group."""

from __future__ import annotations

import itertools
import logging
import time
from pathlib import Path

import torch
from transformers import (EarlyStoppingCallback, PrinterCallback, ProgressCallback, Trainer, TrainerCallback,
                          TrainingArguments)
from transformers.integrations import MLflowCallback, TensorBoardCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from finetune import adapters, cpu, interrupt, optim, progress
from finetune.engines import (CHECKPOINTING, CHECKPOINTS, TrainLogs, checkpoint_write, drop_training_state, eval_keys,
                              eval_step, gathered_state_dict, logged_validation, mixed_precision, new_parameters,
                              param_groups, process_scale, step_items, step_size)
from finetune.engines.batches import eval_order, restore_order, without_length
from finetune.engines.tracking import TENSORBOARD, setup_tracking
from finetune.progress import Meter
from finetune.training_order import train_sampler

log = logging.getLogger("finetune.train")


class _Trainer(Trainer):
    """The Trainer with the task's objective, normalised as both engines normalise a step (finetune/engines), and the
    engines' shared training order; evaluation runs in inference mode."""

    def __init__(self, *args, sampler, meter: Meter, new_parameters: tuple[set[str], float], task, trainer_cfg,
                 **kwargs):
        self.epoch_sampler, self.meter, self.trainer_cfg = sampler, meter, trainer_cfg
        self.new_parameters, self.new_lr = new_parameters
        self.task, self.train_logs, self.heap = task, TrainLogs(), cpu.StepHeap()
        super().__init__(*args, **kwargs)
        self.loss_is_scaled_for_ga = True  # the task's loss divides by the items of the whole step
        self.eval_ignore = eval_keys(self.model)

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        """A step's micro-batches, and the items its loss averages over (engines.step_items)."""
        batches = list(itertools.islice(epoch_iterator, num_batches))
        if not batches:  # an epoch's end: the next epoch's first step is compared with this epoch's last
            return batches, None
        self.heap.before(step_size(batches))
        return batches, step_items(self.task, batches, self.accelerator)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss, outputs = self.task.loss(model, inputs, num_items_in_batch)
        self.train_logs.add(outputs)
        loss = process_scale(loss, self.accelerator.num_processes)
        return (loss, outputs) if return_outputs else loss

    def create_optimizer(self, model=None):
        """trainer.optim over the Trainer's decay groups (the new parameters in groups of their own)."""
        if self.optimizer is None:
            opt_model = self.model if model is None else model
            decay = set(self.get_decay_parameter_names(opt_model))
            groups = param_groups(opt_model, decay, self.args.weight_decay, self.new_parameters, self.new_lr)
            t = self.trainer_cfg
            self.optimizer = optim.build(t.optim, t.optim_args, groups, self.args.learning_rate, self.args.device,
                                         t.optimizer_in_backward)
        return super().create_optimizer(model)

    def _get_train_sampler(self, train_dataset=None):
        return self.epoch_sampler

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:  # a training log: the throughput since the previous one (trackers get it too)
            rate = self.meter.read(self.state.global_step)
            if rate is not None:
                logs["samples_per_second"] = rate
            logs.update(self.train_logs.pop(self.accelerator))
        super().log(logs, start_time)

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        loss, kept, labels = eval_step(self.task, model, self._prepare_inputs(inputs), self.eval_ignore,
                                       self.label_names)
        return (loss, None, None) if prediction_loss_only else (loss, kept, labels)

    def evaluate(self, *args, **kwargs):
        with self.meter.paused(), adapters.merged_for_inference(self.model):
            return super().evaluate(*args, **kwargs)

    def _issue_warnings_after_load(self, load_result) -> None:
        """The best checkpoint's reload: a checkpoint stores tied weights once (SmolLM2's lm_head is its input
        embeddings), so a tied key whose source was loaded is not missing; other missing keys stay a warning."""
        tied = getattr(self.model, "all_tied_weights_keys", None) or {}
        missing = [k for k in load_result.missing_keys if tied.get(k) is None or tied[k] in load_result.missing_keys]
        if len(missing) < len(load_result.missing_keys):
            self.model.tie_weights()
        super()._issue_warnings_after_load(load_result._replace(missing_keys=missing))

    def _save_checkpoint(self, *args, **kwargs):
        folder = Path(self.args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        with self.meter.paused(), checkpoint_write(folder, self.model, self.optimizer):
            return super()._save_checkpoint(*args, **kwargs)

    def _load_best_model(self) -> None:
        drop_training_state(self.optimizer, self.model)  # training is over: the reload fits where AdamW's states were
        if Path(self.state.best_model_checkpoint).name == f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}":
            return  # the best is the last: its weights are the model's, and a reload would only map a second copy
        super()._load_best_model()


class _LogCallback(TrainerCallback):
    """Trainer logs go to the run's log (console + finetune.log) as one line each, with the ETA."""

    def __init__(self, meter: Meter):
        self.meter = meter

    def on_train_begin(self, args, state, control, **kwargs):
        self.meter.start(state.global_step, state.max_steps)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            log.info(self.meter.line(state.global_step, logs))


class _Bars(ProgressCallback):
    """The Trainer's training (with ETA) and evaluation bars, without its printed copy of every log entry."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        pass


class _EpochClock(TrainerCallback):
    """Seeds the sampler's epoch and times the optimizer steps (forward, backward, update)."""

    def __init__(self, sampler):
        self.sampler, self.times, self._start = sampler, [], 0.0

    def on_epoch_begin(self, args, state, control, **kwargs):
        # the Trainer's own set_epoch does not reach the sampler of a resumed multi-process epoch
        self.sampler.set_epoch(int(state.epoch or 0))

    def on_step_begin(self, args, state, control, **kwargs):
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.times.append(time.perf_counter() - self._start)


class _StopOnSignal(TrainerCallback):
    """After each optimizer step: a signal any process received stops training there, with a checkpoint."""

    def __init__(self):
        self.trainer, self.signum = None, None

    def on_step_end(self, args, state, control, **kwargs):
        self.signum = interrupt.stop_requested(self.trainer.accelerator)
        if self.signum is not None:
            control.should_save = control.should_training_stop = True


class _OnEvaluate(TrainerCallback):
    """Hands the main metric of each validation evaluation during training to the engine's on_evaluate."""

    def __init__(self, key: str, listener):
        self.key, self.listener = key, listener

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        if metrics and self.key in metrics:  # (the final validation and test evaluations use other prefixes)
            self.listener(metrics[self.key])


class HFEngine:
    def __init__(self, cfg, task, model, tokenizer, features, output_dir: Path, on_evaluate=None):
        t = cfg.trainer
        self.task, self.features = task, features
        self.eval_sets = {split: eval_order(ds) for split, ds in features.items() if split != "train"}
        setup_tracking(cfg)
        args = _training_arguments(cfg, task, output_dir)
        sampler = train_sampler(features["train"], t.per_device_train_batch_size * t.gradient_accumulation_steps,
                                cfg.seed, t.group_by_length)
        self.clock = _EpochClock(sampler)
        meter = Meter(args.per_device_train_batch_size * t.gradient_accumulation_steps * args.world_size)
        self.stop = _StopOnSignal()
        callbacks = [_LogCallback(meter), self.clock, self.stop]
        if t.early_stopping_patience:
            callbacks.append(EarlyStoppingCallback(t.early_stopping_patience, t.early_stopping_threshold))
        if on_evaluate:
            callbacks.append(_OnEvaluate(f"eval_{task.main_metric}", on_evaluate))
        self.trainer = _Trainer(
            model=model,
            args=args,
            sampler=sampler,
            meter=meter,
            new_parameters=new_parameters(model, t),
            task=task,
            trainer_cfg=t,
            train_dataset=features["train"],
            eval_dataset=self.eval_sets["validation"][0],
            data_collator=without_length(task.collator(tokenizer)),
            processing_class=tokenizer,
            compute_metrics=self._metrics("validation"),
            preprocess_logits_for_metrics=task.preprocess_logits,
            callbacks=callbacks,
        )
        self.stop.trainer = self.trainer
        self.trainer.remove_callback(PrinterCallback)
        if self.trainer.pop_callback(ProgressCallback):  # a terminal: bars, without printing logs a second time
            self.trainer.add_callback(_Bars)
        for callback in self.trainer.callback_handler.callbacks:
            if isinstance(callback, TensorBoardCallback):  # event files in the run, not under checkpoints/
                callback.logging_dir = str(output_dir / TENSORBOARD)

    def train(self, resume_from: str | None = None) -> dict[str, float]:
        try:
            metrics = self.trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None).metrics
        except BaseException:  # stopped (a sweep's pruner, a second signal): the trackers flush and close as at the end
            t = self.trainer
            for callback in t.callback_handler.callbacks:
                if isinstance(callback, (TensorBoardCallback, MLflowCallback)):
                    callback.on_train_end(t.args, t.state, t.control)
            raise
        finally:
            for tracker in (TensorBoardCallback, MLflowCallback):  # they record the training and close at its end
                self.trainer.pop_callback(tracker)
        if self.stop.signum is not None:
            state = self.trainer.state
            raise interrupt.Interrupted(self.stop.signum, f"at step {state.global_step} of {state.max_steps}",
                                        Path(self.trainer.args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        drop_training_state(self.trainer.optimizer, self.trainer.model)
        return metrics

    def evaluate(self, split: str) -> dict[str, float]:
        self.trainer.compute_metrics = self._metrics(split)
        try:
            return self.trainer.evaluate(self.eval_sets[split][0], metric_key_prefix=split)
        finally:  # evaluations during training score the validation split
            self.trainer.compute_metrics = self._metrics("validation")

    def _metrics(self, split: str):
        """The task's metrics of the split's predictions, and those it takes from the model itself."""
        scores, inverse = self.task.compute_metrics(split, self.features[split]), self.eval_sets[split][1]
        return lambda pred: {**scores(restore_order(pred, inverse)), **self.task.evaluate_model(self.trainer.model, split)}

    def best_validation(self) -> dict[str, float] | None:
        return logged_validation(self.log_history, self.trainer.state.best_global_step)

    @property
    def model(self):
        return self.trainer.model

    @property
    def log_history(self) -> list[dict]:
        return self.trainer.state.log_history

    @property
    def step_times(self) -> list[float]:
        return self.clock.times

    def full_state_dict(self) -> dict | None:
        return gathered_state_dict(self.trainer.accelerator, self.trainer.model_wrapped)


def _training_arguments(cfg, task, output_dir: Path) -> TrainingArguments:
    """The Trainer's settings from the trainer config group (checkpoints under <output_dir>/checkpoints)."""
    t = cfg.trainer
    precision = mixed_precision(t.mixed_precision)
    return TrainingArguments(
        output_dir=str(output_dir / CHECKPOINTS),
        num_train_epochs=t.num_train_epochs,
        max_steps=t.max_steps,
        learning_rate=t.learning_rate,
        weight_decay=t.weight_decay,
        warmup_steps=t.warmup_ratio,  # a float below 1 is a ratio of the total steps
        lr_scheduler_type=t.lr_scheduler_type,
        optim=optim.TRAINER_NAMES[t.optim],  # (the optimizer itself is trainer.optim's: _Trainer.create_optimizer)
        per_device_train_batch_size=t.per_device_train_batch_size,
        per_device_eval_batch_size=t.per_device_eval_batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        max_grad_norm=t.max_grad_norm,
        eval_strategy=t.eval_strategy,
        eval_steps=t.eval_steps,
        save_strategy=t.eval_strategy,
        save_steps=t.eval_steps,
        save_total_limit=t.save_total_limit,
        load_best_model_at_end=t.eval_strategy != "no",
        metric_for_best_model=task.main_metric,
        greater_is_better=task.greater_is_better,
        logging_steps=t.logging_steps,
        logging_first_step=True,
        report_to=list(t.report_to) or "none",
        run_name=output_dir.name,
        seed=cfg.seed,
        data_seed=cfg.seed,
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        dataloader_num_workers=t.dataloader_num_workers,
        activation_checkpointing=t.gradient_checkpointing,  # (transformers 5's name of gradient checkpointing)
        activation_checkpointing_kwargs=CHECKPOINTING,
        # the items of a step across the processes are counted by the engine (engines.step_items), for every task
        average_tokens_across_devices=False,
        remove_unused_columns=False,  # keep `length` for the sampler; the collator drops it
        dataloader_pin_memory=torch.cuda.is_available(),
        disable_tqdm=not progress.is_terminal(),
    )
