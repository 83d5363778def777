"""Translation and summarization pipeline, shipped inside exported model directories.

transformers 5 removed its `translation`, `summarization` and `text2text-generation` pipelines. finetune copies this
file into the exported directory and registers it in config.json `custom_pipelines`, so that

    translator = transformers.pipeline(model="path/to/model", trust_remote_code=True)
    translator("A man rides a horse.")                  # [{"translation_text": "Ein Mann reitet ein Pferd."}]
    translator(["...", "..."], batch_size=16, num_beams=4)   # one dict per text, in order

works without finetune installed (summarization models answer {"summary_text": ...}). An encoder-decoder model (T5,
BART, Marian, mBART, EncoderDecoderModel) reads the source with its T5-style prefix, if any; a decoder-only model reads
the prompt template, as a user turn of its chat template when it has one, and only its continuation is returned. The
source is cut at max_source_length tokens. Generation defaults come from generation_config.json; keyword arguments of
a call override them. Texts are generated in batches of similar length (KV cache; decoder-only prompts left-padded).
The finetune translation / summarization tasks encode and generate with these same functions during evaluation.
Self-contained on purpose: imports only torch and transformers.
"""

from __future__ import annotations

import torch
from transformers import Pipeline

# Settings when config.json has no "seq2seq" entry
DEFAULTS = {
    "output_key": "translation_text",
    "prefix": "",
    "prompt_template": "{source}",
    "chat_template": False,
    "max_source_length": 512,
    "source_lang": "",
    "target_lang": "",
    "source_lang_code": None,
    "batch_size": 16,
}


def cut(tokenizer, text, max_tokens):
    """The text up to the end of its max_tokens-th token (a fast tokenizer's offsets: the cut text re-tokenizes to
    the same tokens)."""
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    if len(encoding["input_ids"]) <= max_tokens:
        return text
    return text[: encoding["offset_mapping"][max_tokens - 1][1]]


def prompt(tokenizer, text, settings):
    """A decoder-only model's prompt for one source text: a string, or chat messages (a user turn)."""
    source = cut(tokenizer, text, settings["max_source_length"])
    filled = settings["prompt_template"].format(source=source, source_lang=settings["source_lang"],
                                                target_lang=settings["target_lang"])
    return [{"role": "user", "content": filled}] if settings["chat_template"] else filled


def encode(tokenizer, text, settings, decoder_only):
    """The model's input ids for one source text."""
    if decoder_only:
        p = prompt(tokenizer, text, settings)
        if isinstance(p, list):
            return list(tokenizer.apply_chat_template(p, tokenize=True, add_generation_prompt=True, return_dict=False))
        return tokenizer(p)["input_ids"]
    return tokenizer(settings["prefix"] + text, truncation=True, max_length=settings["max_source_length"])["input_ids"]


def generate(model, tokenizer, inputs, batch_size, **generate_kwargs):
    """The generated token ids for each input (up to its first EOS, without the prompt or the decoder start token),
    in the inputs' order: length-sorted batches, KV cache, decoder-only prompts padded on the left."""
    order = sorted(range(len(inputs)), key=lambda i: len(inputs[i]))
    rows = [None] * len(inputs)
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        for i, row in zip(chunk, generate_batch(model, tokenizer, [inputs[i] for i in chunk], **generate_kwargs)):
            rows[i] = row
    return rows


def generate_batch(model, tokenizer, inputs, **generate_kwargs):
    decoder_only = not model.config.is_encoder_decoder
    batch = tokenizer.pad({"input_ids": inputs}, padding_side="left" if decoder_only else "right", return_tensors="pt")
    batch = {k: v.to(model.device) for k, v in batch.items()}
    with torch.inference_mode():
        out = model.generate(**batch, **generate_kwargs)  # KV cache: the generation config's use_cache (default)
    new = out[:, batch["input_ids"].shape[1] :] if decoder_only else out[:, 1:]  # enc-dec: drop the start token
    config = generate_kwargs.get("generation_config") or model.generation_config
    eos = generate_kwargs.get("eos_token_id", config.eos_token_id)
    eos = set(eos if isinstance(eos, (list, tuple)) else [eos])
    rows = []
    for row in new.tolist():
        end = next((j for j, t in enumerate(row) if t in eos), len(row))
        rows.append(row[:end])
    return rows


class Seq2SeqPipeline(Pipeline):
    """translator(text) or translator([texts], batch_size=..., **generate_kwargs) -> [{"translation_text": ...}, ...]
    (or "summary_text"), one dict per text. Settings (max_source_length, prefix, prompt template, languages) come from
    the exported config.json; generation defaults from generation_config.json."""

    _pipeline_calls_generate = True
    _load_processor = False
    _load_image_processor = False
    _load_feature_extractor = False
    _load_tokenizer = True

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.settings = {**DEFAULTS, **(getattr(self.model.config, "seq2seq", None) or {})}
        self.decoder_only = not self.model.config.is_encoder_decoder
        if self.settings["source_lang_code"]:  # mBART / NLLB tokenizers mark the source language with a code
            self.tokenizer.src_lang = self.settings["source_lang_code"]

    def __call__(self, inputs, batch_size=None, **generate_kwargs):
        texts = [inputs] if isinstance(inputs, str) else list(inputs)
        if not all(isinstance(t, str) and t.strip() for t in texts):
            raise ValueError("the pipeline takes a non-empty string or a list of them")
        encoded = [self.preprocess(t) for t in texts]
        kwargs = self._prepare_generate_kwargs(generate_kwargs)
        with self.device_placement():
            rows = generate(self.model, self.tokenizer, encoded, batch_size or self._batch_size or
                            self.settings["batch_size"], **kwargs)
        return [self.postprocess(row) for row in rows]

    def _sanitize_parameters(self, **generate_kwargs):
        return {}, generate_kwargs, {}

    def preprocess(self, text):
        return encode(self.tokenizer, text, self.settings, self.decoder_only)

    def _forward(self, input_ids, **generate_kwargs):
        kwargs = self._prepare_generate_kwargs(generate_kwargs)
        return generate_batch(self.model, self.tokenizer, [input_ids], **kwargs)[0]

    def postprocess(self, ids):
        return {self.settings["output_key"]: self.tokenizer.decode(ids, skip_special_tokens=True).strip()}
