"""Tiny random models with small real tokenizers, built from configs in a second: a 2-layer BERT (and DistilBERT /
DeBERTa-v2 on its tokenizer) and decoder-only Llama / GPT-2. The sequence-to-sequence families are in
seq2seq_models.py."""

from __future__ import annotations

from pathlib import Path

from helpers.data import LM_WORDS


def build_tiny_bert(path: Path, corpus: list[str]) -> Path:
    """A 2-layer, 32-wide BERT with random weights and a WordPiece vocabulary of `corpus`'s words plus single
    characters (other words split into pieces); the same files in every session."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import BertConfig, BertModel, BertTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    normalizer, pre_tokenizer = normalizers.BertNormalizer(lowercase=True), pre_tokenizers.BertPreTokenizer()
    # built, not trained: tokenizers' WordPieceTrainer breaks frequency ties differently in every process
    words = {w for text in corpus for w, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text))}
    chars = {c for w in words for c in w}
    pieces = specials + sorted(words | chars) + sorted(f"##{c}" for c in chars)
    tok = Tokenizer(models.WordPiece({p: i for i, p in enumerate(pieces)}, unk_token="[UNK]"))
    tok.normalizer, tok.pre_tokenizer = normalizer, pre_tokenizer
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls), ("[SEP]", sep)]
    )
    tok.decoder = decoders.WordPiece()
    tokenizer = BertTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                  sep_token="[SEP]", mask_token="[MASK]", model_max_length=128)
    tokenizer.save_pretrained(path)
    config = BertConfig(vocab_size=tok.get_vocab_size(), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128)
    import torch

    torch.manual_seed(0)
    BertModel(config).save_pretrained(path)
    return path


def tiny_variant(bert_dir: Path, path: Path, family: str) -> Path:
    """bert_dir's tokenizer with a tiny random encoder of another family: distilbert (no token_type_ids)
    or deberta-v2 (relative attention, no absolute positions)."""
    import torch
    from transformers import AutoTokenizer, DebertaV2Config, DebertaV2Model, DistilBertConfig, DistilBertModel

    inputs = {"model_input_names": ["input_ids", "attention_mask"]} if family == "distilbert" else {}
    tokenizer = AutoTokenizer.from_pretrained(bert_dir, **inputs)  # distilbert's tokenizer has no token types
    size = dict(vocab_size=len(tokenizer), max_position_embeddings=128, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    if family == "distilbert":
        model = DistilBertModel(DistilBertConfig(dim=32, n_layers=2, n_heads=2, hidden_dim=64, **size))
    else:
        model = DebertaV2Model(DebertaV2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                               intermediate_size=64, relative_attention=True, position_buckets=16,
                                               pos_att_type=["p2c", "c2p"], position_biased_input=False, **size))
    tokenizer.save_pretrained(path)
    model.save_pretrained(path)
    return path


CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def build_tiny_lm(path, family: str = "llama", chat: bool = True, words: list[str] = LM_WORDS,
                  max_length: int | None = None):
    """A tiny random decoder with a word-level tokenizer (words, newline, ChatML specials); max_length: the
    tokenizer's declared model_max_length (none by default)."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<unk>", "<|im_start|>", "<|im_end|>"]
    vocab = {w: i for i, w in enumerate(specials + ["\n", *words])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split("\n", behavior="isolated"),
                                                 pre_tokenizers.WhitespaceSplit()])
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<|im_end|>",
                                        bos_token="<|im_start|>", pad_token="<|im_end|>",
                                        **({"model_max_length": max_length} if max_length else {}))
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    if chat:
        tokenizer.chat_template = CHATML
    tokenizer.save_pretrained(path)
    torch.manual_seed(0)
    size = dict(vocab_size=len(vocab), bos_token_id=1, eos_token_id=2, pad_token_id=2)
    if family == "llama":
        model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                             num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
                                             tie_word_embeddings=True, **size))
    else:
        model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=2, n_positions=256, **size))
    model.save_pretrained(path)
    return path
