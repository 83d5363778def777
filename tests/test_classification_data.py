"""task=classification's problem types: the problem type read from each shape of label column, the bad label shapes
refused with one line, the metrics and thresholds against scipy / scikit-learn, the loss of each problem type."""

from __future__ import annotations

import json
import logging

import numpy as np
import pandas as pd
import pytest

from finetune import data
from finetune.tasks import get_task
from helpers.cli import compose_cfg, fail

pytestmark = pytest.mark.usefixtures("one_thread")
NAMES = ["bad", "good", "odd"]
ROWS = [("a fine film", ["good"]), ("awful and odd", ["bad", "odd"]), ("nothing here", []), ("good good", ["good"]),
        ("odd one", ["odd"]), ("bad bad", ["bad"])] * 10


def load(*overrides):
    cfg = compose_cfg("task=classification", *overrides)
    task = get_task(cfg.task)
    return data.load(cfg.data, task), task


def label_sets(raw, task) -> list[list[str]]:
    return [[task.labels[i] for i in ids] for split in ("train", "validation", "test") for ids in raw[split]["label"]]


def _lists(path):
    pd.DataFrame({"text": [t for t, _ in ROWS], "tags": [tags for _, tags in ROWS]}).to_json(path, orient="records",
                                                                                          lines=True)


def _hub_parquet(path):  # a Hub dataset's shape: a list of ClassLabel ids (datasets keeps its features in parquet)
    from datasets import ClassLabel, Dataset, List

    ids = [[NAMES.index(t) for t in tags] for _, tags in ROWS]
    Dataset.from_dict({"text": [t for t, _ in ROWS], "tags": ids}).cast_column(
        "tags", List(ClassLabel(names=NAMES))).to_parquet(str(path))


def _separated(path):
    pd.DataFrame({"text": [t for t, _ in ROWS], "tags": [";".join(tags) for _, tags in ROWS]}).to_csv(path, index=False)


def _headerless_ids(path):  # GoEmotions' shape: text<TAB>ids<TAB>comment id, no header; names in a file
    lines = [f"{t}\t{','.join(str(NAMES.index(x)) for x in tags)}\tid{i}" for i, (t, tags) in enumerate(ROWS)]
    path.write_text("\n".join(lines) + "\n")
    (path.parent / "labels.txt").write_text("\n".join(NAMES) + "\n")


def _indicators(path):  # one 0/1 column a label (the Kaggle shape)
    pd.DataFrame({"text": [t for t, _ in ROWS], **{n: [int(n in tags) for _, tags in ROWS] for n in NAMES},
                  "other": 7}).to_csv(path, index=False)


@pytest.mark.parametrize("name, write, overrides", [
    ("d.jsonl", _lists, ["data.label_column=tags"]),
    ("d.parquet", _hub_parquet, ["data.label_column=tags"]),
    ("d.csv", _separated, ["data.label_column=tags", "data.label_separator=';'"]),
    ("d.tsv", _headerless_ids, ["data.column_names=[text,tags,id]", "data.label_column=tags",
                                "data.label_names_file={dir}/labels.txt"]),
    ("d.csv", _indicators, ["data.label_columns=[bad,good,odd]"]),
])
def test_multi_label_shapes_are_read_as_label_sets(tmp_path, caplog, name, write, overrides):
    write(tmp_path / name)
    caplog.set_level(logging.INFO)
    raw, task = load(f"data={tmp_path / name}", *[o.format(dir=tmp_path) for o in overrides])
    assert task.problem_type == "multi_label" and task.labels == NAMES and task.main_metric == "f1_macro"
    assert sorted(map(tuple, label_sets(raw, task))) == sorted(tuple(sorted(tags)) for _, tags in ROWS)
    assert "problem type: multi_label (" in caplog.text
    assert task.model_kwargs()["problem_type"] == "multi_label_classification"


