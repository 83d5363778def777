"""trainer=hf: the transformers Trainer, configured from the trainer config group."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

import logging

from transformers import PrinterCallback, Trainer, TrainerCallback, TrainingArguments

from finetune.engines import mixed_precision, without_length

log = logging.getLogger("finetune.train")


class _LogCallback(TrainerCallback):
    """Trainer logs go to the run's log (console + finetune.log) instead of bare prints."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            log.info("step %d: %s", state.global_step, ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                                                  for k, v in logs.items()))


class HFEngine:
    def __init__(self, cfg, task, model, tokenizer, features, output_dir: Path):
        t = cfg.trainer
        precision = mixed_precision(t.mixed_precision)
        self.task, self.features = task, features
        args = TrainingArguments(
            output_dir=str(output_dir / "checkpoints"),
            num_train_epochs=t.num_train_epochs,
            max_steps=t.max_steps,
            learning_rate=t.learning_rate,
            weight_decay=t.weight_decay,
            warmup_steps=t.warmup_ratio,  # a float below 1 is a ratio of the total steps
            lr_scheduler_type=t.lr_scheduler_type,
            per_device_train_batch_size=t.per_device_train_batch_size,
            per_device_eval_batch_size=t.per_device_eval_batch_size,
            gradient_accumulation_steps=t.gradient_accumulation_steps,
            max_grad_norm=t.max_grad_norm,
            train_sampling_strategy="group_by_length" if t.group_by_length else "random",
            eval_strategy=t.eval_strategy,
            eval_steps=t.eval_steps,
            save_strategy=t.eval_strategy,
            save_steps=t.eval_steps,
            save_total_limit=t.save_total_limit,
            load_best_model_at_end=True,
            metric_for_best_model=task.main_metric,
            greater_is_better=task.greater_is_better,
            logging_steps=t.logging_steps,
            logging_first_step=True,
            report_to=list(t.report_to) or "none",
            seed=cfg.seed,
            data_seed=cfg.seed,
            bf16=precision == "bf16",
            fp16=precision == "fp16",
            dataloader_num_workers=t.dataloader_num_workers,
            remove_unused_columns=False,  # keep `length` for the sampler; the collator drops it
            dataloader_pin_memory=torch.cuda.is_available(),
            disable_tqdm=not sys.stderr.isatty(),
        )
        self.trainer = Trainer(
            model=model,
            args=args,
            train_dataset=features["train"],
            eval_dataset=features["validation"],
            data_collator=without_length(task.collator(tokenizer)),
            processing_class=tokenizer,
            compute_metrics=task.compute_metrics("validation", features["validation"]),
            callbacks=[_LogCallback()],
        )
        self.trainer.remove_callback(PrinterCallback)

    def train(self, resume_from: str | None = None) -> dict[str, float]:
        return self.trainer.train(resume_from_checkpoint=resume_from).metrics

    def evaluate(self, split: str) -> dict[str, float]:
        self.trainer.compute_metrics = self.task.compute_metrics(split, self.features[split])
        return self.trainer.evaluate(self.features[split], metric_key_prefix=split)

    @property
    def model(self):
        return self.trainer.model

    @property
    def log_history(self) -> list[dict]:
        return self.trainer.state.log_history
