import json

import pandas as pd
import pytest

from finetune import data
from finetune.errors import FinetuneError
from finetune.tasks import get_task
from helpers.cli import compose_cfg
from helpers.data import make_sentences


def load(*overrides):
    cfg = compose_cfg(*overrides)
    task = get_task(cfg.task)
    return data.load(cfg.data, task), task


def write_rows(path, rows, columns=("review", "sentiment")):
    df = pd.DataFrame(rows, columns=list(columns))
    fmt = data.file_format(path)
    if fmt == ".csv":
        df.to_csv(path, index=False)
    elif fmt == ".tsv":
        df.to_csv(path, index=False, sep="\t")
    elif fmt == ".json":
        path.write_text(json.dumps(df.to_dict(orient="records")))
    elif fmt == ".jsonl":
        df.to_json(path, orient="records", lines=True)
    elif fmt == ".parquet":
        df.to_parquet(path)
    return path


@pytest.mark.parametrize("name", ["d.csv", "d.tsv", "d.json", "d.jsonl", "d.parquet"])
def test_formats_and_column_mapping(tmp_path, name):
    path = write_rows(tmp_path / name, make_sentences(100))
    raw, task = load(f"data={path}", "data.text_column=review", "data.label_column=sentiment")
    assert set(raw) == {"train", "validation", "test"}
    assert [len(raw[s]) for s in ("train", "validation", "test")] == [80, 10, 10]
    assert raw["train"].column_names == ["text", "label"]
    assert task.labels == ["neg", "pos"]  # string labels, sorted
    texts = {t for s in raw.values() for t in s["text"]}
    assert len(texts) == 100  # splits are disjoint and complete


def test_split_is_stratified_and_seeded(tmp_path):
    rows = make_sentences(200)
    rows = [(t, "pos") for t, _ in rows[:150]] + [(t, "neg") for t, _ in rows[150:]]  # 75% / 25%
    path = write_rows(tmp_path / "d.csv", rows)
    over = (f"data={path}", "data.text_column=review", "data.label_column=sentiment")
    raw, task = load(*over)
    neg = task.labels.index("neg")
    for split in ("validation", "test"):
        assert raw[split]["label"].count(neg) == 5  # 25% of 20
    again, _ = load(*over, "seed=7")  # the training seed does not move the held-out rows
    assert again["test"]["text"] == raw["test"]["text"]
    other, _ = load(*over, "data.split_seed=1")
    assert other["test"]["text"] != raw["test"]["text"]


def test_group_split_keeps_groups_apart(tmp_path):
    rows = [(t, l, f"movie{i % 23}") for i, (t, l) in enumerate(make_sentences(230))]
    path = write_rows(tmp_path / "d.csv", rows, columns=("review", "sentiment", "movie"))
    raw, _ = load(f"data={path}", "data.text_column=review", "data.label_column=sentiment", "data.group_column=movie")
    df = pd.read_csv(path)
    movie_of = dict(zip(df.review, df.movie))
    movies = {s: {movie_of[t] for t in raw[s]["text"]} for s in raw}
    assert not movies["train"] & movies["test"] and not movies["train"] & movies["validation"]
    assert not movies["validation"] & movies["test"]
    assert "movie" not in raw["train"].column_names


def test_integer_labels_named_and_text_pair(tmp_path):
    rows = [(t, t.split()[0], int(l == "pos")) for t, l in make_sentences(60)]
    path = write_rows(tmp_path / "d.jsonl", rows, columns=("premise", "hypothesis", "y"))
    raw, task = load(f"data={path}", "data.text_column=premise", "data.text_pair_column=hypothesis",
                     "data.label_column=y", "data.label_names=[negative,positive]")
    assert raw["train"].column_names == ["text", "text_pair", "label"]
    assert task.labels == ["negative", "positive"]
    assert raw["train"].features["label"].names == ["negative", "positive"]


def test_label_names_filter_and_order(tmp_path):
    rows = make_sentences(90) + [("a plot synopsis", "plot")] * 5
    path = write_rows(tmp_path / "d.csv", rows)
    raw, task = load(f"data={path}", "data.text_column=review", "data.label_column=sentiment",
                     "data.label_names=[pos,neg]")
    assert task.labels == ["pos", "neg"]
    assert sum(len(s) for s in raw.values()) == 90