def test_scores_are_regression_and_whole_numbers_single_label(tmp_path):
    rows = pd.DataFrame({"a": [f"first {i}" for i in range(40)], "b": [f"second {i}" for i in range(40)],
                         "score": [i % 5 + 0.25 for i in range(40)], "stars": [i % 3 for i in range(40)]})
    rows.to_csv(tmp_path / "d.csv", index=False)
    base = [f"data={tmp_path / 'd.csv'}", "data.text_column=a", "data.text_pair_column=b"]
    raw, task = load(*base, "data.label_column=score")
    assert task.problem_type == "regression" and task.main_metric == "pearson" and task.labels == ["score"]
    assert raw["train"].column_names == ["text", "text_pair", "label"]
    assert task.label_range == [min(raw["train"]["label"]), max(raw["train"]["label"])]
    assert task.model_kwargs()["num_labels"] == 1
    raw, task = load(*base, "data.label_column=stars")
    assert task.problem_type == "single_label" and task.labels == ["0", "1", "2"]
    _, task = load(*base, "data.label_column=stars", "task.problem_type=regression")  # a choice beats the guess
    assert task.problem_type == "regression"


def _write(path, text: str) -> str:
    path.write_text(text)
    return f"data={path}"


BAD = [
    ("multi.csv", "text,tags\n" + "a film,good;bad\nb film,good\n" * 10 + "c film,good;grim\n",
     ["data.label_column=tags", "data.label_separator=';'", "data.label_names=[bad,good]"],
     "train row 20: label 'grim' is not one of the 2 label names (bad, good); fix the row, or name every label in "
     "data.label_names (or data.label_names_file)"),
    ("ids.tsv", "a film\t0,1\nb film\t1\n" * 10 + "c film\t1,5\n",
     ["data.column_names=[text,label]", "data.label_names=[bad,good]"],
     "train row 20: label '5' is not one of the 2 label names (bad, good)"),
    ("lists.jsonl", "".join(json.dumps({"text": f"film {i}", "label": ["good"] if i != 7 else []}) + "\n"
                            for i in range(20)),
     ["task.problem_type=single_label"],
     "train row 7 has no label (an empty label set), but task.problem_type=single_label takes one a row: fix or drop "
     "the row, or set task.problem_type=multi_label"),
    ("scores.csv", "text,score\n" + "".join(f"film {i},{i / 3 if i != 11 else ''}\n" for i in range(20)),
     ["data.label_column=score"],
     "train row 11 has no score (column 'score'): fill it in or drop the row"),
    ("scores.csv", "text,score\n" + "".join(f"film {i},{i / 3 if i != 4 else 'high'}\n" for i in range(20)),
     ["data.label_column=score", "task.problem_type=regression"],
     "train row 4: score 'high' (column 'score') is not a finite number; fix the row or drop it"),
    ("flags.csv", "text,good,bad\n" + "".join(f"film {i},{1 if i != 3 else 2},0\n" for i in range(20)),
     ["data.label_columns=[good,bad]"],
     "train row 3: column 'good' (data.label_columns) holds 2; indicator columns hold 0 or 1 (or true / false): fix the "
     "row"),
    ("flags.csv", "text,good\n" + "".join(f"film {i},1\n" for i in range(20)),
     ["data.label_columns=[good,bad]"],
     "column 'bad' (data.label_columns) not found in the train data; available columns: text, good; set "
     "data.label_columns=<some of them>"),
    ("d.json", json.dumps([{"text": "a", "label": "x"}]), ["data.column_names=[text,label]"],
     "data.column_names names the columns of headerless csv/tsv files;"),
    ("d.csv", "text,label\na,b\n", ["data.label_columns=[a]", "task.problem_type=regression"],
     "data.label_columns (one 0/1 column a label) makes a multi_label problem, not task.problem_type=regression: set "
     "task.problem_type=multi_label or auto"),
    ("d.csv", "text,label\na,b\n", ["task.pos_weight=auto", "task.problem_type=single_label"],
     "task.pos_weight=auto applies to multi_label, but the problem type is single_label: drop it or set "
     "task.problem_type=multi_label"),
    ("d.csv", "text,label\n" + "a film,x\nb film,y\n" * 10, ["task.regression_loss=huber"],
     "task.regression_loss=huber applies to regression, but the problem type is single_label: drop it or set "
     "task.problem_type=regression"),
    ("d.csv", "text,label\na,b\n", ["task.problem_type=multilabel"],
     "task.problem_type must be one of single_label, multi_label, regression, auto (got 'multilabel')"),
    ("d.csv", "text,label\na,b\n", ["task.problem_type=regression", "task.best_metric=f1_macro"],
     "task.best_metric='f1_macro' is not a metric of problem type regression: choose one of pearson, spearman"),
]


