"""Preference tuning (task=preference): a causal LM aligned with pairs of a better (chosen) and a worse (rejected)
answer to one prompt, by DPO (the default), IPO, ORPO or SimPO (task.loss; the formulas: finetune/preference_loss.py).

The data shapes (texts, chat messages, two dialogues sharing their start): finetune/tasks/preference_data.py. A pair
is scored by the log-probabilities of its answers' tokens only, through the chunked output layer of
finetune/lm_loss.py (a batch's tokens x vocabulary logits never exist), chosen and rejected in one forward pass
(task.concatenate=false: two).

The reference of dpo and ipo costs no memory, never a second model: with LoRA it is the model with its adapter
disabled, inside the loss; with full fine-tuning its log-probs are computed once, before training, in one pass over
the training pairs, and stored beside the tokenized data (datasets' cache, fingerprinted by the data and the model's
weights), so a resumed run and every trial of a sweep read them back. The held-out splits' reference log-probs are
stored the same way with either method (evaluation folds LoRA's adapter into the weights, and the check after export
reuses them: the base is the reference). orpo and simpo need none.
"""

from __future__ import annotations

import functools
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Optional

from finetune import adapters, assets
from finetune.config import DataConfig, ModelConfig, TaskConfig
from finetune.decoding import GenerationSettings
from finetune.errors import FinetuneError, VerificationError
from finetune.tasks import preference_data as pairs
from finetune.tasks import preference_scoring as scoring
from finetune.tasks.base import Task
from finetune.tasks.generation import check_greedy, decoding, greedy_answers

log = logging.getLogger(__name__)

LOSSES = ("dpo", "ipo", "orpo", "simpo")
NEEDS_REFERENCE = ("dpo", "ipo")
DEFAULT_BETA = {"dpo": 0.1, "ipo": 0.1, "simpo": 2.0}  # (SimPO's paper: 2.0-2.5; orpo weighs by task.orpo_lambda)
REFERENCE_FILE = "preference.json"  # in the export: the reference model, for finetune.evaluate on new pairs


@dataclass
class PreferenceTaskConfig(TaskConfig):
    max_seq_length: int = 512  # prompt + answer tokens; an answer is cut where it reaches this
    max_prompt_length: Optional[int] = None  # a longer prompt keeps its last tokens (the turn answered); None: whole
    loss: str = "dpo"  # dpo | ipo | orpo | simpo
    beta: Optional[float] = None  # the loss's temperature; None: its own default (dpo, ipo: 0.1; simpo: 2.0)
    label_smoothing: float = 0.0  # dpo: cDPO's share of pairs presumed flipped (noisy labels), below 0.5
    orpo_lambda: float = 0.1  # orpo: the weight of the odds-ratio term beside the chosen answer's NLL
    simpo_gamma: float = 1.0  # simpo: the target reward margin
    sft_weight: float = 0.0  # dpo, ipo, simpo: plus this x the chosen answer's NLL per token (0: none)
    concatenate: bool = True  # chosen and rejected in one forward pass (false: two; bench rows preference_two_pass)
    eval_prompts: int = 4  # test prompts answered greedily before and after training (model card, export check)
    generation: GenerationSettings = field(default_factory=lambda: GenerationSettings(max_new_tokens=48))


@dataclass
class PreferenceData(DataConfig):
    prompt_column: str = "prompt"  # none in the data: chosen and rejected are whole dialogues sharing their start
    chosen_column: str = "chosen"  # a dotted name reads a nested field (input.messages)
    rejected_column: str = "rejected"


