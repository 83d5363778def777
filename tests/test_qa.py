"""task=qa: SQuAD files, answer checks, windows and their labels, answer selection, SQuAD metrics, the shipped
pipeline, and one CLI run — on tiny random BERT / RoBERTa models and hand-made data."""

from __future__ import annotations

import ast
import json
import random

import numpy as np
import pytest
import yaml
from datasets import Dataset, DatasetDict

from finetune import data
from finetune.errors import FinetuneError
from finetune.export import export
from finetune.metrics import normalize_answer, squad_metrics
from finetune.pipelines.question_answering import best_answers, context_offsets, encode_windows
from finetune.tasks import get_task
from helpers.cli import TINY_TRAINER, compose_cfg
from helpers.data import FILLER, make_sentences
from helpers.models import tiny_variant
from helpers.processes import run_cli

pytestmark = pytest.mark.usefixtures("one_thread")
NAMES = ["alice", "bob", "carol", "dave", "erin", "frank", "grace", "heidi"]
PLACES = ["paris", "rome", "tokyo", "lima", "oslo", "cairo", "delhi", "quito"]
WINDOW = ["task.max_seq_length=32", "task.doc_stride=8"]  # small windows: most contexts need several


def squad_json(n_articles: int, seed: int = 0, v2: bool = False) -> dict:
    """SQuAD-format data: 2 paragraphs per article, 'who' and 'where' questions (+ one unanswerable in v2)."""
    rng = random.Random(seed)
    articles = []
    for a in range(n_articles):
        paragraphs = []
        for p in range(2):
            name, place = rng.choice(NAMES), rng.choice(PLACES)
            filler = " ".join(rng.choice(FILLER) for _ in range(rng.randint(5, 40)))
            context = f"{filler}. the film was made by {name} in {place}. {filler}"
            qas = [
                {"id": f"{a}-{p}-who", "question": "who made the film?",
                 "answers": [{"text": name, "answer_start": context.index(f"by {name}") + 3}] * 2},
                {"id": f"{a}-{p}-where", "question": "where was the film made?",
                 "answers": [{"text": place, "answer_start": context.index(f"in {place}") + 3}]},
            ]
            if v2:
                qas.append({"id": f"{a}-{p}-when", "question": "when was the film made?", "is_impossible": True,
                            "answers": [], "plausible_answers": [{"text": place, "answer_start": 0}]})
            paragraphs.append({"context": context, "qas": qas})
        articles.append({"title": f"article {a}", "paragraphs": paragraphs})
    return {"version": "v2.0" if v2 else "1.1", "data": articles}


def load(*overrides):
    cfg = compose_cfg("task=qa", *overrides)
    task = get_task(cfg.task)
    return data.load(cfg.data, task), task


@pytest.fixture(scope="module")
def tiny_roberta(tmp_path_factory):
    """A 2-layer, 32-wide RoBERTa with a byte-level BPE tokenizer trained here (offsets trim the leading space)."""
    import torch
    from tokenizers import ByteLevelBPETokenizer
    from transformers import RobertaConfig, RobertaModel, RobertaTokenizer

    path = tmp_path_factory.mktemp("tiny-roberta")
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator([t for t, _ in make_sentences(400)] + NAMES + PLACES, vocab_size=400,
                            special_tokens=["<pad>", "<unk>", "<s>", "</s>", "<mask>"])
    bpe.save_model(str(path))
    tokenizer = RobertaTokenizer(vocab=str(path / "vocab.json"), merges=str(path / "merges.txt"), model_max_length=128)
    tokenizer.save_pretrained(path)
    torch.manual_seed(0)
    config = RobertaConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                           intermediate_size=64, max_position_embeddings=130, pad_token_id=tokenizer.pad_token_id)
    RobertaModel(config).save_pretrained(path)
    return path