@pytest.mark.parametrize("name, content, overrides, message", BAD, ids=[m[:40] for *_, m in BAD])
def test_bad_label_shapes_are_one_line_errors(tmp_path, monkeypatch, capfd, tiny_bert, name, content, overrides,
                                              message):
    source = _write(tmp_path / name, content)
    error = fail(["task=classification", f"model={tiny_bert}", source, *overrides], tmp_path, monkeypatch, capfd)
    assert error.startswith(message), error


def test_tuned_thresholds_beat_one_half_on_held_out_rows():
    """A planted calibration: label 0's positives score around 0.3, label 1's around 0.7, its negatives around 0.55.
    Thresholds tuned on one sample decide a second sample better than 0.5 does (per label and global)."""
    from finetune.metrics import multilabel_metrics, tune_thresholds

    def sample(seed, n=400):
        rng = np.random.default_rng(seed)
        truth = rng.random((n, 2)) < [0.2, 0.5]
        centre = np.where(truth, [0.3, 0.7], [0.1, 0.55])
        return truth, np.clip(centre + rng.normal(0, 0.05, (n, 2)), 0, 1)

    validation, test = sample(0), sample(1)
    per_label = tune_thresholds(*validation)
    assert 0.15 < per_label[0] < 0.3 and 0.55 < per_label[1] < 0.7
    one = tune_thresholds(*validation, per_label=False)
    assert len(set(one)) == 1 and round(one[0], 2) == one[0]
    f1 = {name: multilabel_metrics(test[0], test[1] >= t, ["a", "b"])["f1_macro"]
          for name, t in (("half", 0.5), ("per_label", per_label), ("global", one))}
    assert f1["half"] < 0.4 < 0.75 < f1["global"] < f1["per_label"]  # 0.35, 0.80, 0.92
    # a label without a positive keeps 0.5; every cut leaves tied scores on one side
    assert tune_thresholds(np.array([[0], [0]]), np.array([[0.9], [0.2]]))[0] == 0.5
    assert tune_thresholds(np.array([[1], [0], [0]]), np.array([[0.8], [0.8], [0.1]]), min_positives=1)[0] == \
        pytest.approx(0.45)


def test_each_threshold_is_its_labels_best_and_rare_labels_take_the_global_one():
    """Every per-label threshold reaches the best F1 any threshold gives its label (brute force over the scores); a
    label with fewer positives than min_positives (here one the model ranks at the bottom, 5 of 400) takes the global
    threshold instead of a low cut that predicts it for most rows."""
    from finetune.metrics import tune_thresholds

    def f1_score(truth, predicted):
        return 2 * (truth & predicted).sum() / (truth.sum() + predicted.sum())

    rng = np.random.default_rng(0)
    truth = np.column_stack([rng.random(400) < 0.3, rng.random(400) < 0.25, np.arange(400) % 80 == 0])
    scores = np.column_stack([np.where(truth[:, 0], 0.6, 0.3), np.where(truth[:, 1], 0.4, 0.2), np.full(400, 0.05)])
    scores = np.clip(scores + rng.normal(0, 0.1, scores.shape), 0, 1)
    scores[:, 2] = rng.random(400) * 0.1  # label 2: never learned, its 5 positives among the lowest scores
    scores[truth[:, 2], 2] /= 20
    own = tune_thresholds(truth, scores, min_positives=1)
    for j in range(3):
        best = max(f1_score(truth[:, j], scores[:, j] >= t) for t in scores[:, j])
        assert f1_score(truth[:, j], scores[:, j] >= own[j]) == pytest.approx(best)
    assert (scores[:, 2] >= own[2]).mean() > 0.8  # the rare label's own best cut predicts it for most rows
    floored = tune_thresholds(truth, scores)  # min_positives=20
    shared = tune_thresholds(truth, scores, per_label=False)[0]
    assert list(floored[:2]) == list(own[:2]) and floored[2] == shared and not (scores[:, 2] >= shared).any()


