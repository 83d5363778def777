"""python -m finetune.predict and python -m finetune.evaluate on exported models: every input format streamed in
chunks, the same predictions as the pipeline itself, one-line errors that leave no output behind, NER and QA
records, and evaluation through the export check's path."""

from __future__ import annotations

import json

import pandas as pd
import pytest
from datasets import Dataset, DatasetDict

from helpers.cli import compose_cfg, run_main
from helpers.data import make_ner, make_sentences, read_jsonl, write_conll

pytestmark = pytest.mark.usefixtures("one_thread")


def texts(n: int = 40) -> list[str]:
    return [t for t, _ in make_sentences(n, seed=7)]


@pytest.fixture(scope="module")
def direct(pushed_run):
    """What the exported pipeline itself says about texts(): the reference for predict."""
    from transformers import pipeline

    clf = pipeline("text-classification", model=str(pushed_run.run_dir / "model"))
    return clf(texts(), top_k=None, truncation=True)


@pytest.mark.slow
def test_predict_cli_on_a_run_directory(pushed_run, direct, tmp_path, monkeypatch, capsys, caplog):
    import logging

    from finetune import predict

    caplog.set_level(logging.INFO)  # (in this process the log lines reach pytest's handler, not stderr)
    pd.DataFrame({"review": texts(), "other": range(40)}).to_csv(tmp_path / "new.csv", index=False)
    monkeypatch.chdir(tmp_path)
    code = run_main(predict, [str(pushed_run.run_dir), "new.csv", "--batch-size", "4"])
    err = capsys.readouterr().err
    assert code == 0, err[-2000:]
    out = read_jsonl(tmp_path / "new.predictions.jsonl")  # the default output name
    assert [r["label"] for r in out] == [d[0]["label"] for d in direct]
    for record, expected in zip(out, direct):
        assert record["score"] == pytest.approx(expected[0]["score"], abs=1e-6)
        assert record["scores"] == pytest.approx({d["label"]: d["score"] for d in expected}, abs=1e-6)
    assert "wrote 40 predictions" in caplog.text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["new.csv", "new.predictions.jsonl"]  # no temp files left


def write_formats(folder) -> list:
    rows = [{"review": t} for t in texts()]
    frame = pd.DataFrame(rows)
    frame.to_csv(folder / "a.tsv.gz", sep="\t", index=False)
    frame.to_parquet(folder / "a.parquet")
    (folder / "a.jsonl.bz2").write_bytes(__import__("bz2").compress(
        "".join(json.dumps(r) + "\n" for r in rows).encode()))
    (folder / "a.json").write_text(json.dumps(rows, indent=1))
    (folder / "a.txt").write_text("".join(t + "\n" for t in texts()))
    return ["a.tsv.gz", "a.parquet", "a.jsonl.bz2", "a.json", "a.txt"]


@pytest.mark.slow
def test_every_input_format_gives_the_same_predictions(pushed_run, direct, tmp_path):
    from finetune import predict

    for name in write_formats(tmp_path):
        out = tmp_path / f"{name}.jsonl"
        assert run_main(predict, [str(pushed_run.run_dir / "model"), str(tmp_path / name), "--output", str(out),
                                  "--batch-size", "2"]) == 0, name
        assert [r["label"] for r in read_jsonl(out)] == [d[0]["label"] for d in direct], name


def test_input_is_read_in_chunks(tmp_path):
    """A file is never read whole: chunks of at most chunk_rows rows, progress growing as the file is read; a JSON
    array is decoded item by item even when items straddle read blocks."""
    from finetune.predict import _json_array, read_rows

    frame = pd.DataFrame({"review": [f"row {i} " + "x" * 60 for i in range(10_000)]})  # 700 KB
    frame.to_csv(tmp_path / "big.csv", index=False)
    (tmp_path / "big.jsonl").write_text(frame.to_json(orient="records", lines=True))
    for name in ("big.csv", "big.jsonl"):
        chunks, total, unit = read_rows(tmp_path / name, ["review"], chunk_rows=1000)
        sizes, positions = zip(*[(len(c["review"]), done) for c, done in chunks])
        assert unit == "B" and total == (tmp_path / name).stat().st_size
        assert set(sizes) == {1000} and len(sizes) == 10, name
        # the reader's buffered position (pandas reads 256 KB at a time): it grows, not the whole file at once
        assert list(positions) == sorted(positions) and positions[-1] == total and positions[0] < total / 2, name
    import io

    items = [{"text": "a" * n, "n": n} for n in range(60)]
    assert list(_json_array(io.StringIO(json.dumps(items)), block=16)) == items


@pytest.mark.parametrize("content, args, message", [
    ("body\nfine film\n", [], "column 'review' not found in {path}; available columns: body"),
    ("review,n\ngreat,1\n,2\nawful,3\n", [], "{path} row 2 has no text (column 'review'); fill it or drop the row"),
    ("body\nfine film\n", ["--text-column", "nope"], "column 'nope' not found"),
])
@pytest.mark.slow
def test_predict_errors_are_one_line_and_leave_nothing(pushed_run, tmp_path, capsys, content, args, message):
    from finetune import predict

    path = tmp_path / "in.csv"
    path.write_text(content)
    out = tmp_path / "out" / "preds.jsonl"
    code = run_main(predict, [str(pushed_run.run_dir), str(path), "--output", str(out), *args])
    assert code == 2
    assert f"error: {message.format(path=path)}" in capsys.readouterr().err
    assert not out.parent.exists() or not any(out.parent.iterdir())


def test_predict_refuses_a_directory_finetune_did_not_export(tiny_bert, tmp_path, capsys):
    from finetune import predict

    (tmp_path / "in.csv").write_text("text\nhello\n")
    assert run_main(predict, [str(tiny_bert), str(tmp_path / "in.csv")]) == 2
    assert "is not a model directory exported by finetune" in capsys.readouterr().err