@pytest.fixture(params=["bert", "roberta", "distilbert", "deberta"])
def tiny_encoder(request, tiny_bert, tiny_roberta, tmp_path_factory):
    if request.param in ("distilbert", "deberta"):
        return tiny_variant(tiny_bert, tmp_path_factory.mktemp(request.param), request.param)
    return tiny_bert if request.param == "bert" else tiny_roberta


# --- data ------------------------------------------------------------------------------------------

def test_squad_v1_file_is_read_and_split_by_article(tmp_path):
    path = tmp_path / "train.json"
    path.write_text(json.dumps(squad_json(10)))
    raw, _ = load(f"data={path}", "data.group_column=title", "data.validation_size=0.2", "data.test_size=0.2")
    assert sorted(raw["train"].column_names) == ["answers", "context", "question"]
    assert sum(len(raw[s]) for s in raw) == 40
    assert [len(raw[s]) for s in ("validation", "test")] == [8, 8]  # two whole articles each
    row = raw["train"][0]
    assert set(row["answers"]) == {"text", "answer_start"} and len(row["answers"]["text"]) in (1, 2)
    for split in raw.values():
        for r in split:
            for text, start in zip(r["answers"]["text"], r["answers"]["answer_start"]):
                assert r["context"][start:start + len(text)] == text
    contexts = [set(raw[s]["context"]) for s in ("train", "validation", "test")]
    assert not (contexts[0] & contexts[1]) and not (contexts[0] & contexts[2])  # no article in two splits


def test_squad_v2_needs_the_v2_flag(tmp_path):
    path = tmp_path / "train.json"
    path.write_text(json.dumps(squad_json(5, v2=True)))
    with pytest.raises(FinetuneError, match=r"questions have no answer \(SQuAD v2 style\); set "
                                            r"task.version_2_with_negative=true"):
        load(f"data={path}")
    raw, _ = load(f"data={path}", "task.version_2_with_negative=true")
    rows = [r for s in raw.values() for r in s]
    assert len(rows) == 30
    impossible = [r for r in rows if r["question"].startswith("when")]
    assert len(impossible) == 10 and all(r["answers"] == {"text": [], "answer_start": []} for r in impossible)


def test_flattened_jsonl_answers_are_checked_and_fixed(tmp_path):
    context = "bob met alice in paris, then alice left"
    rows = [{"question": "who?", "context": context, "answers": [{"text": "alice", "answer_start": 30}]}] * 20
    rows.append({"question": "where?", "context": context, "answers": [{"text": "paris", "answer_start": 17}]})
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    raw, _ = load(f"data={path}")
    starts = {r["answers"]["answer_start"][0] for s in raw.values() for r in s if r["question"] == "who?"}
    assert starts == {29}  # 30 is off by one: moved to the nearest occurrence, not the first (8)
    assert {r["answers"]["answer_start"][0] for s in raw.values() for r in s if r["question"] == "where?"} == {17}

    rows.append({"question": "what?", "context": context, "answers": [{"text": "london", "answer_start": 3}]})
    path.write_text("\n".join(json.dumps(r) for r in rows))
    with pytest.raises(FinetuneError, match=r"train row 21: answer 'london' does not occur in its context"):
        load(f"data={path}", "data.validation_size=0.3")


# --- windows and labels ----------------------------------------------------------------------------

def _windows_fixture(tokenizer):
    """A long context, an answer only in the second window, and one that the first window cuts."""
    context = " ".join(FILLER[i % len(FILLER)] for i in range(60))
    question = "who made the film?"
    enc = encode_windows(tokenizer, [question], [context], 32, 8)
    first, second = context_offsets(enc, 0), context_offsets(enc, 1)
    first_end = max(o[1] for o in first if o)  # last context character the first window reads
    later = [o for o in second if o and o[0] >= first_end]  # tokens only the second window reads
    last_of_first = [o for o in first if o][-1]
    inside = context[later[1][0]:later[2][1]]
    straddling = context[last_of_first[0]:later[0][1]]
    rows = {"question": [question, question], "context": [context, context],
            "answers": [{"text": [inside], "answer_start": [later[1][0]]},
                        {"text": [straddling], "answer_start": [last_of_first[0]]}]}
    return rows, len(enc["input_ids"])


