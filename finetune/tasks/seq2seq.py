"""Sequence to sequence: a model reads a source text and writes a target. task=summarization is this module's
SummarizationTask; task=translation (finetune/tasks/translation.py) adds languages to the same Seq2SeqTask.

Three model families, picked from the checkpoint, one code path each:
  encoder_decoder  any AutoModelForSeq2SeqLM checkpoint (T5, BART, Marian, mBART, ...): the source (with a T5-style
                   prefix when the checkpoint has one) goes to the encoder, the target ids are the labels
  warm_start       model.encoder + model.decoder: an EncoderDecoderModel built from two checkpoints that share a
                   vocabulary (BERT2BERT: cross-attention and the LM head are new), exported as one model
  decoder_only     a causal LM trained on prompt -> target with the loss on the target only (the prompt template,
                   as a chat user turn when the tokenizer has a chat template): causal_lm's masking, reused

Data rows are a source (text, or a list of sentences, joined) and one or more references. Evaluation generates for the
whole split (length-sorted batches, KV cache, the task.generation settings) and scores the texts against all
references: BLEU + chrF (translation), ROUGE (summarization); the main metric picks the best checkpoint on validation.
The export ships finetune/pipelines/seq2seq.py as the model's translation / summarization pipeline; evaluation encodes
and generates with the same functions, and verify() re-scores the test split through the exported pipeline.
"""

from __future__ import annotations

import logging
import time
from itertools import islice
from pathlib import Path
from typing import Any

from datasets import Dataset, DatasetDict
from transformers import (AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer,
                          DataCollatorForSeq2Seq, EncoderDecoderModel, pipeline)
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from finetune import adapters, assets, loading
from finetune.checks import generation_config
from finetune.config import CausalLMTaskConfig
from finetune.errors import FinetuneError
from finetune.export import VerificationError
from finetune.metrics import generation_metrics
from finetune.pipelines import seq2seq as s2s
from finetune.tasks.base import (MetricsFn, Task, _load, device, dropouts, load_pretrained, position_limit,
                                 weights_precision)
from finetune.tasks.causal_lm import CausalLMTask, lm_sums, perplexity

log = logging.getLogger(__name__)

