"""Translation (task=translation): the sequence-to-sequence task (finetune/tasks/seq2seq.py) with languages.

Data, besides source/target columns: parallel text files (<split>.<source_lang> beside <split>.<target_lang>, line N
translating line N, optionally compressed; a directory of them is data=<dir>, as Multi30k ships) and Hub rows
{"translation": {"<source_lang>": ..., "<target_lang>": ...}}. Tokenizers with language codes (mBART, NLLB) get the
source code on the input and the target code forced as the first generated token. Scored with sacrebleu BLEU (the
main metric) and chrF against every reference.
"""

from __future__ import annotations

import bz2
import gzip
import logging
import lzma
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from finetune.errors import FinetuneError
from finetune.tasks.seq2seq import Seq2SeqConfig, Seq2SeqData, Seq2SeqTask

if TYPE_CHECKING:
    from datasets import Dataset

log = logging.getLogger(__name__)

_OPEN = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}


@dataclass
class TranslationConfig(Seq2SeqConfig):
    source_lang: str = "en"  # the data's language keys: train.en / train.de files, {"translation": {"en", "de"}} rows
    target_lang: str = "de"
    source_lang_code: Optional[str] = None  # the tokenizer's language code (mBART en_XX, NLLB eng_Latn); None: found
    target_lang_code: Optional[str] = None


@dataclass
class TranslationData(Seq2SeqData):
    translation_column: str = "translation"  # Hub rows {"translation": {"<source_lang>": ..., "<target_lang>": ...}}


class TranslationTask(Seq2SeqTask):
    name = "translation"
    schema, data_schema = TranslationConfig, TranslationData
    pipeline_task = "translation"
    output_key = "translation_text"
    main_metric = "bleu"
    scores_kinds = ("bleu",)  # sacrebleu BLEU and chrF
    verify_tolerance = 0.5  # BLEU points (0..100)
    columns = {**Seq2SeqTask.columns, "translation": "translation_column"}
    optional_columns = frozenset(columns)
    input_columns = ("source", "translation")

    @property
    def data_hint(self) -> str:
        src, tgt = self.cfg.source_lang, self.cfg.target_lang
        return (f"; for translation: data=<directory> with train.{src} + train.{tgt} (line N <-> line N, optionally "
                f".gz; val/dev/test files beside), data=pairs.jsonl with source/target columns, or a Hub dataset of "
                f'{{"translation": {{"{src}": ..., "{tgt}": ...}}}} rows')

    @property
    def file_formats(self) -> frozenset[str]:
        return frozenset({f".{self.cfg.source_lang}", f".{self.cfg.target_lang}"})

    @property
    def task_params_key(self) -> str:
        return f"translation_{self.cfg.source_lang}_to_{self.cfg.target_lang}"

    def read_file(self, path: str) -> Dataset | None:
        """Parallel text files: <split>.<source_lang> and <split>.<target_lang> side by side (optionally .gz, .bz2,
        .xz), line N of one translating line N of the other; None for other files."""
        p = Path(path)
        compression = p.suffix.lower() if p.suffix.lower() in _OPEN else ""
        stem, _, lang = p.name[: len(p.name) - len(compression)].rpartition(".")
        src, tgt = self.cfg.source_lang, self.cfg.target_lang
        files = {lang_: _sibling(p.parent, f"{stem}.{lang_}") for lang_ in (src, tgt)}
        if not stem or (lang not in (src, tgt) and None in files.values()):
            return None
        missing = [f"{stem}.{lang_}" for lang_, f in files.items() if f is None]
        if missing:
            raise FinetuneError(f"{p} has no parallel file {missing[0]} beside it; set task.source_lang / "
                                "task.target_lang to the files' language suffixes")
        lines = {lang_: _read_lines(f) for lang_, f in files.items()}
        if len(lines[src]) != len(lines[tgt]):
            raise FinetuneError(f"{files[src]} has {len(lines[src])} lines but {files[tgt]} has {len(lines[tgt])}; "
                                "parallel files must match line for line")
        for lang_, f in files.items():
            empty = next((i for i, line in enumerate(lines[lang_]) if not line.strip()), None)
            if empty is not None:
                raise FinetuneError(f"{f}:{empty + 1} is empty; every line needs its translation (remove the pair)")
        from datasets import Dataset

        return Dataset.from_dict({"source": lines[src], "target": lines[tgt]})

    def _columns(self, ds: Dataset, split: str, data_cfg) -> tuple[list, list]:
        """source/target columns, or Hub-style translation rows {"<source_lang>": ..., "<target_lang>": ...}."""
        if "translation" not in ds.column_names or {"source", "target"} <= set(ds.column_names):
            return super()._columns(ds, split, data_cfg)
        src, tgt = self.cfg.source_lang, self.cfg.target_lang
        rows = ds["translation"][:]
        for t in rows:
            if not isinstance(t, dict) or t.get(src) is None or t.get(tgt) is None:
                keys = ", ".join(k for k, v in t.items() if v is not None) if isinstance(t, dict) else type(t).__name__
                raise FinetuneError(f"a translation row of the {split} data has {keys}, not {src} and {tgt}; set "
                                    "task.source_lang=... task.target_lang=... to its language keys")
        return [t[src] for t in rows], [t[tgt] for t in rows]

    def _language_codes(self, tokenizer) -> tuple[str | None, str | None]:
        """mBART / NLLB-style tokenizers mark languages with codes (en_XX, eng_Latn): task.*_lang_code, or the one
        code that starts with the language key; the target code is forced as the first generated token."""
        c = self.cfg
        if not hasattr(tokenizer, "src_lang"):
            if c.source_lang_code or c.target_lang_code:
                raise FinetuneError("task.source_lang_code / task.target_lang_code: this tokenizer has no language "
                                    "codes; remove them")
            return None, None
        special = [t for t in tokenizer.all_special_tokens]
        codes = []
        for lang, given, key in ((c.source_lang, c.source_lang_code, "source_lang_code"),
                                 (c.target_lang, c.target_lang_code, "target_lang_code")):
            found = [given] if given else [t for t in special if t.startswith(f"{lang}_") or t == f"__{lang}__"]
            if len(found) != 1 or found[0] not in special:
                examples = ", ".join(t for t in special if "_" in t.strip("_"))[:120]
                raise FinetuneError(f"this tokenizer marks languages with codes and none fits '{given or lang}': "
                                    f"set task.{key}=<code> (e.g. {examples})")
            codes.append(found[0])
        tokenizer.src_lang, tokenizer.tgt_lang = codes
        target_ids = tokenizer(text_target="x")["input_ids"]
        code_id = tokenizer.convert_tokens_to_ids(codes[1])
        if target_ids and target_ids[0] == code_id:  # mBART-50 / NLLB: labels start with the target code
            self.forced_bos = code_id
        log.info("language codes: %s -> %s", *codes)
        return codes[0], codes[1]


def _sibling(directory: Path, name: str) -> Path | None:
    for suffix in ("", *_OPEN):
        if (directory / f"{name}{suffix}").is_file():
            return directory / f"{name}{suffix}"
    return None


def _read_lines(path: Path) -> list[str]:
    with (_OPEN.get(path.suffix.lower()) or open)(path, "rt", encoding="utf-8", newline="") as f:
        text = f.read()
    # split on newlines only: str.splitlines() also breaks at form feeds and the like, which would misalign the files
    lines = [line.removesuffix("\r") for line in text.split("\n")]
    return lines[:-1] if lines and lines[-1] == "" else lines
