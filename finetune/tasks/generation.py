"""Causal language modelling (task=generation): continued pre-training on running text, prompt/completion
instruction tuning and chat fine-tuning of a decoder-only model; perplexity (main metric), scores of
generated text, and a check of the exported directory through the text-generation pipeline.

Data shapes (data.format=auto picks one from the columns present):
  text               rows of running text (a .txt file: one row per line), joined per split and cut into
                     task.block_size blocks; held-out splits are the end of the text, contiguous
  prompt_completion  the loss is on the completion and the EOS token after it; the prompt gets label -100
  messages           a chat (list of {role, content}) rendered with the tokenizer's chat template; the loss is on
                     the assistant turns, each up to and including its end-of-turn token
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from finetune.config import DataConfig, TaskConfig, TrainerConfig
from finetune.decoding import GenerationSettings, generation_config
from finetune.errors import FinetuneError, VerificationError
from finetune.metrics import generation_metrics, perplexity
from finetune.tasks.base import MetricsFn, Task

if TYPE_CHECKING:
    from datasets import Dataset, DatasetDict
    from transformers import GenerationConfig

log = logging.getLogger(__name__)

FORMATS = {"text": ("text",), "prompt_completion": ("prompt", "completion"), "messages": ("messages",)}
PROMPT_TOKENS = 32  # plain text: the start of each test block is the prompt of a sample continuation


@dataclass
class GenerationTaskConfig(TaskConfig):
    block_size: int = 512  # plain text is cut into blocks of this many tokens; the longest example otherwise
    eval_prompts: int = 32  # test prompts generated from (scored, and checked through the exported pipeline)
    generation: GenerationSettings = field(default_factory=GenerationSettings)


@dataclass
class GenerationData(DataConfig):
    format: str = "auto"  # auto | text | prompt_completion | messages (auto: from the columns present)
    text_column: str = "text"  # plain text: continued pre-training on packed blocks
    prompt_column: str = "prompt"  # prompt / completion: the loss is on the completion only
    completion_column: str = "completion"
    messages_column: str = "messages"  # chat: a list of {role, content}; the loss is on the assistant turns only


class GenerationTask(Task):
    name = "generation"
    aliases = ("causal_lm",)
    schema, data_schema = GenerationTaskConfig, GenerationData
    pipeline_task = "text-generation"
    main_metric = "perplexity"
    greater_is_better = False
    auto_model = "AutoModelForCausalLM"
    columns = {"text": "text_column", "prompt": "prompt_column", "completion": "completion_column",
               "messages": "messages_column"}
    optional_columns = frozenset(columns)
    input_columns = ("text", "prompt", "completion", "messages")
    peft_task_type = "CAUSAL_LM"
    report_base_metrics = True
    pipeline_batch_size = 8
    pipeline_call = {"return_full_text": False}
    verify_relative_tolerance = 0.005  # perplexity recomputed from the exported directory: within 0.5%
    vocabulary_loss = True
    label_shift = 1

    def __init__(self, cfg):
        super().__init__(cfg)
        self.format = "text"
        self.split_in_order = False
        self._samples: list[dict[str, Any]] = []
        self._greedy: list[tuple[Any, list[int]]] = []  # (prompt, trainer-side greedy token ids) for verify

    @classmethod
    def check_config(cls, cfg, data) -> None:
        if cfg.block_size < 8:
            raise FinetuneError(f"task.block_size must be >= 8 (got {cfg.block_size})")
        if cfg.eval_prompts < 0:
            raise FinetuneError(f"task.eval_prompts must be at least 0 (got {cfg.eval_prompts})")
        if data.format != "auto" and data.format not in FORMATS:
            raise FinetuneError(f"unknown data.format '{data.format}': choose auto, {', '.join(FORMATS)}")

    max_length_key = "task.block_size"
    truncates_like_training = False  # task.block_size is how text is cut for training, not a limit of the model

    @property
    def max_length(self) -> int:
        return self.cfg.block_size

    # --- data ---------------------------------------------------------------------------------
    def prepare(self, raw: DatasetDict, data_cfg) -> DatasetDict:
        from datasets import DatasetDict

        present = set(raw["train"].column_names)
        fmt = data_cfg.format
        if fmt == "auto":
            fmt = "messages" if "messages" in present else "prompt_completion" if "prompt" in present else "text"
        for column in FORMATS[fmt]:
            if column not in present:
                key = f"data.{self.columns[column]}"
                raise FinetuneError(f"the {fmt} format needs a {column} column ({key}={getattr(data_cfg, self.columns[column])}) "
                                    f"but the train data has {', '.join(sorted(present)) or 'none'} (renamed); "
                                    f"set {key}=<your column> or data.format=<another format>")
        self.format, self.split_in_order = fmt, fmt == "text"
        raw = DatasetDict({s: d.select_columns(list(FORMATS[fmt])) for s, d in raw.items()})
        if fmt != "text":
            raw = raw.filter(lambda row: all(row[c] for c in FORMATS[fmt]))  # rows with a missing or empty field
        elif not any(t and t.strip() for t in raw["train"]["text"]):
            raise FinetuneError("the training text is empty; give data= a file with text in it")
        log.info("generation data format: %s", fmt)
        return raw

    def load_tokenizer(self, path: str, model_cfg):
        tokenizer = super().load_tokenizer(path, model_cfg)
        if tokenizer.eos_token is None:
            raise FinetuneError(f"the tokenizer of '{model_cfg.name_or_path}' has no EOS token; a generative model "
                                "needs one to stop: use a causal LM checkpoint")
        if tokenizer.pad_token is None:  # labels are built explicitly, so pad = EOS masks no real EOS
            tokenizer.pad_token = tokenizer.eos_token
        return tokenizer

    def tokenize(self, raw: DatasetDict, tokenizer) -> DatasetDict:
        from datasets import DatasetDict

        if self.format == "messages" and not tokenizer.chat_template:
            raise FinetuneError("chat data (a messages column) needs a tokenizer with a chat template, and this model "
                                "has none; use a chat model (e.g. model=smollm2) or data.format=prompt_completion")
        encode = {"text": self._encode_text, "prompt_completion": self._encode_pair, "messages": self._encode_chat}
        return DatasetDict({s: encode[self.format](d, tokenizer, s) for s, d in raw.items()})

    def _encode_text(self, ds: Dataset, tokenizer, split: str) -> Dataset:
        ids = tokenizer("\n".join(ds["text"]), add_special_tokens=False, verbose=False)["input_ids"]
        size = self.cfg.block_size
        blocks = [ids[i : i + size] for i in range(0, len(ids), size)]
        blocks = [b for b in blocks if len(b) > 1]  # a one-token tail has nothing to predict
        return _features(blocks, [list(b) for b in blocks])

    def _encode_pair(self, ds: Dataset, tokenizer, split: str) -> Dataset:
        ids, labels = [], []
        for row, (prompt, completion) in enumerate(zip(ds["prompt"], ds["completion"])):
            p = self._prompt_ids(tokenizer, prompt, split, row)
            c = tokenizer(completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
            c = c[: self.cfg.block_size - len(p)]
            ids.append(p + c)
            labels.append([-100] * len(p) + c)
        return _features(ids, labels)

    def _encode_chat(self, ds: Dataset, tokenizer, split: str) -> Dataset:
        ids, labels = [], []
        for row, messages in enumerate(ds["messages"]):
            full = render(tokenizer, messages)
            mask = [-100] * len(full)
            turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
            if not turns:
                raise FinetuneError(f"conversation {row} of the {split} split has no assistant turn to learn from")
            self._prompt_ids(tokenizer, messages[: turns[-1]], split, row)
            for i in turns:
                # chat templates rarely mark assistant tokens ({% generation %}), so each turn's span is found by
                # rendering the conversation up to it: the prompt with the assistant header, then with the turn
                start = len(render(tokenizer, messages[:i], prompt=True))
                end = len(render(tokenizer, messages[: i + 1]))
                if full[:end] != render(tokenizer, messages[: i + 1]):
                    raise FinetuneError("the chat template renders a conversation differently from its prefixes; "
                                        "assistant turns cannot be located: use data.format=prompt_completion")
                turn = full[start:end]
                if tokenizer.eos_token_id in turn:  # up to and including the end-of-turn token
                    end = start + turn.index(tokenizer.eos_token_id) + 1
                mask[start:end] = full[start:end]
            ids.append(full[: self.cfg.block_size])
            labels.append(mask[: self.cfg.block_size])
        return _features(ids, labels)

    def _prompt_ids(self, tokenizer, prompt: Any, split: str, row: int) -> list[int]:
        p = render(tokenizer, prompt, prompt=True) if isinstance(prompt, list) else tokenizer(prompt)["input_ids"]
        if len(p) >= self.cfg.block_size:
            raise FinetuneError(f"the prompt of row {row} in the {split} split has {len(p)} tokens, not below "
                                f"task.block_size={self.cfg.block_size}; raise task.block_size or shorten the prompt")
        return p

    def collator(self, tokenizer):
        from transformers import DataCollatorForSeq2Seq

        return DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100)

    # --- evaluation ---------------------------------------------------------------------------
    def preprocess_logits(self, logits, labels):
        """Per example: the summed next-token NLL and the number of predicted tokens (not vocab x tokens logits)."""
        from finetune.lm_loss import lm_sums

        return lm_sums(logits, labels, self.label_shift)

    def compute_metrics(self, split: str, features: Dataset) -> MetricsFn:
        def fn(pred) -> dict[str, float]:
            sums = np.asarray(pred.predictions[0] if isinstance(pred.predictions, tuple) else pred.predictions)
            return perplexity(sums)

        return fn

    def model_metrics(self, model, tokenizer, raw: Dataset, base: bool = False) -> dict[str, float]:
        """Generate on the test prompts: scores against the references (prompt/completion, chat), sample
        continuations, and the trainer-side greedy outputs the exported pipeline must reproduce."""
        prompts, references = self._prompts(raw, tokenizer)
        model.eval()
        start = time.perf_counter()
        texts, new_tokens = generate(model, tokenizer, prompts, self.generation_config(tokenizer), batch_size=8)
        seconds = time.perf_counter() - start
        out = generation_metrics(texts, references) if references else {}
        out["generation_new_tokens_per_second"] = new_tokens / seconds
        log.info("generated %d new tokens for %d test prompts in %.1fs", new_tokens, len(prompts), seconds)
        if base:  # the samples and the outputs the export must reproduce are the trained model's
            return out
        self._greedy, self._samples = [], []
        shown = prompts[: self.cfg.eval_prompts]
        for i, (prompt, (full, text)) in enumerate(zip(shown, greedy_answers(model, tokenizer, shown,
                                                                              self.generation_config(tokenizer, True)))):
            self._greedy.append((prompt, full))
            sample = {"prompt": prompt, "generated": text}
            if references:
                sample["reference"] = references[i]
            self._samples.append(sample)
        return out

    def _prompts(self, raw: Dataset, tokenizer) -> tuple[list[Any], list[str]]:
        if self.format == "prompt_completion":
            return list(raw["prompt"]), list(raw["completion"])
        if self.format == "messages":
            last = [max(i for i, m in enumerate(ms) if m["role"] == "assistant") for ms in raw["messages"]]
            return [ms[:i] for ms, i in zip(raw["messages"], last)], [ms[i]["content"] for ms, i in zip(raw["messages"], last)]
        blocks = self._encode_text(raw, tokenizer, "test")["input_ids"]
        return [tokenizer.decode(b[:PROMPT_TOKENS]) for b in blocks[: self.cfg.eval_prompts]], []

    def generation_config(self, tokenizer, greedy: bool = False) -> GenerationConfig:
        return decoding(self.cfg.generation, tokenizer, greedy)

    def samples(self) -> list[dict[str, Any]]:
        return self._samples

    def card_section(self) -> str:
        if not self._samples:
            return ""
        shown = "\n\n".join(f"**Prompt:** {_quote(s['prompt'])}\n\n**Generated (greedy):** {_quote(s['generated'])}"
                            for s in self._samples[:3])
        return f"\n## Samples\n\n{shown}\n"

    # --- export, prediction and verification --------------------------------------------------
    def recorded_columns(self) -> list[str]:
        """What predict reads: the prompt of the training's format (running text: a text to continue)."""
        return [self.columns[{"prompt_completion": "prompt"}.get(self.format, self.format)]]

    def pipeline_inputs(self, rows: dict[str, list]) -> list:
        return next(iter(rows.values()))

    def prediction_record(self, output: Any) -> dict[str, Any]:
        return {"generated_text": output[0]["generated_text"]}

    def export(self, model_dir: Path) -> None:
        from transformers import AutoTokenizer

        self.generation_config(AutoTokenizer.from_pretrained(model_dir)).save_pretrained(model_dir)

    def verify(self, model_dir: Path, raw: Dataset) -> dict[str, float]:
        import torch
        from datasets import DatasetDict

        from finetune import lm_loss

        pipe = self.load_pipeline(model_dir)
        side, pipe.tokenizer.padding_side = pipe.tokenizer.padding_side, "right"  # as in training (the pipeline: left)
        features = self.tokenize(DatasetDict({"test": raw}), pipe.tokenizer)["test"]
        rows = features.select_columns(["input_ids", "attention_mask", "labels"])
        sums, collate = [], self.collator(pipe.tokenizer)
        lm_loss.attach(pipe.model, self.label_shift, TrainerConfig.lm_loss_chunk_size)  # scored as in training
        pipe.model.eval()
        for i in range(0, len(rows), 8):
            batch = collate([rows[j] for j in range(i, min(i + 8, len(rows)))])
            batch = {k: v.to(pipe.model.device) for k, v in batch.items()}
            with torch.inference_mode():
                out = pipe.model(**batch)
            kept = tuple(v for k, v in out.items() if k != "loss")  # what the engines pass preprocess_logits
            sums.append(self.preprocess_logits(kept, batch["labels"]).cpu().numpy())
        scores = perplexity(np.concatenate(sums))
        pipe.tokenizer.padding_side = side
        check_greedy(pipe, self._greedy, self.generation_config(pipe.tokenizer, greedy=True), model_dir)
        return {**scores, "greedy_prompts_matched": float(len(self._greedy))}