def test_answer_labels_across_window_boundaries(tiny_encoder):
    cfg = compose_cfg("task=qa", f"model={tiny_encoder}", *WINDOW)
    task = get_task(cfg.task)
    tokenizer = task.load_tokenizer(str(tiny_encoder), cfg.model)
    rows, n_windows = _windows_fixture(tokenizer)
    assert n_windows >= 3
    ds = Dataset.from_dict(rows)
    features = task.tokenize(DatasetDict(train=ds, validation=ds), tokenizer)["validation"]
    assert len(features) == 2 * n_windows and max(features["length"]) == 32
    context = rows["context"][0]
    for example, text in enumerate(a["text"][0] for a in rows["answers"]):
        windows = [f for f in features if f["example_id"] == example]
        labels = [(f["start_positions"], f["end_positions"]) for f in windows]
        assert labels[0] == (0, 0)  # not (or not wholly) in the first window: the classifier position
        s, e = labels[1]
        offsets = windows[1]["offset_mapping"]
        assert 0 < s <= e and context[offsets[s][0]:offsets[e][1]] == text  # the second window holds it
        assert all(lab == (0, 0) or windows[k]["offset_mapping"][lab[0]] for k, lab in enumerate(labels))


def test_long_question_is_cut_to_leave_room_for_the_context(tiny_bert):
    cfg = compose_cfg("task=qa", f"model={tiny_bert}", *WINDOW)
    task = get_task(cfg.task)
    tokenizer = task.load_tokenizer(str(tiny_bert), cfg.model)
    context = "the film was made by bob and the plot was dull"
    enc = encode_windows(tokenizer, [" ".join(["plot"] * 50)], [context], 32, 8)
    assert all(len(ids) == 32 for ids in enc["input_ids"][:-1]) and len(enc["input_ids"][-1]) <= 32
    assert enc.sequence_ids(0).count(0) == 32 - 3 - 8 - 1  # the question keeps what the windows leave it
    read = {o for i in range(len(enc["input_ids"])) for o in context_offsets(enc, i) if o}
    assert min(o[0] for o in read) == 0 and max(o[1] for o in read) == len(context)  # all of the context


def test_collator_feeds_only_model_inputs_and_labels(tiny_bert):
    cfg = compose_cfg("task=qa", f"model={tiny_bert}", *WINDOW)
    task = get_task(cfg.task)
    tokenizer = task.load_tokenizer(str(tiny_bert), cfg.model)
    ds = Dataset.from_dict(_windows_fixture(tokenizer)[0])
    features = task.tokenize(DatasetDict(train=ds, validation=ds), tokenizer)
    assert {"example_id", "offset_mapping"} <= set(features["validation"].column_names)
    assert not {"example_id", "offset_mapping"} & set(features["train"].column_names)
    batch = task.collator(tokenizer)([{k: v for k, v in f.items() if k != "length"} for f in features["validation"]])
    assert set(batch) == {"input_ids", "token_type_ids", "attention_mask", "start_positions", "end_positions"}


# --- answer selection and metrics ------------------------------------------------------------------

CONTEXT = "alice met bob in paris"
#            [CLS] who  [SEP] alice   met     bob      in       paris     [SEP]
OFFSETS = [None, None, None, (0, 5), (6, 9), (10, 13), (14, 16), (17, 22), None]


def logits(**peaks):
    out = np.zeros(len(OFFSETS))
    for i, v in peaks.items():
        out[int(i[1:])] = v
    return out


