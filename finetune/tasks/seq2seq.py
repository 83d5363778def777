"""Sequence to sequence: a model reads a source text and writes a target. The shared task of task=summarization
(finetune/tasks/summarization.py) and task=translation (finetune/tasks/translation.py).

The model family -- an encoder-decoder checkpoint, one warm-started from two encoders, or a decoder-only LM -- comes
from the model settings and the checkpoint (finetune/tasks/seq2seq_families.py); the task is the same for all three.
Data rows are a source (text, or a list of sentences, joined) and one or more references. Evaluation generates for the
whole split (length-sorted batches, KV cache, the task.generation settings) and scores the texts against all
references: BLEU + chrF (translation), ROUGE (summarization); the main metric picks the best checkpoint on validation.
The export ships finetune/pipelines/seq2seq.py as the model's translation / summarization pipeline; evaluation encodes
and generates with the same functions, and verify() re-scores the test split through the exported pipeline.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from finetune import loading
from finetune.config import DataConfig, TaskConfig
from finetune.decoding import GenerationSettings
from finetune.errors import FinetuneError, VerificationError
from finetune.metrics import generation_metrics, perplexity
from finetune.tasks.base import MetricsFn, Task, device, weights_precision
from finetune.tasks.seq2seq_families import Family, family_for

if TYPE_CHECKING:
    from datasets import Dataset, DatasetDict

log = logging.getLogger(__name__)

# texts per generation batch, in evaluation and (by default) in the exported pipeline: the weights are read once a
# decoding step whatever the batch, so larger batches generate faster (docs/benchmarks.md#generation-batch)
BATCH = 32
SAMPLES = 5
REPEATED = 0.5  # the run warns when fewer of its test outputs than this are distinct
TEXT_GENERATION_CHECKS = 4  # test prompts re-generated through pipeline("text-generation") for decoder-only models


@dataclass
class Seq2SeqConfig(TaskConfig):
    max_source_length: int = 128  # source tokens kept (the rest is cut, in training, evaluation and the pipeline)
    max_target_length: int = 128  # target tokens trained on
    prefix: Optional[str] = None  # encoder-decoder input prefix (T5 style); None: the checkpoint's own, if any
    # decoder-only models: the prompt, in which {source}, {source_lang}, {target_lang} are replaced; rendered as a
    # user turn with the tokenizer's chat template when it has one and chat_template is true
    prompt_template: str = "{source}"
    chat_template: bool = True
    generation: GenerationSettings = field(default_factory=GenerationSettings)


@dataclass
class Seq2SeqData(DataConfig):
    source_column: str = "source"  # text, or a list of sentences (joined with spaces)
    target_column: str = "target"  # text, or a list of references
    references: str = "first"  # several references per example: train on the first, or on each (metrics use all)


class Seq2SeqTask(Task):
    output_key: str  # the pipeline's output field
    scores_kinds: tuple[str, ...]  # what evaluation reports of metrics.generation_metrics (rouge, bleu)
    columns = {"source": "source_column", "target": "target_column"}
    input_columns = ("source",)
    report_base_metrics = True  # the pretrained (zero-shot) model's scores on the same test split
    pipeline_needs_remote_code = True  # transformers 5 has no translation / summarization pipeline: export() ships one
    task_params_key = "summarization"  # where a T5-style checkpoint keeps its input prefix (task_specific_params)
    max_length_key = "task.max_source_length"
    pipeline_batch_size = BATCH
    vocabulary_loss = True

    def __init__(self, cfg):
        super().__init__(cfg)
        self.family: Family | None = None  # chosen from the model when it is first loaded
        self.settings: dict[str, Any] = {}  # what the exported pipeline needs to encode a source (config.json)
        self.forced_bos: int | None = None  # a target language code generation must begin with
        self.train_on_each = False
        self.raw: DatasetDict | None = None
        self.tokenizer = None
        self._inputs: dict[str, list[list[int]]] = {}
        self._samples: list[dict[str, Any]] = []

    @classmethod
    def check_config(cls, cfg, data) -> None:
        if data.references not in ("first", "each"):
            raise FinetuneError(f"data.references must be first or each (got '{data.references}')")
        if min(cfg.max_source_length, cfg.max_target_length) < 1:
            raise FinetuneError("task.max_source_length and task.max_target_length must be >= 1")
        try:
            cfg.prompt_template.format(source="", source_lang="", target_lang="")
        except (KeyError, IndexError, ValueError) as e:
            raise FinetuneError(f"task.prompt_template={cfg.prompt_template!r} is not a template of {{source}}, "
                                f"{{source_lang}} and {{target_lang}} ({e!r}); write literal braces as {{{{ }}}}"
                                ) from e

    @property
    def max_length(self) -> int:
        return self.cfg.max_source_length

    # the family's, once the model is known (before that, an encoder-decoder's)
    @property
    def label_shift(self) -> int:
        return self.family.label_shift if self.family else 0

    @property
    def auto_model(self) -> str:
        return self.family.auto_model if self.family else Family.auto_model

    @property
    def peft_task_type(self) -> str:
        return self.family.peft_task_type if self.family else Family.peft_task_type

    @property
    def decoder_only(self) -> bool:
        return bool(self.family and self.family.decoder_only)

    # --- data ---------------------------------------------------------------------------------
    def prepare(self, raw: DatasetDict, data_cfg) -> DatasetDict:
        from datasets import DatasetDict

        self.train_on_each = data_cfg.references == "each"
        return DatasetDict({split: self._rows(ds, split, data_cfg) for split, ds in raw.items()})

    def _rows(self, ds: Dataset, split: str, data_cfg) -> Dataset:
        """Canonical rows: `source` (text) and `references` (a list of texts); the group column stays."""
        from datasets import Dataset

        rows = {"source": [], "references": []}
        for i, (source, target) in enumerate(zip(*self._columns(ds, split, data_cfg))):
            source = " ".join(s.strip() for s in source) if isinstance(source, list) else source
            references = target if isinstance(target, list) else [target]
            if not isinstance(source, str) or not source.strip():
                raise FinetuneError(f"row {i} of the {split} data has an empty source; fill it in or remove the row")
            if not references or not all(isinstance(r, str) and r.strip() for r in references):
                raise FinetuneError(f"row {i} of the {split} data has an empty target; fill it in or remove the row")
            rows["source"].append(source.strip())
            rows["references"].append([r.strip() for r in references])
        if data_cfg.group_column:
            rows[data_cfg.group_column] = list(ds[data_cfg.group_column])
        return Dataset.from_dict(rows)

    def _columns(self, ds: Dataset, split: str, data_cfg) -> tuple[list, list]:
        """The sources and targets of a split's rows."""
        if {"source", "target"} <= set(ds.column_names):
            return ds["source"][:], ds["target"][:]
        found = ", ".join(sorted(set(ds.column_names) - {data_cfg.group_column})) or "none"
        raise FinetuneError(f"the {split} data needs a source and a target column (data.source_column="
                            f"{data_cfg.source_column}, data.target_column={data_cfg.target_column}) but has {found} "
                            "(renamed); set data.source_column=... data.target_column=...")

    # --- model --------------------------------------------------------------------------------
    def _family(self, path: str, model_cfg) -> Family:
        """The model's family, made once (with the tokenizer), whichever of load_tokenizer / load_model runs first."""
        if self.family is None:
            self.family = family = family_for(self.cfg, path, model_cfg)
            self.tokenizer = family.tokenizer
            codes = self._language_codes(family.tokenizer)
            self.settings = {
                "output_key": self.output_key,
                "prefix": family.prefix(self.task_params_key),
                "prompt_template": self.cfg.prompt_template,
                "chat_template": bool(family.decoder_only and self.cfg.chat_template and family.tokenizer.chat_template),
                "max_source_length": self.cfg.max_source_length,
                "source_lang": getattr(self.cfg, "source_lang", ""),
                "target_lang": getattr(self.cfg, "target_lang", ""),
                "source_lang_code": codes[0],
                "batch_size": BATCH,
            }
        return self.family

    def load_tokenizer(self, path: str, model_cfg):
        return self._family(path, model_cfg).tokenizer

    def _language_codes(self, tokenizer) -> tuple[str | None, str | None]:
        """The tokenizer's codes of the source and target languages, for tokenizers that have them."""
        return None, None

    def load_model(self, path: str, model_cfg, dtype: str = "float32"):
        family = self._family(path, model_cfg)
        model = family.load(path, model_cfg, dtype)
        g, tokenizer = self.cfg.generation, self.tokenizer
        settings = {"max_new_tokens": g.max_new_tokens, "num_beams": g.num_beams, "do_sample": g.do_sample,
                    "repetition_penalty": g.repetition_penalty, "pad_token_id": tokenizer.pad_token_id}
        if g.do_sample:
            settings.update(temperature=g.temperature, top_p=g.top_p)
        if family.decoder_only:
            settings["eos_token_id"] = tokenizer.eos_token_id
        if self.forced_bos is not None:
            settings["forced_bos_token_id"] = self.forced_bos
        model.generation_config.update(**settings)  # evaluation uses it, and the export saves it
        limit, need = loading.position_limit(model), family.longest()
        if limit is not None and need > limit:
            raise FinetuneError(f"examples of up to {need} tokens do not fit the {limit} positions of model "
                                f"'{model_cfg.name_or_path}'; lower task.max_source_length / task.max_target_length")
        return model

    def tokenize(self, raw: DatasetDict, tokenizer) -> DatasetDict:
        self.raw, self.tokenizer, self._inputs = raw, tokenizer, {}
        return self.family.tokenize({split: self._pairs(ds, split) for split, ds in raw.items()}, self.settings)

    def _pairs(self, ds: Dataset, split: str) -> tuple[list[str], list[str]]:
        """(source, target) training pairs: each reference of a training row, or the first (data.references)."""
        each = self.train_on_each and split == "train"
        pairs = [(s, r) for s, refs in zip(ds["source"][:], ds["references"][:]) for r in (refs if each else refs[:1])]
        return [s for s, _ in pairs], [r for _, r in pairs]

    def collator(self, tokenizer):
        from transformers import DataCollatorForSeq2Seq

        return DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100)

    # --- evaluation ---------------------------------------------------------------------------
    def preprocess_logits(self, logits, labels):
        """Per example: the summed NLL of the reference tokens and their number (not vocab x tokens logits)."""
        from finetune.lm_loss import lm_sums

        return lm_sums(logits, labels, self.label_shift)

    def compute_metrics(self, split: str, features: Dataset) -> MetricsFn:
        def fn(pred) -> dict[str, float]:  # the references' perplexity under the model (teacher forcing)
            sums = pred.predictions[0] if isinstance(pred.predictions, tuple) else pred.predictions
            return {k: v for k, v in perplexity(sums).items() if k != "num_tokens"}

        return fn

    def evaluate_model(self, model, split: str) -> dict[str, float]:
        """Generate for every source of the split and score the texts against all their references."""
        from finetune.pipelines import seq2seq as s2s

        raw = self.raw[split]
        if split not in self._inputs:
            self._inputs[split] = [s2s.encode(self.tokenizer, s, self.settings, self.decoder_only)
                                   for s in raw["source"][:]]
        model.eval()
        start = time.perf_counter()
        with weights_precision(model) as own:  # after mixed-precision training too: as the exported model generates
            rows = s2s.generate(own, self.tokenizer, self._inputs[split], BATCH)
        seconds = time.perf_counter() - start
        texts = [self.tokenizer.decode(row, skip_special_tokens=True).strip() for row in rows]
        out = self.scores(texts, raw["references"][:])
        out["generation_new_tokens_per_second"] = sum(len(r) for r in rows) / max(seconds, 1e-9)
        log.info("%s: generated %d texts in %.1fs", split, len(texts), seconds)
        if split == "test" and out["distinct_outputs"] < REPEATED:
            log.warning("only %d of the %d test outputs are distinct (%.0f%%): the model writes the same text whatever "
                        "its source; train longer%s", len(set(texts)), len(texts), 100 * out["distinct_outputs"],
                        self.family.repeats_hint)
        if split == "test":
            self._samples = [{"source": s, "references": r, "generated": t}
                             for s, r, t in zip(raw["source"][:SAMPLES], raw["references"][:SAMPLES], texts)]
        return out

    def scores(self, texts: list[str], references: list[list[str]]) -> dict[str, float]:
        """The task's scores, and the fraction of distinct outputs (a model that ignores its source repeats itself)."""
        return {**generation_metrics(texts, references, scores=self.scores_kinds),
                "distinct_outputs": len(set(texts)) / max(len(texts), 1)}

    def samples(self) -> list[dict[str, Any]]:
        return self._samples

    def card_section(self) -> str:
        if not self._samples:
            return ""
        rows = "\n".join(f"| {_cell(s['source'])} | {_cell(s['generated'])} | {_cell(s['references'][0])} |"
                         for s in self._samples)
        return f"\n## Samples (test split)\n\n| source | generated | reference |\n|---|---|---|\n{rows}\n"

    def adapter_base_code(self, cfg, base: str) -> str:
        return self.family.adapter_base_code(cfg, base) or super().adapter_base_code(cfg, base)

    # --- export and verification --------------------------------------------------------------
    def export(self, model_dir: Path) -> None:
        """Ship the translation / summarization pipeline: its code beside the model, registered in config.json
        (generation_config.json, saved with the model, holds the generation settings)."""
        from transformers import AutoConfig
        from transformers.dynamic_module_utils import custom_object_save

        from finetune.pipelines import seq2seq as s2s

        custom_object_save(s2s.Seq2SeqPipeline, model_dir)
        config = AutoConfig.from_pretrained(model_dir)
        config.custom_pipelines = {self.pipeline_task: {"impl": "seq2seq.Seq2SeqPipeline",
                                                        "pt": [self.auto_model], "type": "text"}}
        config.seq2seq = self.settings
        config.save_pretrained(model_dir)

    def verify(self, model_dir: Path, raw: Dataset) -> dict[str, float]:
        pipe = self.load_pipeline(model_dir)  # the code export() wrote
        texts = [o[self.output_key] for o in pipe(raw["source"][:], batch_size=BATCH)]
        scores = self.scores(texts, raw["references"][:])
        if pipe.decoder_only:
            scores["text_generation_prompts_matched"] = float(self._check_text_generation(model_dir, pipe, raw))
        return scores

    def recorded_columns(self) -> list[str]:
        return ["source_column"]  # what finetune.predict reads

    def pipeline_inputs(self, rows: dict[str, list]) -> list:
        return [" ".join(s) if isinstance(s, list) else s for s in rows["source"]]

    def prediction_record(self, output: Any) -> dict[str, Any]:
        return output

    def run_pipeline(self, pipe, inputs, batch_size: int | None = None):
        """The pipeline on chunks of 8 batches: each chunk is generated in length-sorted batches, and no more than
        a chunk of the inputs is held."""
        size = batch_size or self.pipeline_batch_size
        inputs = iter(inputs)
        while chunk := list(islice(inputs, size * 8)):
            yield from pipe(chunk, batch_size=size)

    def _check_text_generation(self, model_dir: Path, pipe, raw: Dataset) -> int:
        """A decoder-only export also works as a plain text-generation model: on a few test prompts, the
        text-generation pipeline must write what the task pipeline writes."""
        from transformers import pipeline

        from finetune.pipelines import seq2seq as s2s

        generator = pipeline("text-generation", model=str(model_dir), device=device())
        sources = list(raw["source"][:TEXT_GENERATION_CHECKS])
        expected = [o[self.output_key] for o in pipe(sources, batch_size=1)]
        for i, source in enumerate(sources):
            p = s2s.prompt(pipe.tokenizer, source, pipe.settings)
            if isinstance(p, list):
                got = generator(p)[0]["generated_text"][-1]["content"]
            else:
                got = generator(p, return_full_text=False, add_special_tokens=True)[0]["generated_text"]
            if got.strip() != expected[i]:
                raise VerificationError(f"pipeline('text-generation') writes {got.strip()!r} for test prompt {i} but "
                                        f"the {self.pipeline_task} pipeline writes {expected[i]!r}; the export in "
                                        f"{model_dir} is inconsistent")
        log.info("verified: pipeline('text-generation') reproduces %d test outputs", len(sources))
        return len(sources)


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")[:200]