def generate(model, tokenizer, prompts: list[Any], config: GenerationConfig, batch_size: int) -> tuple[list[str], int]:
    """Batched generation (length-sorted, left-padded batches with the KV cache: the code the seq2seq export ships);
    texts in the prompts' order, and the number of new tokens."""
    from finetune.pipelines.seq2seq import generate as batched_generate

    encoded = [prompt_tensor(tokenizer, p)["input_ids"][0].tolist() for p in prompts]
    rows = batched_generate(model, tokenizer, encoded, batch_size, generation_config=config)
    return [tokenizer.decode(row, skip_special_tokens=True).strip() for row in rows], sum(len(row) for row in rows)


def render(tokenizer, messages: list[dict], prompt: bool = False) -> list[int]:
    """A conversation's token ids as the chat template renders it (prompt: with the assistant's generation prompt)."""
    return list(tokenizer.apply_chat_template(list(messages), tokenize=True, add_generation_prompt=prompt,
                                              return_dict=False))


def prompt_tensor(tokenizer, prompt: Any) -> dict[str, Any]:
    """A prompt (a text, or chat messages) tokenized exactly as the text-generation pipeline tokenizes it."""
    if isinstance(prompt, list):
        return tokenizer.apply_chat_template(prompt, add_generation_prompt=True, return_dict=True, return_tensors="pt")
    return tokenizer(prompt, return_tensors="pt")


