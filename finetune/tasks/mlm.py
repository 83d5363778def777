"""Masked language modelling (BERT's objective): adapt an encoder to a domain's text before fine-tuning it.

Training batches are masked afresh by transformers' DataCollatorForLanguageModeling: task.mlm_probability of the
tokens are predicted, 80% of them replaced by the mask token, 10% by a random token, 10% left as they are;
task.whole_word_mask=true picks whole words and masks all their pieces. The validation and test rows are masked
once, at tokenization, the same way, seeded by task.eval_mask_seed and each row's tokens: every run, both engines
and the base model are scored on the same masked tokens. Metrics: masked-token accuracy and perplexity (exp of the
mean masked-token loss, token-weighted; the main metric, lower is better). The export is checked through
pipeline("fill-mask") on probes: one whole word (a single token) hidden in each test text, top-1 accuracy.
"""

from __future__ import annotations

import hashlib
import logging
import random
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from finetune import loading
from finetune.config import DataConfig, TaskConfig
from finetune.errors import FinetuneError
from finetune.metrics import masked_lm_metrics
from finetune.tasks.base import MetricsFn, Task, auto_class

if TYPE_CHECKING:
    from datasets import Dataset, DatasetDict

log = logging.getLogger(__name__)

PROBE_BATCH = 64


@dataclass
class MlmConfig(TaskConfig):
    max_seq_length: int = 128  # longer texts are truncated (one row = one sequence)
    mlm_probability: float = 0.15  # fraction of tokens to predict (80% -> [MASK], 10% random, 10% unchanged)
    whole_word_mask: bool = False  # mask all pieces of a word together (every chosen word becomes [MASK])
    eval_mask_seed: int = 0  # fixes the validation / test masks (with each text) and the fill-mask check's words


@dataclass
class MlmData(DataConfig):
    text_column: str = "text"  # .txt files: one row per line