BATCH = 32  # texts per generation batch, in evaluation and (by default) in the exported pipeline (a decoding
# step of 32 texts took 1.1-1.4x one of 16 on CPU: the weights are read once a step either way)
SAMPLES = 5
REPEATED = 0.5  # the run warns when fewer of its test outputs than this are distinct
TEXT_GENERATION_CHECKS = 4  # test prompts re-generated through pipeline("text-generation") for decoder-only models


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

    def __init__(self, cfg):
        super().__init__(cfg)
        if min(cfg.max_source_length, cfg.max_target_length) < 1:
            raise FinetuneError("task.max_source_length and task.max_target_length must be >= 1")
        generation_config(cfg.generation)  # task.generation.* as transformers will take them
        try:
            cfg.prompt_template.format(source="", source_lang="", target_lang="")
        except (KeyError, IndexError, ValueError) as e:
            raise FinetuneError(f"task.prompt_template={cfg.prompt_template!r} is not a template of {{source}}, "
                                f"{{source_lang}} and {{target_lang}} ({e!r}); write literal braces as {{{{ }}}}"
                                ) from e
        self.family = "encoder_decoder"
        self.auto_model, self.peft_task_type = AutoModelForSeq2SeqLM, "SEQ_2_SEQ_LM"
        self.settings: dict[str, Any] = {}  # what the exported pipeline needs to encode a source (config.json)
        self.train_on_each = False
        self.start_id: int | None = None  # the decoder start token, when the labels must not repeat it
        self.forced_bos: int | None = None  # a target language code generation must begin with
        self.lm: CausalLMTask | None = None  # decoder-only: causal_lm's prompt/completion and chat masking
        self.raw: DatasetDict | None = None
        self.tokenizer = None
        self._inputs: dict[str, list[list[int]]] = {}
        self._samples: list[dict[str, Any]] = []

    @property
    def max_length(self) -> int:
        return self.cfg.max_source_length

    @property
    def decoder_only(self) -> bool:
        return self.family == "decoder_only"

    @property
    def label_shift(self) -> int:
        return 1 if self.decoder_only else 0  # an encoder-decoder's decoder predicts label t at position t

    # --- data ---------------------------------------------------------------------------------
    def prepare(self, raw: DatasetDict, data_cfg) -> DatasetDict:
        if data_cfg.references not in ("first", "each"):
            raise FinetuneError(f"data.references must be first or each (got '{data_cfg.references}')")
        self.train_on_each = data_cfg.references == "each"
        return DatasetDict({split: self._rows(ds, split, data_cfg) for split, ds in raw.items()})

    def _rows(self, ds: Dataset, split: str, data_cfg) -> Dataset:
        """Canonical rows: `source` (text) and `references` (a list of texts); the group column stays."""
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
    def load_tokenizer(self, path: str, model_cfg):
        warm = model_cfg.encoder or model_cfg.decoder
        if warm:
            if not (model_cfg.encoder and model_cfg.decoder):
                raise FinetuneError("a warm-started encoder-decoder needs both model.encoder=<checkpoint> and "
                                    "model.decoder=<checkpoint> (e.g. model=bert2bert)")
            path = assets.resolve(model_cfg.encoder)
        config = _load(AutoConfig, path, model_cfg)
        self.tokenizer = tokenizer = _load(AutoTokenizer, path, model_cfg)
        self.start_id = getattr(config, "decoder_start_token_id", None)
        if warm:
            self.family = "warm_start"
            decoder = _load(AutoTokenizer, assets.resolve(model_cfg.decoder), model_cfg)
            if decoder.get_vocab() != tokenizer.get_vocab():
                raise FinetuneError(f"model.encoder ({model_cfg.encoder}) and model.decoder ({model_cfg.decoder}) have "
                                    "different vocabularies; a warm-started encoder-decoder here needs one tokenizer "
                                    "for both: pick two checkpoints of the same family")
            # BERT-style decoders start from [CLS] and end with [SEP]; GPT/RoBERTa-style ones have BOS and EOS
            self.start_id = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.cls_token_id
        elif not config.is_encoder_decoder:
            if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
                raise FinetuneError(
                    f"'{model_cfg.name_or_path}' ({config.model_type}) is neither a sequence-to-sequence model (T5, "
                    "BART, Marian, mBART, ...) nor a causal LM; warm-start an encoder-decoder from an encoder "
                    f"checkpoint instead: model=bert2bert model.encoder=<it> model.decoder=<it>")
            self.family, self.auto_model, self.peft_task_type = "decoder_only", AutoModelForCausalLM, "CAUSAL_LM"
        log.info("sequence-to-sequence model family: %s", self.family)
        if self.decoder_only:
            if tokenizer.eos_token is None:
                raise FinetuneError(f"the tokenizer of '{model_cfg.name_or_path}' has no EOS token; a decoder-only "
                                    "model needs one to stop generating")
            if tokenizer.pad_token is None:  # labels are built explicitly, so pad = EOS masks no real EOS
                tokenizer.pad_token = tokenizer.eos_token
            self.lm = CausalLMTask(CausalLMTaskConfig(name="causal_lm", generation=self.cfg.generation))
        else:
            tokenizer.model_max_length = self.cfg.max_source_length  # the exported tokenizer truncates like training
            if tokenizer.pad_token is None:
                raise FinetuneError(f"the tokenizer of '{model_cfg.name_or_path}' has no padding token; an "
                                    "encoder-decoder needs one")
        codes = self._language_codes(tokenizer)
        self.settings = {
            "output_key": self.output_key,
            "prefix": "" if self.decoder_only else self._prefix(config),
            "prompt_template": self.cfg.prompt_template,
            "chat_template": bool(self.decoder_only and self.cfg.chat_template and tokenizer.chat_template),
            "max_source_length": self.cfg.max_source_length,
            "source_lang": getattr(self.cfg, "source_lang", ""),
            "target_lang": getattr(self.cfg, "target_lang", ""),
            "source_lang_code": codes[0],
            "batch_size": BATCH,
        }
        return tokenizer

    def _prefix(self, config) -> str:
        """task.prefix, or the checkpoint's own for this task (T5's task_specific_params), or none."""
        if self.cfg.prefix is not None:
            return self.cfg.prefix
        own = (getattr(config, "task_specific_params", None) or {}).get(self.task_params_key, {}).get("prefix", "")
        if own:
            log.info("input prefix from the checkpoint: %r", own)
        return own

    def _language_codes(self, tokenizer) -> tuple[str | None, str | None]:
        """The tokenizer's codes of the source and target languages, for tokenizers that have them."""
        return None, None

    def load_model(self, path: str, model_cfg, dtype: str = "float32"):
        tokenizer = self.tokenizer
        if self.family == "warm_start":
            sides = {"encoder": assets.resolve(model_cfg.encoder), "decoder": assets.resolve(model_cfg.decoder)}
            dropout = {f"{side}_{k}": v for side, p in sides.items()  # both halves' config keys, prefixed
                       for k, v in dropouts(p, model_cfg).items()}
            try:
                with loading.quiet_load_report():  # (the line below says what is new)
                    model = EncoderDecoderModel.from_encoder_decoder_pretrained(
                        sides["encoder"], sides["decoder"], encoder_dtype=dtype, decoder_dtype=dtype, **dropout)
            except (OSError, ValueError, KeyError) as e:
                raise FinetuneError(f"cannot warm-start an encoder-decoder from model.encoder={model_cfg.encoder} and "
                                    f"model.decoder={model_cfg.decoder} ({str(e).strip().splitlines()[0]}); use "
                                    "encoder-style checkpoints (BERT, RoBERTa, ...)") from e
            eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
            ids = {"decoder_start_token_id": self.start_id, "bos_token_id": self.start_id, "eos_token_id": eos,
                   "pad_token_id": tokenizer.pad_token_id}
            for key, value in ids.items():  # forward() reads the config, generate() the generation config
                setattr(model.config, key, value)
            model.generation_config.update(**ids)
            log.info("warm-started encoder-decoder; newly initialized: %s",
                     ", ".join(adapters.trainable_modules(model)))
        else:
            model, _ = load_pretrained(self.auto_model, path, model_cfg, None, dtype=dtype)
        g = self.cfg.generation
        settings = {"max_new_tokens": g.max_new_tokens, "num_beams": g.num_beams, "do_sample": g.do_sample,
                    "repetition_penalty": g.repetition_penalty, "pad_token_id": tokenizer.pad_token_id}
        if g.do_sample:
            settings.update(temperature=g.temperature, top_p=g.top_p)
        if self.decoder_only:
            settings["eos_token_id"] = tokenizer.eos_token_id
        if self.forced_bos is not None:
            settings["forced_bos_token_id"] = self.forced_bos
        model.generation_config.update(**settings)  # evaluation uses it, and the export saves it
        limit = position_limit(model)
        need = self.lm.cfg.block_size if self.decoder_only else max(self.cfg.max_source_length,
                                                                     self.cfg.max_target_length)
        if limit is not None and need > limit:
            raise FinetuneError(f"examples of up to {need} tokens do not fit the {limit} positions of model "
                                f"'{model_cfg.name_or_path}'; lower task.max_source_length / task.max_target_length")
        return model

    def tokenize(self, raw: DatasetDict, tokenizer) -> DatasetDict:
        self.raw, self.tokenizer, self._inputs = raw, tokenizer, {}
        if self.decoder_only:
            return self._encode_prompts(raw, tokenizer)
        return DatasetDict({split: self._encode_pairs(ds, tokenizer, split) for split, ds in raw.items()})

    def _pairs(self, ds: Dataset, split: str) -> tuple[list[str], list[str]]:
        """(source, target) training pairs: each reference of a training row, or the first (data.references)."""
        each = self.train_on_each and split == "train"
        pairs = [(s, r) for s, refs in zip(ds["source"][:], ds["references"][:]) for r in (refs if each else refs[:1])]
        return [s for s, _ in pairs], [r for _, r in pairs]

    def _encode_pairs(self, ds: Dataset, tokenizer, split: str) -> Dataset:
        sources, targets = self._pairs(ds, split)
        ids = [s2s.encode(tokenizer, s, self.settings, False) for s in sources]
        labels = tokenizer(text_target=targets, truncation=True, max_length=self.cfg.max_target_length)["input_ids"]
        # a decoder starts from decoder_start_token_id itself: labels beginning with it (BERT's [CLS]) would repeat it
        labels = [row[1:] if row and row[0] == self.start_id else row for row in labels]
        return Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * len(x) for x in ids], "labels": labels,
                                  "length": [len(x) + len(y) for x, y in zip(ids, labels)]})

    def _encode_prompts(self, raw: DatasetDict, tokenizer) -> DatasetDict:
        """causal_lm's prompt/completion (or chat) encoding: loss on the target and its end-of-sequence token only."""
        rows, longest = {}, 0
        for split, ds in raw.items():
            sources, targets = self._pairs(ds, split)
            prompts = [s2s.prompt(tokenizer, s, self.settings) for s in sources]
            targets = [s2s.cut(tokenizer, t, self.cfg.max_target_length) for t in targets]
            if self.settings["chat_template"]:
                rows[split] = Dataset.from_dict({"messages": [[*p, {"role": "assistant", "content": t}]
                                                              for p, t in zip(prompts, targets)]})
            else:
                rows[split] = Dataset.from_dict({"prompt": prompts, "completion": targets})
            longest = max(longest, max(len(s2s.encode(tokenizer, s, self.settings, True)) for s in sources))
        self.lm.format = "messages" if self.settings["chat_template"] else "prompt_completion"
        # no example is cut: the longest prompt, the longest target and room for the chat template's end-of-turn markup
        self.lm.cfg.block_size = longest + self.cfg.max_target_length + 64
        return self.lm.tokenize(DatasetDict(rows), tokenizer)

    def collator(self, tokenizer):
        return DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100)

    # --- evaluation ---------------------------------------------------------------------------
    def preprocess_logits(self, logits, labels):
        """Per example: the summed NLL of the reference tokens and their number (not vocab x tokens logits)."""
        return lm_sums(logits, labels, self.label_shift)

    def compute_metrics(self, split: str, features: Dataset) -> MetricsFn:
        def fn(pred) -> dict[str, float]:  # the references' perplexity under the model (teacher forcing)
            sums = pred.predictions[0] if isinstance(pred.predictions, tuple) else pred.predictions
            return {k: v for k, v in perplexity(sums).items() if k != "num_tokens"}

        return fn

    def evaluate_model(self, model, split: str) -> dict[str, float]:
        """Generate for every source of the split and score the texts against all their references."""
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
                        ", or raise trainer.new_parameters_lr_scale (its new cross-attention reads the source)"
                        if self.family == "warm_start" else "")
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
        if self.family != "warm_start":
            return super().adapter_base_code(cfg, base)
        enc, dec = (base if assets.is_bundled(x) and cfg.model.base_model else x for x in (cfg.model.encoder,
                                                                                           cfg.model.decoder))
        return f"""from transformers import AutoConfig, EncoderDecoderModel, GenerationConfig
base = EncoderDecoderModel.from_encoder_decoder_pretrained("{enc}", "{dec}")
config = AutoConfig.from_pretrained("path/to/this/directory")  # the decoder's start, end and padding tokens
base.config.update({{k: getattr(config, k) for k in ("decoder_start_token_id", "eos_token_id", "pad_token_id")}})
base.generation_config = GenerationConfig.from_pretrained("path/to/this/directory")"""

    # --- export and verification --------------------------------------------------------------
    def export(self, model_dir: Path) -> None:
        """Ship the translation / summarization pipeline: its code beside the model, registered in config.json
        (generation_config.json, saved with the model, holds the generation settings)."""
        from transformers.dynamic_module_utils import custom_object_save

        custom_object_save(s2s.Seq2SeqPipeline, model_dir)
        config = AutoConfig.from_pretrained(model_dir)
        config.custom_pipelines = {self.pipeline_task: {"impl": "seq2seq.Seq2SeqPipeline",
                                                        "pt": [self.auto_model.__name__], "type": "text"}}
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


class SummarizationTask(Seq2SeqTask):
    pipeline_task = "summarization"
    output_key = "summary_text"
    main_metric = "rougeL"
    scores_kinds = ("rouge",)  # ROUGE-1/2/L/Lsum
    verify_tolerance = 0.005  # ROUGE-L (0..1): half a point


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")[:200]
