"""The label column of task=classification in the shapes people bring, read for one problem type; a new head's prior.

    single_label   one class a row: names, ids 0..K-1, a ClassLabel, or a list holding one label
    multi_label    several labels a row: lists (json, jsonl, parquet, Hub datasets), strings separated by
                   data.label_separator ("3,27" or "joy,love": ids or names), or one 0/1 column a label
                   (data.label_columns, gathered by finetune/data.py into a list a row)
    regression     one number a row

A bad row stops the run with one line naming the row (its index in its split, from 0) and the fix.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from finetune.errors import FinetuneError

if TYPE_CHECKING:
    from datasets import DatasetDict

log = logging.getLogger(__name__)

SINGLE, MULTI, REGRESSION = "single_label", "multi_label", "regression"
_TRUE, _FALSE = {"1", "1.0", "true", "yes"}, {"0", "0.0", "false", "no", ""}


def check_applies(cfg, problem: str) -> None:
    """A setting changed from its default for another problem type would do nothing: refused."""
    for key, default, owner in (("thresholds", "per_label", MULTI), ("pos_weight", "none", MULTI),
                                ("regression_loss", "mse", REGRESSION)):
        if problem not in (owner, "auto") and cfg[key] != default:
            raise FinetuneError(f"task.{key}={cfg[key]} applies to {owner}, but the problem type is {problem}: drop it "
                                f"or set task.problem_type={owner}")


def check_data_config(data, problem: str) -> None:
    """The data.* label keys of task=classification, for problem type `problem` (or auto)."""
    if data.label_names and data.label_names_file:
        raise FinetuneError("data.label_names and data.label_names_file both name the labels: keep one")
    if data.label_columns is not None:
        if problem in (SINGLE, REGRESSION):
            raise FinetuneError(f"data.label_columns (one 0/1 column a label) makes a multi_label problem, not "
                                f"task.problem_type={problem}: set task.problem_type=multi_label or auto")
        if not data.label_columns or len(set(data.label_columns)) < len(data.label_columns):
            raise FinetuneError("data.label_columns must name distinct columns, one a label: "
                                "data.label_columns=[toxic,obscene,insult]")
    if not data.label_separator:
        raise FinetuneError("data.label_separator must not be empty (the default is ',')")


def label_names(data_cfg) -> list[str] | None:
    """data.label_names, or the lines of data.label_names_file; None when neither is given."""
    if data_cfg.label_names:
        return [str(n) for n in data_cfg.label_names]
    if not data_cfg.get("label_names_file"):
        return None
    path = Path(data_cfg.label_names_file).expanduser()
    if not path.is_file():
        raise FinetuneError(f"data.label_names_file not found: {path}; give a text file with one label name a line")
    names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not names or len(set(names)) < len(names):
        raise FinetuneError(f"data.label_names_file {path} must hold one distinct label name a line (found "
                            f"{len(names)} names, {len(names) - len(set(names))} repeated)")
    return names


def is_list(feature) -> bool:
    from datasets import LargeList, List

    return isinstance(feature, (List, LargeList))


def infer(raw: DatasetDict, data_cfg) -> tuple[str, str]:
    """(problem type, why) from the label column's type and values."""
    from datasets import ClassLabel

    feature = next(iter(raw.values())).features["label"]
    if data_cfg.get("label_columns"):
        return MULTI, "data.label_columns names one 0/1 column a label"
    if is_list(feature):
        return MULTI, "the label column holds lists of labels"
    if isinstance(feature, ClassLabel) or feature.dtype.startswith(("int", "uint", "bool")):
        return SINGLE, "the label column holds one class id a row"
    values = [v for ds in raw.values() for v in ds["label"] if v is not None]
    if feature.dtype.startswith("float"):
        if any(not math.isnan(v) and not float(v).is_integer() for v in values):
            return REGRESSION, "the labels are numbers with fractions"
        return SINGLE, "the labels are whole numbers: class ids"
    sep = data_cfg.label_separator
    sample = next((v for v in values if sep in str(v)), None)
    if sample is not None:
        return MULTI, f"labels such as {sample!r} hold several, separated by data.label_separator={sep!r}"
    numbers = [n for n in map(_number, values) if n is not None]
    if len(numbers) > len(values) / 2 and any(not n.is_integer() for n in numbers):
        return REGRESSION, "the labels are mostly numbers with fractions"
    return SINGLE, "the labels are names, one a row"


