"""Entity tags: the BIO schemes (IOB1, IOB2, BIOES) checked and converted to IOB2, and CoNLL-style files read.

CoNLL files hold one token per line, the token in the first column and the tag in the last; a blank line ends a
sentence. IOB2 is what the models predict: every entity starts with B-, continues with I- (the only prefixes the
token-classification pipeline groups).
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from finetune.errors import FinetuneError

if TYPE_CHECKING:
    from datasets import Dataset

# Files read as CoNLL (token first, tag last, one token per line); any other format goes to data.py's readers.
CONLL_FORMATS = frozenset({".conll", ".conll03", ".iob", ".iob2", ".bio", ".bioes", ".iobes", ".ner", ".txt", ".tsv"})
SCHEMES = {"IOB1": ("B", "I"), "IOB2": ("B", "I"), "BIOES": ("B", "I", "E", "S")}
_ALIASES = {"BIO": "IOB2", "IOBES": "BIOES"}


def scheme_name(setting: str) -> str:
    name = setting.upper()
    return _ALIASES.get(name, name)


def scheme_error(tags: list[str], scheme: str) -> str | None:
    """Why one sentence's tags break `scheme`, or None when they fit it."""
    prefixes = SCHEMES[scheme]
    open_type = None  # IOB: the previous tag's type; BIOES: the type of the entity still open
    for i, tag in enumerate(tags, 1):
        prefix, _, kind = tag.partition("-")
        if tag == "O":
            prefix, kind = "O", None
        elif prefix not in prefixes or not kind:
            return f"tag '{tag}' at word {i} is neither O nor {'/'.join(prefixes)}-<type>"
        if scheme == "IOB2" and prefix == "I" and open_type != kind:
            after = tags[i - 2] if i > 1 else "the sentence start"
            return f"'{tag}' at word {i} follows {after}, not B-{kind} or I-{kind}"
        if scheme == "BIOES":
            if prefix in ("I", "E") and open_type != kind:
                return f"'{tag}' at word {i} continues no open {kind} entity (it starts with B-{kind})"
            if prefix in ("O", "B", "S") and open_type is not None:
                return f"'{tag}' at word {i} comes before the open {open_type} entity ends (with E-{open_type})"
            kind = kind if prefix in ("B", "I") else None
        open_type = kind
    if scheme == "BIOES" and open_type is not None:
        return f"the sentence ends inside a {open_type} entity (it ends with E-{open_type})"
    return None


def to_iob2(tags: list[str], scheme: str) -> list[str]:
    """The same entities in IOB2: every entity starts with B-, continues with I-."""
    out, previous = [], None
    for tag in tags:
        if tag == "O":
            out.append(tag)
            previous = None
            continue
        prefix, _, kind = tag.partition("-")
        if scheme == "BIOES":
            prefix = {"S": "B", "E": "I"}.get(prefix, prefix)
        elif scheme == "IOB1" and prefix == "I" and previous != kind:
            prefix = "B"
        out.append(f"{prefix}-{kind}")
        previous = kind
    return out


def read_conll(path: str) -> Dataset:
    """One token per line, the token in the first column and the tag in the last (spaces or tabs between);
    a blank or whitespace-only line ends a sentence; -DOCSTART- lines are document breaks."""
    import fsspec
    from datasets import Dataset

    sentences: list[tuple[list[str], list[str]]] = []
    tokens: list[str] = []
    tags: list[str] = []
    try:
        with fsspec.open(path, "rt", encoding="utf-8", compression="infer") as f:
            for number, line in enumerate(f, 1):
                fields = re.split(r"[ \t]+", line.strip(" \t\r\n"))
                if fields == [""] or fields[0] == "-DOCSTART-":
                    if tokens:
                        sentences.append((tokens, tags))
                    tokens, tags = [], []
                elif len(fields) < 2:
                    raise FinetuneError(f"{path}:{number}: expected a token and its tag separated by spaces or tabs, "
                                        f"got {line.strip()!r}; fix the line (a blank line ends a sentence)")
                else:
                    tokens.append(fields[0])
                    tags.append(fields[-1])
    except UnicodeDecodeError as e:
        raise FinetuneError(f"cannot read {path}: not UTF-8 text ({e.reason}); re-encode it as UTF-8") from e
    if tokens:
        sentences.append((tokens, tags))
    if not sentences:
        raise FinetuneError(f"{path} holds no sentences; give it one token and tag per line")
    return Dataset.from_dict({"tokens": [s[0] for s in sentences], "tags": [s[1] for s in sentences]})
