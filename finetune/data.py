"""Load a data source into train/validation/test splits with the task's canonical column names.

Sources: `bundled:<asset>/<file>`, a file (csv, tsv, json, jsonl, parquet, txt; optionally .gz/.bz2/.xz),
a directory holding train/validation/test files, explicit data.*_file paths, or a Hub dataset id.
Missing validation/test splits are carved out of train: grouped (data.group_column) or stratified
(the task's label column), always with data.split_seed, so held-out splits never move with the seed.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

import datasets
import numpy as np
from datasets import Dataset, DatasetDict
from datasets.exceptions import DatasetGenerationError
from omegaconf import ListConfig

from finetune import assets
from finetune.errors import FinetuneError
from finetune.sources import BUILDERS, SPLITS, data_error, data_hub_id, file_format

if TYPE_CHECKING:
    from finetune.config import DataConfig
    from finetune.tasks.base import Task

log = logging.getLogger(__name__)

_SPLIT_ALIASES = {"train": "train", "training": "train", "validation": "validation", "valid": "validation",
                  "val": "validation", "dev": "validation", "eval": "validation", "test": "test", "testing": "test"}


def load(cfg: DataConfig, task: Task) -> DatasetDict:
    """Raw splits with canonical columns and encoded labels, held-out splits made, caps applied."""
    raw = _load_source(cfg, task)
    if "train" not in raw:
        raise FinetuneError(f"the data has no train split (found: {', '.join(raw) or 'none'}); add one")
    raw = DatasetDict({split: _rename(_keep_rows(ds, cfg, split), cfg, task, split) for split, ds in raw.items()})
    if cfg.deduplicate:
        raw = DatasetDict({split: _deduplicate(ds, task.input_columns) for split, ds in raw.items()})
    raw = task.prepare(raw, cfg)
    raw = _make_splits(raw, cfg, task)
    caps = {"train": cfg.max_train_samples, "validation": cfg.max_eval_samples, "test": cfg.max_test_samples}
    for split, cap in caps.items():
        if cap is not None and cap < len(raw[split]):
            in_order = getattr(task, "split_in_order", False)  # running text keeps its line order
            raw[split] = (raw[split] if in_order else raw[split].shuffle(seed=cfg.split_seed)).select(range(cap))
    for split, ds in raw.items():
        if len(ds) == 0:
            raise FinetuneError(f"the {split} split is empty; give it data, or raise data.max_*_samples")
    log.info("data: %s", ", ".join(f"{s}={len(d)}" for s, d in raw.items()))
    return raw


def load_split(cfg: DataConfig, task: Task) -> tuple[str, Dataset]:
    """One labelled split to score an exported model on (finetune.evaluate): the source's test split, else its
    validation split, else all its rows (a single file); canonical columns, labels encoded, data.max_test_samples."""
    raw = _load_source(cfg, task)
    source = next((s for s in ("test", "validation", "train") if s in raw), None)
    if source is None:
        raise FinetuneError("the data has no test, validation or train split to score; pass data=<file or directory>")
    split = "all" if source == "train" else source  # not training data: no training-only checks (e.g. two classes)
    ds = task.prepare(DatasetDict({split: _rename(raw[source], cfg, task, split)}), cfg)[split]
    if cfg.max_test_samples is not None and cfg.max_test_samples < len(ds):
        ds = ds.shuffle(seed=cfg.split_seed).select(range(cfg.max_test_samples))
    if len(ds) == 0:
        raise FinetuneError(f"the {split} data has no rows to score; check data= and its columns")
    return split, ds


def _load_source(cfg: DataConfig, task: Task) -> DatasetDict:
    files = {s: getattr(cfg, f"{s}_file") for s in SPLITS if getattr(cfg, f"{s}_file")}
    if not files and not cfg.source:
        raise FinetuneError(
            "no data given: pass data=<file, directory or Hub dataset id>, or data.train_file=... "
            f"(the task has no bundled default data){task.data_hint}"
        )
    dataset = data_hub_id(cfg, getattr(task, "file_formats", frozenset()))
    if dataset:
        return _load_hub(dataset, cfg)
    if not files:
        path = Path(assets.resolve(cfg.source)).expanduser()
        files = {"train": str(path)} if path.is_file() else _split_files(path)
    files = {s: str(Path(f).expanduser()) for s, f in files.items()}
    reader = getattr(task, "read_file", None)  # tasks with their own file formats (CoNLL, SQuAD)
    out = {}
    for split, f in files.items():
        ds = reader(f) if reader is not None else None
        out[split] = ds if ds is not None else _read_file(f, split, cfg.column_names)
    return DatasetDict(out)


def _split_files(directory: Path) -> dict[str, str]:
    files: dict[str, str] = {}
    for f in sorted(directory.iterdir()):
        stem = f.name.split(".")[0].lower()
        split = _SPLIT_ALIASES.get(stem)
        if f.is_file() and split and split not in files:
            files[split] = str(f)
    if "train" not in files:
        names = ", ".join(sorted(p.name for p in directory.iterdir())) or "nothing"
        raise FinetuneError(
            f"no train file in {directory} (found: {names}); name it train.<csv|tsv|json|jsonl|parquet> "
            "or pass data.train_file=..."
        )
    return files


def _read_file(path: str, split: str, column_names: list[str] | None = None) -> Dataset:
    fmt = file_format(path)
    if fmt not in BUILDERS:
        raise FinetuneError(f"cannot read {path}: unknown format '{fmt}'; use csv, tsv, json, jsonl or parquet")
    if Path(path).stat().st_size == 0:
        raise FinetuneError(f"the {split} split is empty: {path} is an empty file; give it data")
    kwargs = {"sep": "\t"} if fmt == ".tsv" else {}
    if column_names:
        if fmt not in (".csv", ".tsv"):
            raise FinetuneError(f"data.column_names names the columns of headerless csv/tsv files; {path} is "
                                f"{fmt[1:]}, which names its own: drop data.column_names")
        kwargs["column_names"] = list(column_names)  # (pandas then reads the first line as data)
    try:
        return datasets.load_dataset(BUILDERS[fmt], data_files={"train": path}, split="train", **kwargs)
    except Exception as e:  # datasets raises many types for a bad file; all mean the same to the user
        if "corresponds to no data" in str(e):
            raise FinetuneError(f"the {split} split is empty: {path} has no rows; give it data") from e
        # a bare DatasetGenerationError says only that something failed: the parser's error it wraps says what
        cause = (e.__cause__ or e.__context__ or e) if type(e) is DatasetGenerationError else e
        reason = str(cause).strip().splitlines()[-1] if str(cause).strip() else type(cause).__name__
        raise FinetuneError(f"cannot read {path} as {fmt[1:]}: {reason}; check the file's format") from e


def _load_hub(name: str, cfg: DataConfig) -> DatasetDict:
    offline = assets.hub_unreachable()
    before = datasets.config.HF_HUB_OFFLINE
    try:
        # unreachable: datasets' own offline mode reads its cache at once instead of retrying for a minute
        datasets.config.HF_HUB_OFFLINE = before or bool(offline)
        ds = datasets.load_dataset(name, cfg.hub_config)
    except Exception as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise data_error(name, reason, offline) from e
    finally:
        datasets.config.HF_HUB_OFFLINE = before
    renamed = {_SPLIT_ALIASES.get(s.lower(), s): d for s, d in ds.items()}
    return DatasetDict({s: d for s, d in renamed.items() if s in SPLITS})


def _keep_rows(ds: Dataset, cfg: DataConfig, split: str) -> Dataset:
    """data.keep_column / data.keep_values: keep only the rows whose value is one of the values."""
    if cfg.keep_column is None and cfg.keep_values is None:
        return ds
    if cfg.keep_column is None or not cfg.keep_values:
        raise FinetuneError("data.keep_column and data.keep_values go together: set both (keep_values=[a,b]) or neither")
    if cfg.keep_column not in ds.column_names:
        raise FinetuneError(f"column '{cfg.keep_column}' (data.keep_column) not found in the {split} data; available "
                            f"columns: {', '.join(ds.column_names)}")
    wanted = {str(v) for v in cfg.keep_values}
    kept = ds.filter(lambda value: str(value) in wanted, input_columns=cfg.keep_column)
    log.info("%s: kept %d of %d rows (%s in %s)", split, len(kept), len(ds), cfg.keep_column, sorted(wanted))
    return kept


def _rename(ds: Dataset, cfg: DataConfig, task: Task, split: str) -> Dataset:
    """Rename the user's columns to the task's canonical names; drop the rest (keeping the group column). A dotted
    name (input.messages) names a field nested in a column: the nested columns are flattened to such names. A field
    naming a list of columns makes its canonical column of lists: each row's values of those columns, in order."""
    sources = [getattr(cfg, field) for field in task.column_fields(cfg).values()]
    if any(isinstance(s, str) and "." in s and s not in ds.column_names for s in sources):
        ds = ds.flatten()
    mapping: dict[str, str] = {}
    gathered: dict[str, list] = {}
    for canonical, field in task.column_fields(cfg).items():
        source = getattr(cfg, field)
        if source is None and canonical not in task.optional_columns:
            raise FinetuneError(f"data.{field} is not set; name the column holding the {canonical}")
        if canonical in task.optional_columns and source not in ds.column_names:
            continue  # the task checks which of its optional columns it needs
        for column in (list(source) if isinstance(source, (list, ListConfig)) else [source]):
            if column not in ds.column_names:
                raise FinetuneError(
                    f"column '{column}' (data.{field}) not found in the {split} data; available columns: "
                    f"{', '.join(ds.column_names)}; set data.{field}=<{'some' if column != source else 'one'} of them>"
                )
        if isinstance(source, (list, ListConfig)):
            gathered[canonical] = [list(row) for row in zip(*(ds[c] for c in source))]
        else:
            mapping[source] = canonical
    keep = set(mapping) | ({cfg.group_column} if cfg.group_column else set())
    if cfg.group_column and cfg.group_column not in ds.column_names:
        raise FinetuneError(
            f"column '{cfg.group_column}' (data.group_column) not found in the {split} data; available "
            f"columns: {', '.join(ds.column_names)}"
        )
    ds = ds.remove_columns([c for c in ds.column_names if c not in keep])
    ds = ds.rename_columns({s: c for s, c in mapping.items() if s != c})
    for canonical, values in gathered.items():
        ds = ds.add_column(canonical, values)
    return ds