class MlmTask(Task):
    name = "mlm"
    aliases = ("masked_lm",)
    schema, data_schema = MlmConfig, MlmData
    pipeline_task = "fill-mask"
    main_metric = "perplexity"
    greater_is_better = False
    auto_model = "AutoModelForMaskedLM"
    columns = {"text": "text_column"}
    input_columns = ("text",)
    report_base_metrics = True
    verify_metric = "fill_mask_accuracy"  # the pipeline scores single-mask probes, not the 80/10/10 test mask
    verify_tolerance = 0.01  # differently padded batches can flip a near-tie top-1 token
    pipeline_batch_size = PROBE_BATCH
    pipeline_call = {"top_k": 1, "tokenizer_kwargs": {"truncation": True}}  # the fill-mask check's top-1 token
    vocabulary_loss = True

    def __init__(self, cfg):
        super().__init__(cfg)
        self.new_weights: list[str] = []  # what load_model found missing from the checkpoint

    @classmethod
    def check_config(cls, cfg, data) -> None:
        if not 0 < cfg.mlm_probability < 1:
            raise FinetuneError(f"task.mlm_probability must be above 0 and below 1 (got {cfg.mlm_probability}): the "
                                "fraction of tokens predicted; 0.15 is BERT's")

    # --- data ---------------------------------------------------------------------------------
    def prepare(self, raw: DatasetDict, data_cfg) -> DatasetDict:
        raw = raw.filter(lambda text: text is not None and text.strip() != "", input_columns="text")  # blank lines
        for split, ds in raw.items():
            if len(ds) == 0:
                raise FinetuneError(f"the {split} data has no text (only empty lines or cells); give it text, or check "
                                    "data.text_column")
        return raw

    def tokenize(self, raw: DatasetDict, tokenizer) -> DatasetDict:
        def encode(batch: dict[str, list]) -> dict[str, Any]:
            enc = tokenizer(batch["text"], truncation=True, max_length=self.cfg.max_seq_length,
                            return_special_tokens_mask=True, return_offsets_mapping=self.cfg.whole_word_mask)
            enc["length"] = [len(ids) for ids in enc["input_ids"]]
            return enc

        features = raw.map(encode, batched=True, remove_columns=raw["train"].column_names, desc="tokenizing")
        features = features.filter(lambda special: 0 in special, input_columns="special_tokens_mask")  # no word left

        def mask_once(row: dict[str, Any]) -> dict[str, Any]:
            masked = self._mask(tokenizer, [row], _seed(self.cfg.eval_mask_seed, row["input_ids"]))
            return {"input_ids": masked["input_ids"][0].tolist(), "labels": masked["labels"][0].tolist()}

        extra = [c for c in ("special_tokens_mask", "offset_mapping") if c in features["train"].column_names]
        for split in ("validation", "test"):
            features[split] = features[split].map(mask_once, remove_columns=extra, desc=f"masking {split}")
        return features

    def collator(self, tokenizer):
        import torch

        return _Collator(self, tokenizer, torch.initial_seed())  # the run's seed (run.py seeded torch with it)

    def _mask(self, tokenizer, features: list[dict[str, Any]], seed: int) -> dict[str, Any]:
        """Rows padded and masked by transformers' collator, drawn from `seed`."""
        from transformers import DataCollatorForLanguageModeling

        wwm = self.cfg.whole_word_mask
        features = [{k: v for k, v in f.items() if k != "length"} for f in features]
        if wwm:
            features = _pad_offsets(features, tokenizer.padding_side)
        collator = DataCollatorForLanguageModeling(
            tokenizer, mlm_probability=self.cfg.mlm_probability, whole_word_mask=wwm, seed=seed,
            # transformers' whole-word masking always uses the mask token (and warns unless told so)
            **({"mask_replace_prob": 1.0, "random_replace_prob": 0.0} if wwm else {}))
        return collator(features)

    # --- model --------------------------------------------------------------------------------
    def load_tokenizer(self, path: str, model_cfg):
        tokenizer = super().load_tokenizer(path, model_cfg)
        if tokenizer.mask_token is None:
            raise FinetuneError(
                f"task=mlm needs a tokenizer with a mask token and '{model_cfg.name_or_path}' has none (a causal LM?); "
                "use a masked-LM checkpoint (BERT, RoBERTa, DeBERTa, e.g. model=minilm), or task=generation for a causal LM"
            )
        if not tokenizer.is_fast:
            raise FinetuneError(f"task=mlm needs a fast tokenizer (word offsets) and '{model_cfg.name_or_path}' has a "
                                "slow one; use a checkpoint with a tokenizer.json")
        return tokenizer

    def load_model(self, path: str, model_cfg, dtype: str = "float32"):
        model, info = loading.load_pretrained(auto_class(self.auto_model), path, model_cfg, None, dtype=dtype)  # a new MLM head is news
        self.new_weights = sorted(info["missing_keys"])
        return model

    # --- evaluation and export ----------------------------------------------------------------
    def preprocess_logits(self, logits: Any, labels: Any) -> Any:
        """Keep, where a token is masked, its top-1 id and its loss -- not vocabulary x tokens logits: from the chunked
        loss (finetune/lm_loss.py), or from the logits when the model computes its own loss."""
        import torch
        import torch.nn.functional as F

        from finetune import lm_loss

        tokens = lm_loss.token_outputs(logits, labels)
        if tokens is not None:
            nll, top1 = tokens
            return top1, nll
        logits = logits[0] if isinstance(logits, tuple) else logits
        masked = labels != -100
        nll = torch.zeros(labels.shape, dtype=torch.float32, device=logits.device)
        nll[masked] = F.cross_entropy(logits[masked].float(), labels[masked], reduction="none")
        return logits.argmax(-1), nll

    def compute_metrics(self, split: str, features: Dataset) -> MetricsFn:
        def fn(pred) -> dict[str, float]:
            top1, nll = pred.predictions
            return masked_lm_metrics(pred.label_ids, top1, nll)

        return fn

    def probes(self, tokenizer, texts: list[str]) -> tuple[list[str], list[int]]:
        """Each text with one word hidden behind the mask token, and that word's token id. The word is drawn (seeded
        by task.eval_mask_seed and the text) among the alphabetic words that are one token within max_seq_length;
        texts without such a word are left out."""
        enc = tokenizer(texts, truncation=True, max_length=self.cfg.max_seq_length, return_offsets_mapping=True)
        probes, targets = [], []
        for i, text in enumerate(texts):
            ids, offsets, words = enc["input_ids"][i], enc["offset_mapping"][i], enc.word_ids(i)
            pieces = Counter(w for w in words if w is not None)
            candidates = [j for j, w in enumerate(words) if w is not None and pieces[w] == 1
                          and ids[j] != tokenizer.unk_token_id and text[offsets[j][0]:offsets[j][1]].isalpha()]
            if candidates:
                j = random.Random(_seed(self.cfg.eval_mask_seed, ids)).choice(candidates)
                start, end = offsets[j]
                probes.append(text[:start] + tokenizer.mask_token + text[end:])
                targets.append(ids[j])
        if not probes:
            raise FinetuneError("no test text has a word to hide for the fill-mask check (an alphabetic word that is "
                                "one token); give the test split ordinary text")
        return probes, targets

    def model_metrics(self, model, tokenizer, raw: Dataset, base: bool = False) -> dict[str, float]:
        """Top-1 accuracy of the in-memory model on the fill-mask probes (what verify() checks the pipeline against)."""
        probes, targets = self.probes(tokenizer, list(raw["text"]))
        predicted = self.fill(model, tokenizer, probes)
        return {"fill_mask_accuracy": _accuracy(predicted, targets), "fill_mask_probes": len(probes)}

    @staticmethod
    def fill(model, tokenizer, probes: list[str]) -> list[int]:
        """The model's top-1 token id at the mask of each probe (one mask per probe)."""
        import torch

        device, training = next(model.parameters()).device, model.training
        model.eval()
        encoded = tokenizer(probes, truncation=True)["input_ids"]
        order = sorted(range(len(probes)), key=lambda i: len(encoded[i]))  # batches of alike lengths pad little
        predicted = [0] * len(probes)
        with torch.inference_mode():
            for i in range(0, len(order), PROBE_BATCH):
                rows = order[i:i + PROBE_BATCH]
                enc = tokenizer.pad({"input_ids": [encoded[j] for j in rows]}, return_tensors="pt").to(device)
                masked = enc["input_ids"] == tokenizer.mask_token_id
                # labels at the masks: the chunked loss (finetune/lm_loss.py) scores them alone, without full logits
                out = model(**enc, labels=enc["input_ids"].masked_fill(~masked, -100))
                top1 = out.token_top1[masked] if out.get("token_top1") is not None else out.logits[masked].argmax(-1)
                for j, token in zip(rows, top1.tolist()):
                    predicted[j] = token
        model.train(training)
        return predicted

    def verify(self, model_dir: Path, raw: Dataset) -> dict[str, float]:
        fill = self.load_pipeline(model_dir)
        probes, targets = self.probes(fill.tokenizer, list(raw["text"]))
        # a window of one probe comes back unwrapped: that probe's top-k list, not a list of them
        predicted = [(o[0] if isinstance(o, list) else o)["token"] for o in self.run_pipeline(fill, probes)]
        return {"fill_mask_accuracy": _accuracy(predicted, targets),
                "fill_mask_probes": len(probes)}

    def card_section(self) -> str:
        new = ", ".join(f"`{n}`" for n in self.new_weights) or "none"
        c = self.cfg
        how = "whole words (every piece of a chosen word replaced by the mask token)" if c.whole_word_mask else \
            "tokens, 80% replaced by the mask token, 10% by a random token, 10% unchanged"
        return f"""
## Masked language modelling

Trained to predict {c.mlm_probability:.0%} of the {how}. Validation and test rows were masked once
(seed {c.eval_mask_seed}); `perplexity` is exp of the mean loss over their masked tokens, `accuracy` the share
predicted exactly. `base_test_*` are the base checkpoint's scores on the same masked tokens.

Weights newly initialized when the base checkpoint was loaded (it has no trained masked-LM head), trained from
scratch in this run: {new}. The output layer shares the input word embeddings.
"""