class PreferenceTask(Task):
    name = "preference"
    schema, data_schema = PreferenceTaskConfig, PreferenceData
    pipeline_task = "text-generation"
    main_metric = "reward_accuracy"
    auto_model = "AutoModelForCausalLM"
    columns = {"prompt": "prompt_column", "chosen": "chosen_column", "rejected": "rejected_column"}
    optional_columns = frozenset({"prompt"})
    input_columns = ("prompt", "chosen", "rejected")
    peft_task_type = "CAUSAL_LM"
    report_base_metrics = True  # the base model's rewards (accuracy 0.5: it is its own reference) and chosen NLL
    truncates_like_training = False  # the exported pipeline takes prompts of any length the model allows
    pipeline_batch_size = 8
    pipeline_call = {"return_full_text": False}
    data_hint = ("; pairs: prompt/chosen/rejected texts or messages, or two dialogues (chosen/rejected) sharing their "
                 "start; python -m finetune.pairs makes pairs with a judge model")

    def __init__(self, cfg):
        super().__init__(cfg)
        self.pad_id = 0
        self.eval_batch_size = 8
        self.chunk_size = 1 << 30
        self.reference_name: str | None = None  # model.name_or_path, or what the export recorded
        self._raw: dict[str, str] = {}  # split -> its raw rows' fingerprint
        self._references: dict[str, Any] = {}  # raw fingerprint -> stored reference log-probs [pairs, 2]
        self._before: list[str] = []
        self._greedy: list[tuple[Any, list[int]]] = []
        self._samples: list[dict[str, Any]] = []

    @property
    def settings(self) -> SimpleNamespace:
        c = self.cfg
        beta = c.beta if c.beta is not None else DEFAULT_BETA.get(c.loss, 0.0)
        return SimpleNamespace(loss=c.loss, beta=beta, label_smoothing=c.label_smoothing, orpo_lambda=c.orpo_lambda,
                               simpo_gamma=c.simpo_gamma)

    @property
    def needs_reference(self) -> bool:
        return self.cfg.loss in NEEDS_REFERENCE

    @classmethod
    def check_config(cls, cfg, data) -> None:
        defaults = PreferenceTaskConfig
        if cfg.loss not in LOSSES:
            raise FinetuneError(f"unknown task.loss '{cfg.loss}': choose one of {', '.join(LOSSES)}")
        own = {"label_smoothing": ("dpo",), "orpo_lambda": ("orpo",), "simpo_gamma": ("simpo",),
               "sft_weight": ("dpo", "ipo", "simpo"), "beta": ("dpo", "ipo", "simpo")}
        for key, losses in own.items():
            if cfg[key] != getattr(defaults, key) and cfg.loss not in losses:
                raise FinetuneError(f"task.{key} does not apply to task.loss={cfg.loss} (only to "
                                    f"{', '.join(losses)}); remove it" + (" (ORPO holds the chosen answer's NLL "
                                    "already: task.orpo_lambda weighs the rest)" if key == "sft_weight" else ""))
        if cfg.beta is not None and not cfg.beta > 0:
            raise FinetuneError(f"task.beta must be above 0 (got {cfg.beta}); dpo and ipo use 0.1, simpo 2.0")
        if not 0 <= cfg.label_smoothing < 0.5:
            raise FinetuneError(f"task.label_smoothing must be at least 0 and below 0.5 (got {cfg.label_smoothing}): "
                                "the share of pairs presumed flipped")
        for key in ("orpo_lambda", "simpo_gamma", "sft_weight"):
            if cfg[key] < 0 or (key == "orpo_lambda" and cfg[key] == 0):
                raise FinetuneError(f"task.{key} must be {'above' if key == 'orpo_lambda' else 'at least'} 0 "
                                    f"(got {cfg[key]})")
        if cfg.max_seq_length < 8:
            raise FinetuneError(f"task.max_seq_length must be >= 8 (got {cfg.max_seq_length})")
        if cfg.max_prompt_length is not None and not 1 <= cfg.max_prompt_length < cfg.max_seq_length:
            raise FinetuneError(f"task.max_prompt_length must be at least 1 and below task.max_seq_length "
                                f"({cfg.max_seq_length}), or null for whole prompts (got {cfg.max_prompt_length})")
        if cfg.eval_prompts < 0:
            raise FinetuneError(f"task.eval_prompts must be at least 0 (got {cfg.eval_prompts})")

    # --- data ---------------------------------------------------------------------------------
    def prepare(self, raw, data_cfg):
        from datasets import DatasetDict

        with_prompt = "prompt" in next(iter(raw.values())).column_names
        out = {}
        for split, ds in raw.items():
            kwargs = {"with_prompt": with_prompt}
            ds = ds.map(pairs.normalize, batched=True, fn_kwargs=kwargs, remove_columns=ds.column_names,
                        new_fingerprint=pairs.fingerprint(ds, pairs.normalize, kwargs))
            out[split] = self._drop_refused(ds, split)
        return DatasetDict(out)

    def _drop_refused(self, ds, split: str):
        """The split without its refused pairs, counted: a warning with the counts, one line when none is left."""
        counts = pairs.refusals(ds[pairs.REFUSED])
        kept = ds.filter(lambda reason: not reason, input_columns=pairs.REFUSED) if counts else ds
        if counts and not len(kept):
            raise FinetuneError(f"no preference pair is left in the {split} split: of its {len(ds)} pairs, "
                                f"{pairs.describe(counts)}; check data.chosen_column / data.rejected_column"
                                + (", or raise task.max_seq_length (or cut long prompts: task.max_prompt_length)"
                                   if "truncated" in counts else ""))
        if counts:
            log.warning("%s split: %d of %d pairs dropped: %s", split, len(ds) - len(kept), len(ds),
                        pairs.describe(counts))
        return kept.remove_columns(pairs.REFUSED)

    def load_tokenizer(self, path: str, model_cfg):
        tokenizer = super().load_tokenizer(path, model_cfg)
        if tokenizer.eos_token is None:
            raise FinetuneError(f"the tokenizer of '{model_cfg.name_or_path}' has no EOS token; answers end with one: "
                                "use a causal LM checkpoint")
        if tokenizer.pad_token is None:  # the scored tokens are marked explicitly, so pad = EOS masks no real EOS
            tokenizer.pad_token = tokenizer.eos_token
        self.pad_id = tokenizer.pad_token_id
        return tokenizer

    def tokenize(self, raw, tokenizer):
        from datasets import DatasetDict

        if isinstance(next(iter(raw.values()))[0]["prompt"], list) and not tokenizer.chat_template:
            raise FinetuneError("conversational pairs (message lists) need a tokenizer with a chat template, and this "
                                "model has none; use a chat model (e.g. model=smollm2) or give the pairs as texts")
        self.pad_id = tokenizer.pad_token_id
        self._raw = {split: ds._fingerprint for split, ds in raw.items()}
        kwargs = {"tokenizer": tokenizer, "max_length": self.cfg.max_seq_length,
                  "max_prompt": self.cfg.max_prompt_length}
        return DatasetDict({split: self._drop_refused(ds.map(
            pairs.encode, batched=True, remove_columns=["prompt", "chosen", "rejected"], fn_kwargs=kwargs,
            new_fingerprint=pairs.fingerprint(ds, pairs.encode, kwargs)), split) for split, ds in raw.items()})

    def collator(self, tokenizer=None):
        pad = self.pad_id if tokenizer is None else tokenizer.pad_token_id
        return functools.partial(scoring.collate, pad=pad)

    # --- objective ----------------------------------------------------------------------------
    def prepare_training(self, model, trainer_cfg, features):
        """The chunked output layer on the model, and the reference log-probs stored beside the pairs that need them
        (every split with full fine-tuning; the held-out ones with LoRA)."""
        from datasets import DatasetDict

        from finetune import lm_loss

        self.chunk_size = trainer_cfg.lm_loss_chunk_size or 1 << 30  # 0: every answer token of a batch at once
        self.eval_batch_size = trainer_cfg.per_device_eval_batch_size
        self.chunked = lm_loss.attach(model, 1, self.chunk_size)
        if not self.needs_reference:
            return features
        lora, digest = adapters.is_adapted(model), scoring.weights_digest(model)
        features = DatasetDict({split: ds if split == "train" and lora else
                                scoring.with_reference(model, ds, split, self.scoring, digest)
                                for split, ds in features.items()})
        for split in features:
            if split != "train" and split in self._raw:  # (the check after export scores the test split again)
                self._references[self._raw[split]] = scoring.stored(features[split])
        return features

    @property
    def scoring(self) -> scoring.Scoring:
        return scoring.Scoring(self.eval_batch_size, self.pad_id, self.cfg.concatenate, self.chunked)

    def items(self, batch):
        return len(batch["input_ids"]) // 2  # pairs

    def loss(self, model, batch, num_items):
        import torch

        from finetune.preference_loss import batch_metrics, pair_losses

        logps = scoring.log_probs(model, batch, self.cfg.concatenate, self.chunked)
        reference = batch.get("reference")
        if reference is None and self.needs_reference:  # LoRA's training pairs: the base, adapter disabled
            reference = scoring.reference_log_probs(model, batch, self.scoring)
        if reference is None:
            reference = torch.zeros_like(logps)
        reference = reference.to(logps)
        tokens = (batch["targets"][:, 1:] != -100).sum(1).clamp(min=1).to(logps)
        (chosen, rejected), (ref_chosen, ref_rejected), (chosen_tokens, rejected_tokens) = (
            x.chunk(2) for x in (logps, reference, tokens))
        losses, chosen_rewards, rejected_rewards = pair_losses(self.settings, chosen, rejected, ref_chosen,
                                                               ref_rejected, chosen_tokens, rejected_tokens)
        if self.cfg.sft_weight:
            losses = losses + self.cfg.sft_weight * -chosen / chosen_tokens
        scores = torch.stack([chosen, rejected, ref_chosen, ref_rejected, chosen_tokens, rejected_tokens], 1)
        return losses.sum() / num_items, {"scores": scores.detach(), "metrics": batch_metrics(
            chosen, rejected, chosen_rewards, rejected_rewards, chosen_tokens)}

    # --- evaluation and export ----------------------------------------------------------------
    def compute_metrics(self, split, features):
        from finetune.preference_loss import split_metrics

        return lambda pred: split_metrics(self.settings, pred.predictions)

    def load_model(self, path: str, model_cfg, dtype: str = "float32"):
        self.reference_name = self.reference_name or model_cfg.name_or_path
        return super().load_model(path, model_cfg, dtype)

    def model_metrics(self, model, tokenizer, raw, base: bool = False) -> dict[str, float]:
        """Greedy answers to the first task.eval_prompts test prompts, before training (base=True) and after."""
        shown = list(raw.select(range(min(self.cfg.eval_prompts, len(raw)))))
        greedy = decoding(self.cfg.generation, tokenizer, greedy=True)
        answers = greedy_answers(model, tokenizer, [row["prompt"] for row in shown], greedy)
        if base:
            self._before = [text for _, text in answers]
            return {}
        self._greedy = [(row["prompt"], ids) for row, (ids, _) in zip(shown, answers)]
        self._samples = [{"prompt": row["prompt"], "chosen": pairs.text_of(row["chosen"]),
                          "before": before, "after": text}
                         for row, before, (_, text) in zip(shown, self._before or [None] * len(shown), answers)]
        return {}

    def samples(self) -> list[dict[str, Any]]:
        return self._samples

    def card_section(self) -> str:
        if not self._samples:
            return ""
        shown = "\n\n".join(f"**Prompt:** {_quote(s['prompt'])}\n\n**Chosen in the data:** {_quote(s['chosen'])}\n\n"
                            f"**Before training:** {_quote(s['before'])}\n\n**After:** {_quote(s['after'])}"
                            for s in self._samples[:3])
        return f"\n## Answers to held-out prompts (greedy)\n\n{shown}\n"

    def export(self, model_dir: Path) -> None:
        from transformers import AutoTokenizer

        decoding(self.cfg.generation, AutoTokenizer.from_pretrained(model_dir)).save_pretrained(model_dir)
        if self.needs_reference and self.reference_name:
            (model_dir / REFERENCE_FILE).write_text(json.dumps({"reference": self.reference_name}) + "\n")

    def from_export(self, model_dir: Path, data_cfg) -> None:
        path = Path(model_dir) / REFERENCE_FILE
        if path.is_file():
            self.reference_name = json.loads(path.read_text())["reference"]

    def verify(self, model_dir: Path, raw) -> dict[str, float]:
        """The held-out pairs scored again by the exported model (through its pipeline), against the base's stored
        log-probs (finetune.evaluate on other pairs: the recorded base, scored first); and the pipeline's greedy
        answers, which must equal the trainer's."""
        import numpy as np
        from datasets import DatasetDict

        from finetune import lm_loss
        from finetune.preference_loss import split_metrics

        features = self.tokenize(DatasetDict({"test": raw}), self._exported_tokenizer(model_dir))["test"]
        reference = np.zeros((len(features), 2))
        if self.needs_reference:
            stored = self._references.get(raw._fingerprint)
            reference = stored if stored is not None and len(stored) == len(features) else self._base(features)
        pipe = self.load_pipeline(model_dir)
        if isinstance(raw[0]["prompt"], list) and not pipe.tokenizer.chat_template:
            raise VerificationError(f"the exported tokenizer in {model_dir} lost the chat template it trained with")
        self.chunked = lm_loss.attach(pipe.model, 1, self.chunk_size)  # scored as in training
        policy = scoring.score(pipe.model, features, self.scoring)
        tokens = np.array([[len(c), len(r)] for c, r in zip(features["chosen_ids"], features["rejected_ids"])])
        scores = split_metrics(self.settings, np.column_stack([policy, reference, tokens]))
        if self._greedy:
            check_greedy(pipe, self._greedy, decoding(self.cfg.generation, pipe.tokenizer, greedy=True), model_dir)
        return {**scores, "greedy_prompts_matched": float(len(self._greedy))}

    def _exported_tokenizer(self, model_dir: Path):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(model_dir)

    def _base(self, features):
        """The reference log-probs of pairs no run stored: the recorded base model, loaded alone and freed."""
        if not self.reference_name:
            raise FinetuneError(f"scoring task.loss={self.cfg.loss} needs its reference model, which this export "
                                f"does not record ({REFERENCE_FILE}); re-export it with this release")
        log.info("scoring the pairs with the reference model %s", self.reference_name)
        model = self.load_model(assets.resolve(self.reference_name), ModelConfig(name_or_path=self.reference_name))
        from finetune import lm_loss

        self.chunked = lm_loss.attach(model, 1, self.chunk_size)
        values = scoring.score(model, features, self.scoring)
        del model
        return values

    # --- prediction ---------------------------------------------------------------------------
    def recorded_columns(self) -> list[str]:
        return ["prompt_column"]

    def pipeline_inputs(self, rows: dict[str, list]) -> list:
        return list(rows["prompt"])

    def prediction_record(self, output: Any) -> dict[str, Any]:
        return {"generated_text": output[0]["generated_text"]}


def _quote(text: Any) -> str:
    if isinstance(text, list):
        text = " / ".join(f"{m['role']}: {m['content']}" for m in text)
    return "`" + str(text).replace("`", "'").replace("\n", " ⏎ ") + "`"
