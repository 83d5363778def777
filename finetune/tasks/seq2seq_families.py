"""The three kinds of model a sequence-to-sequence task trains (finetune/tasks/seq2seq.py), behind one interface:

  EncoderDecoder  any AutoModelForSeq2SeqLM checkpoint (T5, BART, Marian, mBART, ...): the source (with a T5-style
                  prefix when the checkpoint has one) goes to the encoder, the target ids are the labels
  WarmStart       model.encoder + model.decoder: an EncoderDecoderModel built from two checkpoints that share a
                  vocabulary (BERT2BERT: cross-attention and the LM head are new), exported as one model
  DecoderOnly     a causal LM trained on prompt -> target with the loss on the target only (the prompt template, as a
                  chat user turn when the tokenizer has a chat template): the generation task's masking, reused

family_for() picks one from the model settings and the checkpoint's config; a family loads the tokenizer when it is
made and the model when asked, encodes a split's (source, target) pairs, and says how long an example can get.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, ClassVar

from finetune import adapters, assets, loading
from finetune.errors import FinetuneError
from finetune.tasks.base import auto_class
from finetune.tasks.generation import GenerationTask, GenerationTaskConfig

if TYPE_CHECKING:
    from datasets import DatasetDict

log = logging.getLogger(__name__)


class Family:
    name: ClassVar[str]
    auto_model: ClassVar[str] = "AutoModelForSeq2SeqLM"
    peft_task_type: ClassVar[str] = "SEQ_2_SEQ_LM"
    label_shift: ClassVar[int] = 0  # an encoder-decoder's decoder predicts label t at position t
    decoder_only: ClassVar[bool] = False
    repeats_hint: ClassVar[str] = ""  # what else to try when most outputs repeat, besides training longer

    def __init__(self, cfg, path: str, model_cfg, config=None):
        from transformers import AutoConfig, AutoTokenizer

        self.cfg = cfg  # the task's config
        self.config = config or loading.load(AutoConfig, path, model_cfg)
        self.tokenizer = loading.load(AutoTokenizer, path, model_cfg)
        self.start_id: int | None = getattr(self.config, "decoder_start_token_id", None)  # labels must not repeat it

    def load(self, path: str, model_cfg, dtype: str):
        model, _ = loading.load_pretrained(auto_class(self.auto_model), path, model_cfg, None, dtype=dtype)
        return model

    def longest(self) -> int:
        """The most tokens one example can take (the model's positions must cover it)."""
        return max(self.cfg.max_source_length, self.cfg.max_target_length)

    def tokenize(self, pairs: dict[str, tuple[list[str], list[str]]], settings: dict[str, Any]) -> DatasetDict:
        """Features of each split's (sources, targets): the source ids in, the target ids as labels."""
        from datasets import Dataset, DatasetDict

        from finetune.pipelines import seq2seq as s2s

        out = {}
        for split, (sources, targets) in pairs.items():
            ids = [s2s.encode(self.tokenizer, s, settings, False) for s in sources]
            labels = self.tokenizer(text_target=targets, truncation=True,
                                    max_length=self.cfg.max_target_length)["input_ids"]
            # a decoder starts from decoder_start_token_id itself: labels beginning with it (BERT's [CLS]) repeat it
            labels = [row[1:] if row and row[0] == self.start_id else row for row in labels]
            out[split] = Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * len(x) for x in ids],
                                            "labels": labels, "length": [len(x) + len(y) for x, y in zip(ids, labels)]})
        return DatasetDict(out)

    def adapter_base_code(self, cfg, base: str) -> str | None:
        """Python rebuilding the model a LoRA adapter applies to, when the task's default does not (None)."""
        return None

    def prefix(self, task_params_key: str) -> str:
        """task.prefix, or the checkpoint's own for this task (T5's task_specific_params), or none."""
        if self.cfg.prefix is not None:
            return self.cfg.prefix
        own = (getattr(self.config, "task_specific_params", None) or {}).get(task_params_key, {}).get("prefix", "")
        if own:
            log.info("input prefix from the checkpoint: %r", own)
        return own


class EncoderDecoder(Family):
    name = "encoder_decoder"

    def __init__(self, cfg, path: str, model_cfg, config=None):
        super().__init__(cfg, path, model_cfg, config)
        self.tokenizer.model_max_length = cfg.max_source_length  # the exported tokenizer truncates like training
        if self.tokenizer.pad_token is None:
            raise FinetuneError(f"the tokenizer of '{model_cfg.name_or_path}' has no padding token; an "
                                "encoder-decoder needs one")