def test_best_answer_skips_question_tokens_reversed_and_long_spans():
    # the best start is a question token, then 'bob'; the best end is 'bob'
    top = best_answers(CONTEXT, [(logits(p1=9, p5=5), logits(p5=6), OFFSETS)])[0]
    assert (top["answer"], top["start"], top["end"]) == ("bob", 10, 13)
    # 'alice ... paris' (5 + 5) is the top pair but 5 tokens long; then 'alice met bob' (5 + 2) beats 'bob in paris'
    win = (logits(p3=5, p5=1), logits(p7=5, p5=2), OFFSETS)
    assert best_answers(CONTEXT, [win], max_answer_len=5)[0]["answer"] == "alice met bob in paris"
    assert best_answers(CONTEXT, [win], max_answer_len=4)[0]["answer"] == "alice met bob"
    one_token = (logits(p3=5), logits(p7=5, p3=1), OFFSETS)  # 'alice' 5 + 1 beats 'paris' 0 + 5
    assert best_answers(CONTEXT, [one_token], max_answer_len=1)[0]["answer"] == "alice"
    # end before start is never an answer
    win = (logits(p7=5), logits(p3=5, p7=1), OFFSETS)
    assert best_answers(CONTEXT, [win])[0]["answer"] == "paris"
    ranked = best_answers(CONTEXT, [win], n_best_size=5)
    assert len(ranked) <= 5 and sum(r["score"] for r in ranked) == pytest.approx(1.0)
    assert all(r["answer"] == CONTEXT[r["start"]:r["end"]] for r in ranked)


def test_best_answer_across_windows_and_null_answer():
    second = [None, None, None, None, None, (10, 13), (14, 16), (17, 22), None]  # a later window of the context
    first = (logits(p3=2), logits(p4=2), OFFSETS)
    better = (logits(p7=4), logits(p7=4), second)
    assert best_answers(CONTEXT, [first, better])[0]["answer"] == "paris"
    # v2: position 0 scores 3 + 3 = 6 in the first window (the lower null score of the two windows counts)
    null_first = (logits(p0=3, p3=2), logits(p0=3, p4=2), OFFSETS)
    null_second = (logits(p0=5, p7=2.5), logits(p0=5, p7=2.5), second)  # best span: paris, 5
    kw = {"handle_impossible_answer": True}
    top = best_answers(CONTEXT, [null_first, null_second], **kw)[0]
    assert top == {"answer": "", "start": 0, "end": 0, "score": pytest.approx(top["score"])}
    assert best_answers(CONTEXT, [null_first, null_second], null_score_diff_threshold=2.5, **kw)[0]["answer"] == "paris"
    assert best_answers(CONTEXT, [null_first, null_second])[0]["answer"] == "paris"  # v1: never empty


def test_squad_normalisation_and_metrics():
    assert normalize_answer("  The Denver  Broncos!") == "denver broncos"
    assert normalize_answer("an apple, a pear") == "apple pear"
    preds = ["Denver Broncos", "the broncos", "", "Carolina"]
    refs = [["Denver Broncos", "Broncos"], ["Denver Broncos"], [], ["Carolina Panthers", "Panthers"]]
    m = squad_metrics(preds, refs)
    f1_2 = 2 * (1 * 0.5) / 1.5  # 'broncos' vs 'denver broncos'
    f1_4 = 2 * (1 * 0.5) / 1.5
    assert m["exact_match"] == pytest.approx(2 / 4)
    assert m["f1"] == pytest.approx((1 + f1_2 + 1 + f1_4) / 4)
    assert m["no_ans_exact_match"] == 1.0 and m["has_ans_f1"] == pytest.approx((1 + f1_2 + f1_4) / 3)
    assert squad_metrics(["x"], [[]])["f1"] == 0.0  # an answer to an unanswerable question
    assert set(squad_metrics(["a b"], [["a b"]])) == {"exact_match", "f1"}  # v1: no has_ans/no_ans split


# --- export and pipeline ---------------------------------------------------------------------------