def decoding(settings: GenerationSettings, tokenizer, greedy: bool = False) -> GenerationConfig:
    """The GenerationConfig of task.generation.* with the tokenizer's ids (validated); greedy: the same length and
    repetition penalty, decoded greedily (what the exported pipeline must reproduce token for token)."""
    from transformers import GenerationConfig

    ids = {"eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id,
           "bos_token_id": tokenizer.bos_token_id, "use_cache": True}
    if greedy:
        return GenerationConfig(max_new_tokens=settings.max_new_tokens, repetition_penalty=settings.repetition_penalty,
                                do_sample=False, num_beams=1, **ids)
    return generation_config(settings, **ids)


def greedy_answers(model, tokenizer, prompts: list[Any], greedy: GenerationConfig) -> list[tuple[list[int], str]]:
    """Each prompt's greedy output, one prompt at a time as the pipeline runs it: (prompt + new token ids, new text)."""
    import torch

    model.eval()
    out = []
    for prompt in prompts:
        ids = prompt_tensor(tokenizer, prompt)
        with torch.inference_mode():
            full = model.generate(**ids.to(model.device), generation_config=greedy)[0].tolist()
        out.append((full, tokenizer.decode(full[ids["input_ids"].shape[1]:], skip_special_tokens=True)))
    return out


def check_greedy(pipe, expected: list[tuple[Any, list[int]]], greedy: GenerationConfig, model_dir: Path) -> None:
    """The exported pipeline's greedy output equals the trainer-side one (prompt, ids) for every prompt."""
    settings = greedy.to_dict()
    kwargs = {k: settings[k] for k in ("do_sample", "num_beams", "max_new_tokens", "repetition_penalty")}
    differ = [i for i, (prompt, ids) in enumerate(expected)
              if pipe(prompt, return_tensors=True, **kwargs)[0]["generated_token_ids"] != ids]
    if differ:
        raise VerificationError(f"the exported text-generation pipeline's greedy output differs from the trainer's "
                                f"on {len(differ)} of {len(expected)} test prompts (first: {differ[0]}); the "
                                f"exported model in {model_dir} does not reproduce training")
    log.info("verified: pipeline greedy output equals the trainer's on %d test prompts", len(expected))


def _features(ids: list[list[int]], labels: list[list[int]]) -> Dataset:
    from datasets import Dataset

    return Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * len(x) for x in ids], "labels": labels,
                              "length": [len(x) for x in ids]})


def _quote(text: str) -> str:
    return "`" + str(text).replace("`", "'").replace("\n", " ⏎ ") + "`"
