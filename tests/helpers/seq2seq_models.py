"""Tiny random sequence-to-sequence models with small word-level tokenizers, and a toy parallel corpus: English
sentences and their word-by-word "German" (each word has one translation), which a tiny model learns in seconds,
and its parallel files."""

from __future__ import annotations

import gzip
import random

from helpers.models import build_tiny_bert, build_tiny_lm

EN_DE = {"a": "ein", "man": "mann", "woman": "frau", "dog": "hund", "cat": "katze", "runs": "rennt", "sits": "sitzt",
         "on": "auf", "the": "der", "street": "strasse", "red": "rot", "blue": "blau", "big": "gross", "small": "klein",
         "house": "haus", "ball": "ball", "plays": "spielt", "with": "mit", "child": "kind", "green": "gruen"}
PREFIX = "translate English to German:"  # a T5-style checkpoint's own prefix (task_specific_params)


def corpus(n: int, seed: int = 0, words: int = 10, length: tuple[int, int] = (2, 4)) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    words = list(EN_DE)[:words]
    rows = []
    for _ in range(n):
        sentence = [rng.choice(words) for _ in range(rng.randint(*length))]
        rows.append((" ".join(sentence), " ".join(EN_DE[w] for w in sentence)))
    return rows


ROWS = corpus(300)


def write_parallel(directory, rows=ROWS, splits=(("train", 0, 240), ("val", 240, 270), ("test", 270, 300))):
    """<split>.en.gz and <split>.de.gz line by line: a Multi30k-shaped directory."""
    directory.mkdir(parents=True, exist_ok=True)
    for split, start, end in splits:
        for lang, i in (("en", 0), ("de", 1)):
            with gzip.open(directory / f"{split}.{lang}.gz", "wt", encoding="utf-8") as f:
                f.write("".join(r[i] + "\n" for r in rows[start:end]))
    return directory


def features(model, *overrides, task_name="translation"):
    """The task after load_tokenizer, the tokenizer, and the training features of "a man runs" -> "ein mann rennt"."""
    from datasets import Dataset, DatasetDict

    from finetune import assets
    from finetune.tasks import get_task
    from helpers.cli import compose_cfg

    cfg = compose_cfg(f"task={task_name}", f"model={model}", *overrides)
    task = get_task(cfg.task)
    tokenizer = task.load_tokenizer(assets.resolve(cfg.model.name_or_path), cfg.model)
    rows = Dataset.from_dict({"source": ["a man runs"], "target": ["ein mann rennt"]})
    raw = task.prepare(DatasetDict({"train": rows}), cfg.data)
    row = task.tokenize(raw, tokenizer)["train"][0]
    return task, tokenizer, row, cfg


def _vocab(specials: list[str]) -> dict[str, int]:
    words = specials + sorted({*EN_DE, *EN_DE.values(), *PREFIX.split(), "summarize:"})
    return {w: i for i, w in enumerate(words)}


def _word_tokenizer(vocab: dict[str, int], template: str, **special):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tok.post_processor = processors.TemplateProcessing(
        single=template, special_tokens=[(t, vocab[t]) for t in template.split() if t != "$A"])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", **special)


def build_t5(path, with_prefix: bool = True):
    """T5: targets end with </s>, the decoder starts from <pad>; task_specific_params hold its translation prefix."""
    import torch
    from transformers import T5Config, T5ForConditionalGeneration

    vocab = _vocab(["<pad>", "</s>", "<unk>"])
    _word_tokenizer(vocab, "$A </s>", eos_token="</s>", pad_token="<pad>").save_pretrained(path)
    torch.manual_seed(0)
    params = {"translation_en_to_de": {"prefix": PREFIX + " "}} if with_prefix else None
    T5ForConditionalGeneration(T5Config(vocab_size=len(vocab), d_model=32, d_kv=16, d_ff=64, num_layers=2, num_heads=2,
                                        dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
                                        task_specific_params=params)).save_pretrained(path)
    return path


def build_bart(path):
    """BART: <s> text </s>; the decoder starts from </s> and is forced to write <s> first."""
    import torch
    from transformers import BartConfig, BartForConditionalGeneration

    vocab = _vocab(["<s>", "<pad>", "</s>", "<unk>"])
    _word_tokenizer(vocab, "<s> $A </s>", bos_token="<s>", eos_token="</s>", pad_token="<pad>").save_pretrained(path)
    torch.manual_seed(0)
    BartForConditionalGeneration(BartConfig(
        vocab_size=len(vocab), d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=128,
        bos_token_id=0, pad_token_id=1, eos_token_id=2, decoder_start_token_id=2, forced_bos_token_id=0, dropout=0.0,
    )).save_pretrained(path)
    return path


def build_mbart50(path):
    """mBART-50: language codes (en_XX, de_DE) mark the source and, forced as the first generated token, the target."""
    import torch
    from transformers import MBart50Tokenizer, MBartConfig, MBartForConditionalGeneration

    pieces = [("<s>", 0.0), ("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    pieces += [(f"\u2581{w}", -1.0) for w in sorted({*EN_DE, *EN_DE.values()})]
    tokenizer = MBart50Tokenizer(vocab=pieces, src_lang="en_XX", tgt_lang="de_DE")
    tokenizer.save_pretrained(path)
    torch.manual_seed(0)
    MBartForConditionalGeneration(MBartConfig(
        vocab_size=len(tokenizer), d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=128,
        bos_token_id=0, pad_token_id=1, eos_token_id=2, decoder_start_token_id=2, dropout=0.0,
    )).save_pretrained(path)
    return path


def build_bert(path):
    """A tiny BERT (WordPiece over the corpus' words): model.encoder and model.decoder of a BERT2BERT."""
    return build_tiny_bert(path, [" ".join([*EN_DE, *EN_DE.values()])])


def build_decoder_only(path, chat: bool = True):
    """A tiny Llama (ChatML template when chat) whose word-level vocabulary holds both languages."""
    return build_tiny_lm(path, chat=chat, words=sorted({*EN_DE, *EN_DE.values(), "translate", "summarize:"}))
