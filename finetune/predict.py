"""`python -m finetune.predict <model dir or run dir> <input file> [--output preds.jsonl] [--text-column C] ...
[--batch-size N]`: batch inference through an exported model's pipeline.

Input: csv, tsv, jsonl, json (an array of objects, or JSON lines), parquet or txt (one text per line), optionally
.gz/.bz2/.xz. It is read in chunks and fed through the pipeline batch by batch, so a file larger than memory
works. Output: JSON lines, one record per input row in input order (the task's prediction_record), written to
a temp file and renamed into place when complete. The task comes from the model's config.json ("finetune"
entry); its input columns default to the training's column names (--<column>-column to change them).
"""

from __future__ import annotations

import argparse
import bz2
import gzip
import io
import json
import logging
import lzma
import math
import os
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, Iterator

from finetune import cpu
from finetune.errors import FinetuneError

_OPEN = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}
_PANDAS_COMPRESSION = {".gz": "gzip", ".bz2": "bz2", ".xz": "xz"}
FORMATS = (".csv", ".tsv", ".jsonl", ".json", ".parquet", ".txt")
Chunks = Iterator[tuple[dict[str, list], int]]  # (rows by column, progress so far in the reader's unit)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    try:
        task, model_dir, record = _task_of(next((a for a in argv if not a.startswith("-")), None))
        parser = argparse.ArgumentParser(prog="python -m finetune.predict", description=__doc__.split("\n\n")[0])
        parser.add_argument("model", help="an exported model directory, or the run directory holding it")
        parser.add_argument("input", type=Path, help=f"rows to predict: {', '.join(FORMATS)} (optionally compressed)")
        parser.add_argument("--output", type=Path, help="JSON lines to write (default: <input name>.predictions.jsonl "
                                                        "in the current directory)")
        parser.add_argument("--batch-size", type=int, help="rows per pipeline batch (default: the task's)")
        fields = {c: task.columns[c] for c in task.input_columns if task.columns[c] in record} if task else {}
        for canonical, field in fields.items():
            parser.add_argument(f"--{field.replace('_', '-')}", dest=field, default=(record or {}).get(field),
                                help=f"input column of the {canonical} (default: the training's)")
        args = parser.parse_args(argv)
        columns = {c: getattr(args, f) for c, f in fields.items() if getattr(args, f)}
        required = [c for c in fields if c not in task.optional_columns]
        if missing := [fields[c] for c in required if c not in columns]:
            raise FinetuneError(f"no input column for {missing[0]}: pass --{missing[0].replace('_', '-')}=<column>")
        output = args.output or Path(f"{args.input.name.split('.')[0]}.predictions.jsonl")
        cpu.tune()
        predict(task, model_dir, args.input, columns, output, args.batch_size)
    except FinetuneError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def _task_of(model: str | None):
    if model is None:
        return None, None, None  # --help, or argparse reports the missing model

    from finetune.export import model_dir_of, read_record
    from finetune.tasks import get_task

    model_dir = model_dir_of(model)
    record = read_record(model_dir)
    return get_task(record["task"]), model_dir, record["data"]


def predict(task, model_dir: Path, path: Path, columns: dict[str, str], output: Path,
            batch_size: int | None = None) -> int:
    """Write one prediction record per row of `path` to `output`; returns the number of rows."""
    from finetune import progress

    if not path.is_file():
        raise FinetuneError(f"input file not found: {path}")
    batch_size = batch_size or task.pipeline_batch_size
    chunks, total, unit = read_rows(path, list(columns.values()), chunk_rows=batch_size * 8)
    bar = progress.bar(total=total, desc="predicting", unit=unit, unit_scale=unit == "B", unit_divisor=1024)
    counted = 0

    def inputs() -> Iterator[Any]:
        nonlocal counted
        for chunk, done in chunks:
            rows = {canonical: chunk[source] for canonical, source in columns.items()}
            for canonical, values in rows.items():
                for i, value in enumerate(values):
                    if value is None or (isinstance(value, float) and math.isnan(value)) or value == "":
                        raise FinetuneError(f"{path} row {counted + i + 1} has no {canonical} (column "
                                            f"'{columns[canonical]}'); fill it or drop the row")
            counted += len(next(iter(rows.values())))
            yield from task.pipeline_inputs(rows)
            bar.update(done - bar.n)

    pipe = task.load_pipeline(model_dir)
    written = 0
    with _atomic(output) as out:
        for prediction in task.run_pipeline(pipe, inputs(), batch_size):
            out.write(json.dumps(task.prediction_record(prediction), ensure_ascii=False) + "\n")
            written += 1
    bar.close()
    logging.getLogger("finetune").info("wrote %d predictions to %s", written, output)
    return written