def test_explicit_split_files_and_caps(tmp_path):
    for split, n in (("train", 50), ("dev", 12), ("test", 14)):
        write_rows(tmp_path / f"{split}.csv", make_sentences(n, seed=n))
    raw, _ = load(f"data={tmp_path}", "data.text_column=review", "data.label_column=sentiment",
                  "data.max_train_samples=20", "data.max_eval_samples=5")
    assert [len(raw[s]) for s in ("train", "validation", "test")] == [20, 5, 14]


def test_duplicates_dropped_when_asked(tmp_path):
    rows = make_sentences(40)
    path = write_rows(tmp_path / "d.csv", rows + rows[:10])
    over = (f"data={path}", "data.text_column=review", "data.label_column=sentiment")
    assert sum(len(s) for s in load(*over)[0].values()) == 50
    assert sum(len(s) for s in load(*over, "data.deduplicate=true")[0].values()) == 40


# --- errors: one line that names the fix ----------------------------------------------------------

def test_missing_column_lists_available(tmp_path):
    path = write_rows(tmp_path / "d.csv", make_sentences(20))
    with pytest.raises(FinetuneError, match=r"column 'txt' \(data.text_column\) not found .* available columns: "
                                            r"review, sentiment; set data.text_column="):
        load(f"data={path}", "data.text_column=txt", "data.label_column=sentiment")


def test_one_class(tmp_path):
    path = write_rows(tmp_path / "d.csv", [(t, "pos") for t, _ in make_sentences(30)])
    with pytest.raises(FinetuneError, match="one class in the training data \\('pos'\\)"):
        load(f"data={path}", "data.text_column=review", "data.label_column=sentiment")


def test_empty_split(tmp_path):
    write_rows(tmp_path / "train.csv", make_sentences(30))
    write_rows(tmp_path / "test.csv", [])
    with pytest.raises(FinetuneError, match="the test split is empty"):
        load(f"data={tmp_path}", "data.text_column=review", "data.label_column=sentiment")


def test_unreadable_and_missing_files(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(FinetuneError, match=r"cannot read .*bad.json as json: .*check the file's format"):
        load(f"data={bad}")
    with pytest.raises(FinetuneError, match="data file or directory not found: ./nope.csv"):
        load("data=./nope.csv")
    odd = tmp_path / "d.xlsx"
    odd.write_text("x")
    with pytest.raises(FinetuneError, match="unknown format '.xlsx'"):
        load(f"data={odd}")
    with pytest.raises(FinetuneError, match="no train file in"):
        load(f"data={tmp_path / 'empty'}") if (tmp_path / "empty").mkdir() is None else None


def test_bad_integer_labels(tmp_path):
    path = write_rows(tmp_path / "d.csv", [(t, 5 + i % 2) for i, (t, _) in enumerate(make_sentences(30))])
    with pytest.raises(FinetuneError, match="integer labels must be 0..K-1"):
        load(f"data={path}", "data.text_column=review", "data.label_column=sentiment")


def test_no_train_split(tmp_path):
    path = write_rows(tmp_path / "t.csv", make_sentences(20))
    with pytest.raises(FinetuneError, match=r"the data has no train split \(found: test\); add one"):
        load("data=custom", f"data.test_file={path}", "data.text_column=review", "data.label_column=sentiment")


def test_keep_rows_filter(tmp_path):
    rows = [(t, ["pos", "neg", "plot"][i % 3]) for i, (t, _) in enumerate(make_sentences(150))]
    path = write_rows(tmp_path / "d.csv", rows)
    over = (f"data={path}", "data.text_column=review", "data.label_column=sentiment")
    raw, task = load(*over, "data.keep_column=sentiment", "data.keep_values=[pos,neg]")
    assert task.labels == ["neg", "pos"] and sum(len(s) for s in raw.values()) == 100
    with pytest.raises(FinetuneError, match=r"column 'kind' \(data.keep_column\) not found in the train data"):
        load(*over, "data.keep_column=kind", "data.keep_values=[pos]")
    with pytest.raises(FinetuneError, match="data.keep_column and data.keep_values go together"):
        load(*over, "data.keep_values=[pos]")