class WarmStart(EncoderDecoder):
    name = "warm_start"
    repeats_hint = ", or raise trainer.new_parameters_lr_scale (its new cross-attention reads the source)"

    def __init__(self, cfg, path: str, model_cfg):
        from transformers import AutoTokenizer

        super().__init__(cfg, assets.resolve(model_cfg.encoder), model_cfg)
        decoder = loading.load(AutoTokenizer, assets.resolve(model_cfg.decoder), model_cfg)
        if decoder.get_vocab() != self.tokenizer.get_vocab():
            raise FinetuneError(f"model.encoder ({model_cfg.encoder}) and model.decoder ({model_cfg.decoder}) have "
                                "different vocabularies; a warm-started encoder-decoder here needs one tokenizer "
                                "for both: pick two checkpoints of the same family")
        # BERT-style decoders start from [CLS] and end with [SEP]; GPT/RoBERTa-style ones have BOS and EOS
        bos = self.tokenizer.bos_token_id
        self.start_id = bos if bos is not None else self.tokenizer.cls_token_id

    def load(self, path: str, model_cfg, dtype: str):
        from transformers import EncoderDecoderModel

        sides = {"encoder": assets.resolve(model_cfg.encoder), "decoder": assets.resolve(model_cfg.decoder)}
        dropout = {f"{side}_{k}": v for side, p in sides.items()  # both halves' config keys, prefixed
                   for k, v in loading.dropouts(p, model_cfg).items()}
        try:
            with loading.quiet_load_report():  # (the line below says what is new)
                model = EncoderDecoderModel.from_encoder_decoder_pretrained(
                    sides["encoder"], sides["decoder"], encoder_dtype=dtype, decoder_dtype=dtype, **dropout)
        except (OSError, ValueError, KeyError) as e:
            raise FinetuneError(f"cannot warm-start an encoder-decoder from model.encoder={model_cfg.encoder} and "
                                f"model.decoder={model_cfg.decoder} ({str(e).strip().splitlines()[0]}); use "
                                "encoder-style checkpoints (BERT, RoBERTa, ...)") from e
        tokenizer = self.tokenizer
        eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
        ids = {"decoder_start_token_id": self.start_id, "bos_token_id": self.start_id, "eos_token_id": eos,
               "pad_token_id": tokenizer.pad_token_id}
        for key, value in ids.items():  # forward() reads the config, generate() the generation config
            setattr(model.config, key, value)
        model.generation_config.update(**ids)
        log.info("warm-started encoder-decoder; newly initialized: %s", ", ".join(adapters.trainable_modules(model)))
        return model

    def adapter_base_code(self, cfg, base: str) -> str:
        enc, dec = (base if assets.is_bundled(x) and cfg.model.base_model else x for x in (cfg.model.encoder,
                                                                                           cfg.model.decoder))
        return f"""from transformers import AutoConfig, EncoderDecoderModel, GenerationConfig
base = EncoderDecoderModel.from_encoder_decoder_pretrained("{enc}", "{dec}")
config = AutoConfig.from_pretrained("path/to/this/directory")  # the decoder's start, end and padding tokens
base.config.update({{k: getattr(config, k) for k in ("decoder_start_token_id", "eos_token_id", "pad_token_id")}})
base.generation_config = GenerationConfig.from_pretrained("path/to/this/directory")"""


class DecoderOnly(Family):
    name = "decoder_only"
    auto_model = "AutoModelForCausalLM"
    peft_task_type = "CAUSAL_LM"
    label_shift = 1
    decoder_only = True

    def __init__(self, cfg, path: str, model_cfg, config=None):
        super().__init__(cfg, path, model_cfg, config)
        if self.tokenizer.eos_token is None:
            raise FinetuneError(f"the tokenizer of '{model_cfg.name_or_path}' has no EOS token; a decoder-only "
                                "model needs one to stop generating")
        if self.tokenizer.pad_token is None:  # labels are built explicitly, so pad = EOS masks no real EOS
            self.tokenizer.pad_token = self.tokenizer.eos_token
        # the generation task's prompt/completion and chat masking
        self.lm = GenerationTask(GenerationTaskConfig(name=GenerationTask.name, generation=cfg.generation))

    def longest(self) -> int:
        return self.lm.cfg.block_size

    def tokenize(self, pairs: dict[str, tuple[list[str], list[str]]], settings: dict[str, Any]) -> DatasetDict:
        """The generation task's prompt/completion (or chat) encoding: loss on the target and its end token only."""
        from datasets import Dataset, DatasetDict

        from finetune.pipelines import seq2seq as s2s

        rows, longest, tokenizer = {}, 0, self.tokenizer
        for split, (sources, targets) in pairs.items():
            prompts = [s2s.prompt(tokenizer, s, settings) for s in sources]
            targets = [s2s.cut(tokenizer, t, self.cfg.max_target_length) for t in targets]
            if settings["chat_template"]:
                rows[split] = Dataset.from_dict({"messages": [[*p, {"role": "assistant", "content": t}]
                                                              for p, t in zip(prompts, targets)]})
            else:
                rows[split] = Dataset.from_dict({"prompt": prompts, "completion": targets})
            longest = max(longest, max(len(s2s.encode(tokenizer, s, settings, True)) for s in sources))
        self.lm.format = "messages" if settings["chat_template"] else "prompt_completion"
        # no example is cut: the longest prompt, the longest target and room for the chat template's end-of-turn markup
        self.lm.cfg.block_size = longest + self.cfg.max_target_length + 64
        return self.lm.tokenize(DatasetDict(rows), tokenizer)

    def prefix(self, task_params_key: str) -> str:
        return ""


def family_for(cfg, path: str, model_cfg) -> Family:
    """The family of the model that model= names (cfg: the task's config)."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if model_cfg.encoder or model_cfg.decoder:
        family = WarmStart(cfg, path, model_cfg)
    else:
        config = loading.load(AutoConfig, path, model_cfg)
        if config.is_encoder_decoder:
            family = EncoderDecoder(cfg, path, model_cfg, config)
        elif config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
            family = DecoderOnly(cfg, path, model_cfg, config)
        else:
            raise FinetuneError(
                f"'{model_cfg.name_or_path}' ({config.model_type}) is neither a sequence-to-sequence model (T5, "
                "BART, Marian, mBART, ...) nor a causal LM; warm-start an encoder-decoder from an encoder "
                f"checkpoint instead: model=bert2bert model.encoder=<it> model.decoder=<it>")
    log.info("sequence-to-sequence model family: %s", family.name)
    return family
