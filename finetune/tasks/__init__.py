"""The task registry: task.name in the config -> task class. Adding a task = a module + a yaml + a row here."""

from __future__ import annotations

from importlib import import_module

from finetune.errors import FinetuneError

TASKS = {
    "classification": "finetune.tasks.classification:ClassificationTask",
    "token_classification": "finetune.tasks.token_classification:TokenClassificationTask",
    "qa": "finetune.tasks.question_answering:QuestionAnsweringTask",
    "causal_lm": "finetune.tasks.causal_lm:CausalLMTask",
    "masked_lm": "finetune.tasks.masked_lm:MaskedLMTask",
    "translation": "finetune.tasks.translation:TranslationTask",
    "summarization": "finetune.tasks.seq2seq:SummarizationTask",
}

# tasks whose loss is a token cross-entropy over a vocabulary: trainer.label_smoothing applies to them (Task.loss)
LM_LOSS = ("causal_lm", "masked_lm", "translation", "summarization")


def task_class(name: str):
    """The task class registered as `name` (imported lazily: nothing heavy at import time)."""
    if name not in TASKS:
        raise FinetuneError(f"unknown task '{name}': choose one of {', '.join(sorted(TASKS))}")
    module, _, cls = TASKS[name].partition(":")
    return getattr(import_module(module), cls)


def get_task(cfg):
    """Instantiate the task named by cfg.name."""
    return task_class(cfg.name)(cfg)