def _forward(model, collate, features):
    import torch

    starts, ends = [], []
    with torch.no_grad():
        for i in range(0, len(features), 7):
            batch = collate([{k: v for k, v in f.items() if k != "length"} for f in features.select(range(i, min(
                i + 7, len(features))))])
            out = model(**batch)
            starts += list(out.start_logits.numpy())
            ends += list(out.end_logits.numpy())
    width = max(len(s) for s in starts)
    pad = lambda rows: np.stack([np.pad(r, (0, width - len(r)), constant_values=-100) for r in rows])  # noqa: E731
    return pad(starts), pad(ends)


def test_exported_pipeline_matches_evaluation(tmp_path, tiny_encoder):
    import torch
    from transformers import AutoModelForQuestionAnswering, EvalPrediction, pipeline

    path = tmp_path / "squad.json"
    path.write_text(json.dumps(squad_json(10)))
    cfg = compose_cfg("task=qa", f"model={tiny_encoder}", f"data={path}", "data.test_size=0.5", *WINDOW,
                      "task.max_answer_length=6")
    task = get_task(cfg.task)
    tokenizer = task.load_tokenizer(str(tiny_encoder), cfg.model)
    torch.manual_seed(0)
    model = AutoModelForQuestionAnswering.from_pretrained(tiny_encoder).eval()
    raw = data.load(cfg.data, task)
    features = task.tokenize(raw, tokenizer)
    assert len(features["test"]) > len(raw["test"])  # several windows per question
    start, end = _forward(model, task.collator(tokenizer), features["test"])
    labels = (np.array(features["test"]["start_positions"]), np.array(features["test"]["end_positions"]))
    evaluated = task.compute_metrics("test", features["test"])(EvalPrediction((start, end), labels))
    answers = task.predict("test", features["test"], start, end)
    assert len(set(answers)) > 10  # a random head: many different spans, so agreement below means something

    target = export(model, tokenizer, task, cfg, {}, tmp_path / "model")
    shipped = (target / "question_answering.py").read_text()
    imported = {n.split(".")[0] for node in ast.walk(ast.parse(shipped)) if isinstance(node, (ast.Import, ast.ImportFrom))
                for n in ([a.name for a in node.names] if isinstance(node, ast.Import) else [node.module])}
    assert imported <= {"__future__", "numpy", "torch", "transformers"}  # runs without finetune installed
    config = json.loads((target / "config.json").read_text())
    assert config["custom_pipelines"]["question-answering"]["impl"] == "question_answering.QuestionAnsweringPipeline"
    assert config["question_answering"]["max_seq_len"] == 32 and config["question_answering"]["max_answer_len"] == 6
    card = (target / "README.md").read_text()
    assert 'trust_remote_code=True' in card and yaml.safe_load(card.split("---")[1])["pipeline_tag"] == \
        "question-answering"

    assert task.verify(target, raw["test"]) == pytest.approx(evaluated, abs=1e-9)  # batch 32 through the pipeline

    qa = pipeline(model=str(target), trust_remote_code=True)
    inputs = [{"question": r["question"], "context": r["context"]} for r in raw["test"]]
    assert [o["answer"] for o in qa(inputs, batch_size=5)] == answers  # the same answer for every question
    context = raw["test"][0]["context"]
    out = qa(question="who made the film?", context=context)
    assert set(out) == {"answer", "score", "start", "end"} and out["answer"] == context[out["start"]:out["end"]]
    assert len(tokenizer(context)["input_ids"]) > 32  # read in windows, as in evaluation
    assert len(qa(question="who made the film?", context=context, top_k=3)) == 3
    with pytest.raises(ValueError, match="trust_remote_code"):
        pipeline(model=str(target))