def _deduplicate(ds: Dataset, columns: tuple[str, ...]) -> Dataset:
    present = [c for c in columns if c in ds.column_names]
    dup = ds.select_columns(present).to_pandas().astype(str).duplicated().to_numpy()
    if dup.any():
        log.info("dropped %d duplicate rows", int(dup.sum()))
        ds = ds.select(np.flatnonzero(~dup))  # an index array: datasets fingerprints it much faster than a list
    return ds


def _make_splits(raw: DatasetDict, cfg: DataConfig, task: Task) -> DatasetDict:
    out = dict(raw)
    remaining = 1.0  # sizes are fractions of the original training data
    for split, size in (("test", cfg.test_size), ("validation", cfg.validation_size)):
        if split not in out:
            out["train"], out[split] = _hold_out(out["train"], size, remaining, cfg, task, split)
            remaining -= size
    if cfg.group_column:
        out = {s: d.remove_columns(cfg.group_column) for s, d in out.items()}
    return DatasetDict({s: out[s] for s in SPLITS})


def _hold_out(ds: Dataset, size: float, remaining: float, cfg: DataConfig, task: Task, split: str
              ) -> tuple[Dataset, Dataset]:
    if not 0 < size < remaining:
        raise FinetuneError(
            f"data.{split}_size must be above 0 and leave training data (got {size}) when the data has no {split} split"
        )
    size = size / remaining
    if getattr(task, "split_in_order", False):  # running text: held-out splits are the end, contiguous
        n = max(1, round(size * len(ds)))
        if n >= len(ds):
            raise FinetuneError(f"cannot hold out a {split} split from {len(ds)} rows; add more data or give a "
                                f"{split} file")
        return ds.select(range(len(ds) - n)), ds.select(range(len(ds) - n, len(ds)))
    if cfg.group_column:
        # sklearn's GroupShuffleSplit holds out whole groups (e.g. every review of a movie)
        from sklearn.model_selection import GroupShuffleSplit

        groups = ds[cfg.group_column][:]  # one list: sklearn reading datasets' lazy column row by row took seconds
        splitter = GroupShuffleSplit(n_splits=1, test_size=size, random_state=cfg.split_seed)
        keep, held = next(splitter.split(range(len(ds)), groups=groups))
        return ds.select(np.sort(keep)), ds.select(np.sort(held))
    stratify = task.stratify_column
    try:
        parts = ds.train_test_split(test_size=size, seed=cfg.split_seed, stratify_by_column=stratify)
    except ValueError as e:
        raise FinetuneError(f"cannot hold out a {split} split of {size:.0%} from {len(ds)} rows ({e}); add more data "
                            f"or give a {split} file") from e
    return parts["train"], parts["test"]