@pytest.mark.slow
def test_evaluate_reproduces_the_runs_pipeline_check(pushed_run, tmp_path):
    from finetune.evaluate import evaluate

    metrics = json.loads((pushed_run.run_dir / "metrics.json").read_text())
    result = evaluate(pushed_run.run_dir, [f"data={pushed_run.work / 'data'}"], tmp_path / "eval.json")
    assert result["split"] == "test" and result["num_examples"] == metrics["num_test_examples"] == 40
    for key in ("accuracy", "f1_macro", "f1_pos"):
        assert result[key] == pytest.approx(metrics[f"pipeline_test_{key}"]), key
    assert json.loads((tmp_path / "eval.json").read_text()) == result


@pytest.mark.slow
def test_evaluate_single_file_with_other_columns_and_one_class(pushed_run, tmp_path, capsys):
    """Another column name (data.text_column=...) and data holding one label only: the data is encoded in the
    model's label order (id2label), so the score is the share of rows the pipeline labels 'pos'."""
    from transformers import pipeline

    from finetune import evaluate

    rows = [r for r in make_sentences(60, seed=3) if r[1] == "pos"]
    pd.DataFrame(rows, columns=["body", "sentiment"]).to_csv(tmp_path / "more.csv", index=False)
    out = tmp_path / "scores.json"
    assert run_main(evaluate, [str(pushed_run.run_dir / "model"), f"data={tmp_path / 'more.csv'}",
                               "data.text_column=body", "--output", str(out)]) == 0
    result = json.loads(out.read_text())
    clf = pipeline("text-classification", model=str(pushed_run.run_dir / "model"))
    predicted = [o["label"] for o in clf([t for t, _ in rows])]
    assert result["split"] == "all" and result["num_examples"] == len(rows) == 30  # a single file: all its rows
    assert result["accuracy"] == pytest.approx(predicted.count("pos") / 30)
    assert run_main(evaluate, [str(pushed_run.run_dir), "task.max_seq_length=3", "--output", str(out)]) == 2
    assert "takes data=... and data.<key>=<value> overrides" in capsys.readouterr().err


@pytest.fixture(scope="module")
def ner_export(ner_bert, tmp_path_factory):
    """A tiny random NER model exported the way a run exports it."""
    import torch
    from transformers import AutoModelForTokenClassification

    from finetune.export import export
    from finetune.tasks import get_task

    folder = tmp_path_factory.mktemp("ner-export")
    cfg = compose_cfg("task=ner", f"model={ner_bert}")
    task = get_task(cfg.task)
    tokens, tags = zip(*make_ner(30, 1))
    raw = task.prepare(DatasetDict({"test": Dataset.from_dict({"tokens": tokens, "tags": tags})}), cfg.data)
    torch.manual_seed(1)
    model = AutoModelForTokenClassification.from_pretrained(ner_bert, **task.model_kwargs()).eval()
    export(model, task.load_tokenizer(str(ner_bert), cfg.model), task, cfg, {}, folder / "model")
    return folder / "model", task, raw["test"], make_ner(30, 1)


def test_ner_predict_and_evaluate(ner_export, tmp_path):
    from transformers import pipeline

    from finetune import predict
    from finetune.evaluate import evaluate

    model_dir, task, raw, sentences = ner_export
    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"tokens": w}) + "\n" for w, _ in sentences))
    assert run_main(predict, [str(model_dir), str(tmp_path / "in.jsonl"), "--output", str(tmp_path / "p.jsonl")]) == 0
    records = read_jsonl(tmp_path / "p.jsonl")
    ner = pipeline("token-classification", model=str(model_dir), aggregation_strategy="simple")
    expected = ner([" ".join(w) for w, _ in sentences])
    assert len(records) == 30 and sum(len(r["entities"]) for r in records) > 10
    for record, entities in zip(records, expected):
        assert [(e["entity_group"], e["start"], e["end"]) for e in record["entities"]] == [
            (e["entity_group"], e["start"], e["end"]) for e in entities]
    # the eval file lists tags in another order than training: the model's id2label decides the encoding
    write_conll(tmp_path / "test.conll", list(reversed(sentences)))
    result = evaluate(model_dir, [f"data={tmp_path / 'test.conll'}"], tmp_path / "eval.json")
    assert result["f1"] == pytest.approx(task.verify(model_dir, raw)["f1"])


def test_qa_predict(tmp_path, tiny_bert):
    import torch
    from transformers import AutoModelForQuestionAnswering

    from finetune import predict
    from finetune.export import export
    from finetune.tasks import get_task

    cfg = compose_cfg("task=qa", f"model={tiny_bert}", "task.max_seq_length=32", "task.doc_stride=8")
    task = get_task(cfg.task)
    torch.manual_seed(0)
    export(AutoModelForQuestionAnswering.from_pretrained(tiny_bert).eval(), task.load_tokenizer(str(tiny_bert),
           cfg.model), task, cfg, {}, tmp_path / "model")
    contexts = [" ".join(make_sentences(6, seed=i)[j][0] for j in range(6)) for i in range(5)]
    pd.DataFrame({"q": ["what was the film like?"] * 5, "context": contexts}).to_csv(tmp_path / "qa.csv", index=False)
    assert run_main(predict, [str(tmp_path / "model"), str(tmp_path / "qa.csv"), "--question-column", "q",
                              "--output", str(tmp_path / "p.jsonl")]) == 0
    records = read_jsonl(tmp_path / "p.jsonl")
    assert len(records) == 5
    for record, context in zip(records, contexts):
        assert set(record) == {"answer", "score", "start", "end"}
        assert context[record["start"]:record["end"]] == record["answer"]
