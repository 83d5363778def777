"""Summarization (task=summarization): a model reads a document and writes its summary; the sequence-to-sequence task
of finetune/tasks/seq2seq.py scored with ROUGE-1/2/L/Lsum (stemmed; ROUGE-L the main metric) against the best of the
references."""

from __future__ import annotations

from finetune.tasks.seq2seq import Seq2SeqConfig, Seq2SeqData, Seq2SeqTask


class SummarizationTask(Seq2SeqTask):
    name = "summarization"
    schema, data_schema = Seq2SeqConfig, Seq2SeqData
    pipeline_task = "summarization"
    output_key = "summary_text"
    main_metric = "rougeL"
    scores_kinds = ("rouge",)  # ROUGE-1/2/L/Lsum
    verify_tolerance = 0.005  # ROUGE-L (0..1): half a point
