"""The task registry: task.name in the config -> task class. Adding a task = a module + a yaml + a row here."""

from __future__ import annotations

from importlib import import_module

from finetune.errors import FinetuneError

TASKS = {
    "classification": "finetune.tasks.classification:ClassificationTask",
    "token_classification": "finetune.tasks.token_classification:TokenClassificationTask",
    "qa": "finetune.tasks.question_answering:QuestionAnsweringTask",
    "causal_lm": "finetune.tasks.causal_lm:CausalLMTask",
    "translation": "finetune.tasks.translation:TranslationTask",
    "summarization": "finetune.tasks.seq2seq:SummarizationTask",
}


def get_task(cfg):
    """Instantiate the task named by cfg.name (imported lazily: nothing heavy at import time)."""
    if cfg.name not in TASKS:
        raise FinetuneError(f"unknown task '{cfg.name}': choose one of {', '.join(sorted(TASKS))}")
    module, _, cls = TASKS[cfg.name].partition(":")
    return getattr(import_module(module), cls)(cfg)