def test_qa_trains_without_dropout(tiny_bert):
    """Its windows are long: without attention dropout PyTorch's fused attention kernel runs (model.attention_dropout),
    and without hidden dropout no masks are drawn (model.hidden_dropout)."""
    cfg = compose_cfg("task=qa", f"model={tiny_bert}", *WINDOW)
    task = get_task(cfg.task)
    task.load_tokenizer(str(tiny_bert), cfg.model)
    config = task.load_model(str(tiny_bert), cfg.model).config
    assert config.attention_probs_dropout_prob == config.hidden_dropout_prob == 0
    cfg = compose_cfg("task=qa", f"model={tiny_bert}", *WINDOW, "model.attention_dropout=null",
                      "model.hidden_dropout=null")  # the checkpoint's own
    config = task.load_model(str(tiny_bert), cfg.model).config
    assert config.attention_probs_dropout_prob == config.hidden_dropout_prob == 0.1


def test_pipeline_check_allows_one_point_for_qa(monkeypatch):
    from pathlib import Path

    from finetune.export import VerificationError, verify

    task = get_task(compose_cfg("task=qa").task)
    monkeypatch.setattr(task, "verify", lambda model_dir, raw: {"exact_match": 0.7, "f1": 0.809})
    assert verify(task, Path("."), None, {"test_f1": 0.8}, 0.005)["pipeline_test_f1"] == 0.809  # task's 0.01
    with pytest.raises(VerificationError, match="tolerance 0.01"):
        verify(task, Path("."), None, {"test_f1": 0.82}, 0.005)
    assert verify(task, Path("."), None, {"test_f1": 0.83}, 0.05)["pipeline_test_f1"] == 0.809  # config's, larger


def test_metrics_refuse_predictions_out_of_order(tiny_bert):
    from transformers import EvalPrediction

    cfg = compose_cfg("task=qa", f"model={tiny_bert}", *WINDOW)
    task = get_task(cfg.task)
    tokenizer = task.load_tokenizer(str(tiny_bert), cfg.model)
    ds = Dataset.from_dict(_windows_fixture(tokenizer)[0])
    features = task.tokenize(DatasetDict(train=ds, validation=ds), tokenizer)["validation"]
    labels = np.array(features["start_positions"]), np.array(features["end_positions"])
    shuffled = tuple(a[::-1] for a in labels)
    logits = np.zeros((len(features), 32))
    fn = task.compute_metrics("validation", features)
    assert set(fn(EvalPrediction((logits, logits), labels))) == {"exact_match", "f1"}
    with pytest.raises(FinetuneError, match="needs evaluation in dataset order"):
        fn(EvalPrediction((logits, logits), shuffled))


# --- the CLI ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("setup", [[], ["trainer=accelerate"], ["peft=lora"]], ids=["hf", "accelerate", "lora"])
@pytest.mark.slow
def test_cli_qa_run(setup, tiny_bert, tmp_path):
    (tmp_path / "squad.json").write_text(json.dumps(squad_json(10)))
    proc = run_cli("task=qa", f"model={tiny_bert}", "data=squad.json", "data.group_column=title", *WINDOW,
                   *TINY_TRAINER, *setup, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run,) = (tmp_path / "runs" / "qa").iterdir()
    config = (run / "config.yaml").read_text()
    assert "group_by_length: true" in config  # trained on length-grouped batches, evaluated in dataset order
    metrics = json.loads((run / "metrics.json").read_text())
    for key in ("train_loss", "validation_f1", "test_exact_match", "test_f1", "pipeline_test_f1"):
        assert key in metrics
    assert abs(metrics["test_f1"] - metrics["pipeline_test_f1"]) <= 0.01
    assert metrics["num_train_examples"] + metrics["num_validation_examples"] + metrics["num_test_examples"] == 40
    assert {"question_answering.py", "config.json", "model.safetensors"} <= {p.name for p in (run / "model").iterdir()}


def test_qa_without_data_says_how_to_pass_it():
    with pytest.raises(FinetuneError, match=r"^no data given: pass data=<file, directory or Hub dataset id>"):
        load()  # configs/data/qa.yaml names no source: no QA data is bundled