def _number(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def single_of_lists(raw: DatasetDict) -> dict[str, list]:
    """single_label from a column of lists: each row's one label (a row with none or several is refused)."""
    out = {}
    for split, ds in raw.items():
        out[split] = []
        for i, labels in enumerate(ds["label"]):
            if len(labels) != 1:
                what = "no label (an empty label set)" if not labels else f"{len(labels)} labels"
                raise FinetuneError(f"{split} row {i} has {what}, but task.problem_type=single_label takes one a row: "
                                    "fix or drop the row, or set task.problem_type=multi_label")
            out[split].append(labels[0])
    return out


def multi_label_ids(raw: DatasetDict, data_cfg, names: list[str] | None) -> tuple[dict[str, list], list[str]]:
    """({split: [the label ids of each row]}, the label names in id order). An empty label set is a row with none
    of the labels; a label outside the names is refused."""
    from datasets import ClassLabel

    feature = next(iter(raw.values())).features["label"]
    inner = feature.feature if is_list(feature) else feature
    if data_cfg.get("label_columns"):
        columns = [str(c) for c in data_cfg.label_columns]
        names = _same_count(names or columns, len(columns), "data.label_columns")
        return {split: [_indicators(f"{split} row {i}", columns, row) for i, row in enumerate(ds["label"])]
                for split, ds in raw.items()}, names
    if isinstance(inner, ClassLabel):
        names = _same_count(names or inner.names, inner.num_classes, "the label column's classes")
        return {split: [sorted(set(_as_list(v))) for v in ds["label"]] for split, ds in raw.items()}, names
    sep = data_cfg.label_separator
    tokens = {split: [_tokens(f"{split} row {i}", v, sep) for i, v in enumerate(ds["label"])]
              for split, ds in raw.items()}
    found = {t for rows in tokens.values() for row in rows for t in row}
    by_id = not (names and found <= set(names)) and bool(found) and all(t.isdigit() for t in found)
    if by_id:  # ids: 0 .. K-1, named by data.label_names (or the file) when given
        names = names or [str(i) for i in range(max(int(t) for t in found) + 1)]
    else:
        names = names or sorted(found)
    index = {name: i for i, name in enumerate(names)}
    ids: dict[str, list] = {}
    for split, rows in tokens.items():
        ids[split] = []
        for i, row in enumerate(rows):
            for t in row:
                if (by_id and int(t) >= len(names)) or (not by_id and t not in index):
                    raise FinetuneError(
                        f"{split} row {i}: label {t!r} is not one of the {len(names)} label names "
                        f"({', '.join(names[:8])}{', ...' if len(names) > 8 else ''}); fix the row, or name every "
                        "label in data.label_names (or data.label_names_file)")
            ids[split].append(sorted({int(t) if by_id else index[t] for t in row}))
    return ids, names


def _same_count(names: list[str], count: int, what: str) -> list[str]:
    if len(names) != count:
        raise FinetuneError(f"data.label_names has {len(names)} names but {what} give {count} labels; give one name a "
                            "label, in order, or drop data.label_names")
    return names


def _as_list(value: Any) -> list:
    return [] if value is None else list(value) if isinstance(value, (list, tuple)) else [value]


def _tokens(where: str, value: Any, sep: str) -> list[str]:
    """A row's labels as strings: a list's items, a separated string's parts, a whole number; None: no label."""
    if isinstance(value, str):
        return [t.strip() for t in value.split(sep) if t.strip()]
    out = []
    for item in _as_list(value):
        if isinstance(item, float) and not item.is_integer():
            raise FinetuneError(f"{where}: label {item!r} is a number with a fraction, not a label; fix the row, or "
                                "set task.problem_type=regression for a score")
        out.append(str(int(item)) if isinstance(item, (int, float)) and not isinstance(item, bool) else str(item).strip())
    return [t for t in out if t]


def _indicators(where: str, columns: list[str], values: list) -> list[int]:
    """The label ids whose indicator column holds 1 (or true) in this row."""
    ids = []
    for i, (column, value) in enumerate(zip(columns, values)):
        text = str(value).strip().lower() if value is not None else None
        if text not in _TRUE | _FALSE:
            raise FinetuneError(f"{where}: column '{column}' (data.label_columns) holds {value!r}; indicator columns "
                                "hold 0 or 1 (or true / false): fix the row")
        if text in _TRUE:
            ids.append(i)
    return ids


def scores(raw: DatasetDict, column: str) -> dict[str, list[float]]:
    """regression: each row's number; a row without one, or with something else, is refused."""
    if is_list(next(iter(raw.values())).features["label"]):
        raise FinetuneError(f"the label column '{column}' holds lists; task.problem_type=regression takes one number "
                            "a row (multi_label reads lists)")
    out = {}
    for split, ds in raw.items():
        out[split] = []
        for i, value in enumerate(ds["label"]):
            number = _number(value) if not isinstance(value, bool) else None
            if value is None or (isinstance(value, str) and not value.strip()) or \
                    (isinstance(value, float) and math.isnan(value)):
                raise FinetuneError(f"{split} row {i} has no score (column '{column}'): fill it in or drop the row")
            if number is None:
                raise FinetuneError(f"{split} row {i}: score {value!r} (column '{column}') is not a finite number; fix "
                                    "the row or drop it")
            out[split].append(number)
    return out


def single_label(raw: DatasetDict, wanted: list[str] | None) -> tuple[DatasetDict, list[str]]:
    """single_label: the label column as a ClassLabel of the names (given, or found: ids 0..K-1, or sorted names);
    rows with a name outside data.label_names are dropped."""
    from datasets import ClassLabel, Value

    feature = next(iter(raw.values())).features["label"]
    if is_list(feature):
        raw = replace_labels(raw, single_of_lists(raw), feature.feature)
        feature = feature.feature
    elif feature.dtype.startswith("float"):  # whole numbers read as floats (a column with gaps): class ids
        raw = raw.cast_column("label", Value("int64"))
        feature = Value("int64")
    if isinstance(feature, ClassLabel):
        labels = wanted or feature.names
        if len(labels) != feature.num_classes:
            raise FinetuneError(
                f"data.label_names has {len(labels)} names but the label column has {feature.num_classes} "
                f"classes ({', '.join(feature.names)}); give one name per class or drop data.label_names"
            )
        raw = raw.cast_column("label", ClassLabel(names=labels))
    elif feature.dtype.startswith("int"):
        ids = sorted({int(v) for split in raw.values() for v in split.unique("label")})
        if ids[0] < 0 or ids[-1] >= max(len(ids), len(wanted or [])):
            raise FinetuneError(
                f"integer labels must be 0..K-1, found {ids[:10]}; re-number them or use string labels"
            )
        labels = wanted or [str(i) for i in range(ids[-1] + 1)]
        raw = raw.cast_column("label", ClassLabel(names=labels))
    else:
        raw = raw.cast_column("label", Value("string"))
        found = sorted({v for split in raw.values() for v in split.unique("label")})
        if wanted:
            unknown = sorted(set(found) - set(wanted))
            if not set(found) & set(wanted):
                raise FinetuneError(f"no rows have a label in data.label_names ({', '.join(wanted)}); the labels "
                                    f"are {', '.join(found[:20])}: name those, or drop data.label_names")
            if unknown:
                log.info("dropping rows labelled %s (not in data.label_names)", unknown)
                raw = raw.filter(lambda row: row["label"] in wanted)
        labels = wanted or found
        raw = raw.cast_column("label", ClassLabel(names=labels))
    if "train" in raw and len(present := sorted(set(raw["train"]["label"]))) < 2:
        only = labels[present[0]] if present else "none"
        raise FinetuneError(
            f"the label column has one class in the training data ('{only}'); a classifier needs at least two: "
            "check data.label_column"
        )
    return raw, labels


def replace_labels(raw: DatasetDict, values: dict[str, list], feature) -> DatasetDict:
    from datasets import DatasetDict

    return DatasetDict({split: ds.remove_columns("label").add_column("label", values[split], feature=feature)
                        for split, ds in raw.items()})


def multi_label_feature(labels: list[str]):
    from datasets import ClassLabel, List

    return List(ClassLabel(names=labels))


def start_at_prior(model, log_odds) -> None:
    """A new multi-label head's output bias starts at each label's log prior odds, not at 0 (sigmoid 0.5 for a rare
    label: the first steps unlearn it, and rare labels never rise again; docs/tasks/classification.md#multi-label)."""
    import torch

    from finetune.adapters import new_parameters

    new = new_parameters(model)
    biases = [p for n, p in model.named_parameters() if n in new and n.endswith("bias") and p.shape == log_odds.shape]
    if biases:  # the last is the output layer's (a head from a fine-tuned checkpoint is not new: left as it is)
        with torch.no_grad():
            biases[-1].copy_(torch.as_tensor(log_odds, dtype=biases[-1].dtype))
        log.info("multi_label: the new head's bias starts at the labels' log prior odds (%.2f to %.2f)",
                 log_odds.min(), log_odds.max())