def read_rows(path: Path, columns: list[str], chunk_rows: int) -> tuple[Chunks, int, str]:
    """Chunks of `columns` from the file, the total the progress counts to, and its unit (bytes, or rows)."""
    suffixes = [s.lower() for s in path.suffixes]
    compression = suffixes[-1] if suffixes and suffixes[-1] in _OPEN else None
    fmt = (suffixes[:-1] if compression else suffixes)[-1:] or [""]
    fmt = fmt[0]
    if fmt not in FORMATS:
        raise FinetuneError(f"cannot read {path}: unknown format '{fmt}'; use {', '.join(FORMATS)}")
    if fmt == ".parquet":
        return _parquet(path, columns, chunk_rows)
    size = path.stat().st_size
    if fmt in (".csv", ".tsv"):
        return _csv(path, columns, chunk_rows, "\t" if fmt == ".tsv" else ",", compression), size, "B"
    return _text(path, columns, chunk_rows, fmt, compression), size, "B"


def _csv(path: Path, columns: list[str], chunk_rows: int, sep: str, compression: str | None) -> Chunks:
    import pandas as pd

    with open(path, "rb") as raw:
        reader = pd.read_csv(raw, sep=sep, chunksize=chunk_rows, dtype=str, keep_default_na=False,
                             compression=_PANDAS_COMPRESSION.get(compression or ""))
        for frame in reader:
            _check_columns(path, columns, list(frame.columns))
            yield {c: frame[c].tolist() for c in columns}, raw.tell()


def _text(path: Path, columns: list[str], chunk_rows: int, fmt: str, compression: str | None) -> Chunks:
    """JSON lines, a JSON array of objects, or plain text lines; read as a stream."""
    with open(path, "rb") as raw, io.TextIOWrapper(_OPEN[compression](raw) if compression else raw,
                                                   encoding="utf-8") as text:
        if fmt == ".txt":
            records: Iterator[dict] = ({columns[0]: line.rstrip("\r\n")} for line in text)
        elif fmt == ".json" and _first_char(text) == "[":
            records = _json_array(text)
        else:
            records = _json_lines(path, text)
        chunk: list[dict] = []
        for record in records:
            chunk.append(record)
            if len(chunk) == chunk_rows:
                yield _columns(path, columns, chunk), raw.tell()
                chunk = []
        if chunk:
            yield _columns(path, columns, chunk), raw.tell()


def _first_char(text: IO[str]) -> str:
    start = text.tell()
    char = text.read(1)
    while char and char.isspace():
        char = text.read(1)
    text.seek(start)
    return char


def _json_lines(path: Path, text: IO[str]) -> Iterator[dict]:
    for number, line in enumerate(text, 1):
        if line.strip():
            try:
                yield json.loads(line)
            except ValueError as e:
                raise FinetuneError(f"{path} line {number} is not JSON ({e}); give JSON lines or a JSON array") from e


def _json_array(text: IO[str], block: int = 1 << 16) -> Iterator[dict]:
    """The items of a top-level JSON array, decoded one by one (json.load would hold the whole file)."""
    decoder, buffer, position = json.JSONDecoder(), text.read(block).lstrip()[1:], 0
    while True:
        while position < len(buffer) and buffer[position] in " \t\r\n,":
            position += 1
        if buffer[position:position + 1] == "]":
            return
        try:
            item, position = decoder.raw_decode(buffer, position)
        except ValueError:  # the item goes on in the next block (or the file is not valid JSON)
            more = text.read(block)
            if not more:
                raise FinetuneError("the JSON array in the input file is incomplete or not valid JSON") from None
            buffer, position = buffer[position:] + more, 0
            continue
        yield item


def _parquet(path: Path, columns: list[str], chunk_rows: int) -> tuple[Chunks, int, str]:
    import pyarrow.parquet as pq

    file = pq.ParquetFile(path)
    _check_columns(path, columns, file.schema_arrow.names)

    def chunks() -> Chunks:
        done = 0
        for batch in file.iter_batches(batch_size=chunk_rows, columns=columns):
            done += batch.num_rows
            yield batch.to_pydict(), done

    return chunks(), file.metadata.num_rows, "rows"


def _columns(path: Path, columns: list[str], records: list[dict]) -> dict[str, list]:
    for record in records:
        if not isinstance(record, dict):
            raise FinetuneError(f"{path} holds {type(record).__name__} rows; each row must be an object with named "
                                "columns")
        _check_columns(path, columns, list(record))
    return {c: [r[c] for r in records] for c in columns}


def _check_columns(path: Path, columns: list[str], available: list[str]) -> None:
    if missing := [c for c in columns if c not in available]:
        raise FinetuneError(f"column '{missing[0]}' not found in {path}; available columns: {', '.join(available)}; "
                            "name the right one with --<text|question|context|...>-column")


@contextmanager
def _atomic(path: Path) -> Iterator[IO[str]]:
    """A text file written under a temp name beside `path` and renamed to it only when complete."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as file:
            yield file
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it 0600
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


if __name__ == "__main__":
    main()