def test_metrics_against_scipy_and_sklearn():
    from scipy.stats import pearsonr, spearmanr
    from sklearn.metrics import f1_score

    from finetune.metrics import multilabel_metrics, regression_metrics

    rng = np.random.default_rng(3)
    truth = rng.normal(2.5, 1, 200)
    pred = truth + rng.normal(0, 0.7, 200)
    got = regression_metrics(truth, pred)
    assert got["pearson"] == pytest.approx(pearsonr(truth, pred)[0]) == pytest.approx(np.corrcoef(truth, pred)[0, 1])
    assert got["spearman"] == pytest.approx(spearmanr(truth, pred)[0])
    assert got["mse"] == pytest.approx(np.mean((truth - pred) ** 2)) and got["mae"] == pytest.approx(
        np.mean(np.abs(truth - pred)))
    assert regression_metrics(truth, np.full(200, 2.0))["pearson"] == 0.0  # constant predictions: no correlation
    y, p = np.array([[1, 0, 1], [0, 0, 0], [1, 1, 0]]), np.array([[1, 0, 0], [0, 0, 0], [1, 1, 0]])
    m = multilabel_metrics(y, p, ["a", "b", "c"])
    assert m["f1_micro"] == pytest.approx(2 * 3 / (2 * 3 + 1)) and m["f1_macro"] == pytest.approx((1 + 1 + 0) / 3)
    assert m["f1_samples"] == pytest.approx((2 / 3 + 1 + 1) / 3)  # the empty row predicted empty counts as right
    assert m["exact_match"] == pytest.approx(2 / 3) and m["recall_c"] == 0 and m["precision_a"] == 1
    assert m["f1_macro"] == pytest.approx(f1_score(y, p, average="macro"))


@pytest.mark.parametrize("problem, extra", [("multi_label", []), ("multi_label", ["task.pos_weight=auto"]),
                                            ("regression", []), ("regression", ["task.regression_loss=huber"])])
def test_the_loss_sums_items_and_divides_by_the_step(tiny_bert, problem, extra):
    """A batch's loss is its items' summed loss over the step's items: with the batch alone, the mean loss
    transformers' own heads compute (BCE on multi-hot rows, MSE), with pos_weight / Huber as torch defines them."""
    import torch
    import torch.nn.functional as F
    from datasets import Dataset, DatasetDict

    cfg = compose_cfg("task=classification", f"model={tiny_bert}", f"task.problem_type={problem}", *extra)
    task = get_task(cfg.task)
    task.labels = NAMES if problem == "multi_label" else ["score"]
    model = task.load_model(str(tiny_bert), cfg.model)
    tokenizer = task.load_tokenizer(str(tiny_bert), cfg.model)
    labels = torch.tensor([[1.0, 0, 1], [0, 0, 0], [0, 1, 0], [1, 0, 0]]) if problem == "multi_label" else \
        torch.tensor([0.5, 3.0, 1.5, 4.0])
    batch = {**tokenizer(["good film", "bad", "odd plot", "fine"], padding=True, return_tensors="pt"), "labels": labels}
    rows = DatasetDict({"train": Dataset.from_dict({"labels": labels.tolist() * 3})})
    task.prepare_training(model, cfg.trainer, rows)
    loss, outputs = task.loss(model, batch, task.items(batch))
    logits = outputs.logits.detach()
    if problem == "regression":
        fn = F.huber_loss if "huber" in str(extra) else F.mse_loss
        expected = fn(logits.squeeze(-1), labels)
        assert task.items(batch) == 4
    else:
        weight = torch.tensor([(12 - 6) / 6, (12 - 3) / 3, (12 - 3) / 3]) if extra else None
        expected = F.binary_cross_entropy_with_logits(logits, labels, pos_weight=weight)
        assert task.items(batch) == 12
    if not extra:
        assert torch.allclose(model(**batch).loss, expected)  # transformers' own loss for the problem type
    assert torch.allclose(loss, expected)
    half, _ = task.loss(model, {k: v[:2] for k, v in batch.items()}, task.items(batch))  # two micro-batches of a step
    rest, _ = task.loss(model, {k: v[2:] for k, v in batch.items()}, task.items(batch))
    assert torch.allclose(half + rest, expected, atol=1e-6)


def test_a_sweep_knows_each_problem_types_objective():
    from finetune.tasks import task_class

    cls = task_class("classification")
    assert cls.main_metric_of(compose_cfg("task=sentiment").task) == "accuracy"
    assert cls.main_metric_of(compose_cfg("hparams_search=multi_label_optuna").task) == "f1_macro"
    assert cls.main_metric_of(compose_cfg("hparams_search=regression_optuna").task) == "pearson"
    cfg = compose_cfg("task=classification", "task.problem_type=multi_label", "task.best_metric=f1_micro")
    assert cls.main_metric_of(cfg.task) == get_task(cfg.task).main_metric == "f1_micro"