class _Collator:
    """Training batches are masked here, seeded by the run's seed and the batch's tokens: new masks every epoch (the
    sampler reshuffles), and the same ones when a resumed run replays a batch (masks drawn from the global RNG would
    not be: the data loaders fetch a batch ahead of the step). Held-out batches come masked (they have labels) and
    are padded only."""

    def __init__(self, task: MlmTask, tokenizer, seed: int):
        from transformers import DataCollatorForTokenClassification

        self.task, self.tokenizer, self.seed = task, tokenizer, seed
        self.pad = DataCollatorForTokenClassification(tokenizer)  # pads labels with -100

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        if "labels" in features[0]:
            return self.pad(features)
        seed = _seed(self.seed, *(f["input_ids"] for f in features))
        for attempt in range(100):  # a batch without a masked token (a few short rows) has a NaN loss: draw again
            batch = self.task._mask(self.tokenizer, features, seed + attempt)
            if (batch["labels"] != -100).any():
                break
        return batch


def _seed(seed: int, *token_ids: list[int]) -> int:
    """A 63-bit seed from a seed and token id lists (stable across processes, unlike hash())."""
    digest = hashlib.blake2b(repr((seed, [list(ids) for ids in token_ids])).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def _pad_offsets(features: list[dict[str, Any]], side: str) -> list[dict[str, Any]]:
    # transformers' whole-word masking reads offset_mapping, but tokenizer.pad leaves it unpadded
    longest = max(len(f["input_ids"]) for f in features)
    out = []
    for f in features:
        fill = [[0, 0]] * (longest - len(f["offset_mapping"]))
        offsets = [list(o) for o in f["offset_mapping"]]
        out.append({**f, "offset_mapping": offsets + fill if side == "right" else fill + offsets})
    return out


def _accuracy(predicted: list[int], targets: list[int]) -> float:
    return float(np.mean(np.array(predicted) == np.array(targets)))
