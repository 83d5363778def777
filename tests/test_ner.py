"""task=ner: CoNLL reading, tag schemes, sub-word alignment, seqeval metrics, the pipeline check, the CLI."""

import gzip
import json
from pathlib import Path

import pytest
from datasets import ClassLabel, Dataset, DatasetDict, Features, List, Value

from finetune import data, validate
from finetune.errors import FinetuneError
from finetune.metrics import entity_metrics
from finetune.tasks import get_task
from finetune.tagging import read_conll
from finetune.tasks.ner import align_labels, entities_to_tags, word_anchors
from helpers.cli import compose_cfg
from helpers.data import make_ner, ner_corpus, write_conll
from helpers.models import tiny_variant
from helpers.processes import run_cli

LABELS = ["O", "B-LOC", "I-LOC", "B-ORG", "I-ORG", "B-PER", "I-PER"]


@pytest.fixture(scope="module")
def ner_roberta(tmp_path_factory) -> Path:
    """A tiny RoBERTa with a byte-level BPE tokenizer saved without add_prefix_space (as roberta-base is)."""
    import torch
    from tokenizers import ByteLevelBPETokenizer
    from transformers import RobertaConfig, RobertaModel, RobertaTokenizer

    path = tmp_path_factory.mktemp("ner-roberta")
    bpe = ByteLevelBPETokenizer(add_prefix_space=True)
    bpe.train_from_iterator(ner_corpus(), vocab_size=400, special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"])
    model = json.loads(bpe._tokenizer.to_str())["model"]
    merges = [tuple(m.split()) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    tokenizer = RobertaTokenizer(vocab=model["vocab"], merges=merges)
    tokenizer.save_pretrained(path)
    torch.manual_seed(0)
    config = RobertaConfig(vocab_size=len(model["vocab"]), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                           intermediate_size=64, max_position_embeddings=130, pad_token_id=tokenizer.pad_token_id)
    RobertaModel(config).save_pretrained(path)
    return path


def ner_task(*overrides):
    return get_task(compose_cfg("task=ner", *overrides).task)


def data_cfg(**kw):
    return compose_cfg("task=ner", *[f"data.{k}={v}" for k, v in kw.items()]).data


def prepare(sentences, *overrides, **data_kw):
    tokens, tags = zip(*sentences)
    task = ner_task(*overrides)
    raw = DatasetDict({"train": Dataset.from_dict({"tokens": list(tokens), "tags": list(tags)})})
    out = task.prepare(raw, data_cfg(**data_kw))
    return task, [[task.labels[i] for i in s] for s in out["train"]["tags"]]


# --- CoNLL files -----------------------------------------------------------------------------------
def test_conll_edge_cases(tmp_path):
    path = tmp_path / "train.conll"
    path.write_text(
        "-DOCSTART- -X- -X- O\n"
        "\n"
        "EU NNP B-NP B-ORG\n"            # several space-separated columns: token first, tag last
        "rejects VBZ B-VP O\n"
        " \t \n"                          # whitespace-only line ends a sentence
        "Peter\tB-PER\n"                  # tab-separated
        "Blackburn\tI-PER\n"
        "\n\n"
        "-DOCSTART- -X- -X- O\n"
        "BRUSSELS  NNP  B-LOC\r\n"        # runs of spaces, CRLF
        "1996-08-22 CD O"                 # last sentence without a final blank line or newline
    )
    ds = read_conll(str(path))
    assert list(ds["tokens"]) == [["EU", "rejects"], ["Peter", "Blackburn"], ["BRUSSELS", "1996-08-22"]]
    assert list(ds["tags"]) == [["B-ORG", "O"], ["B-PER", "I-PER"], ["B-LOC", "O"]]
    packed = tmp_path / "train.conll.gz"
    packed.write_bytes(gzip.compress(path.read_bytes()))
    assert list(read_conll(str(packed))["tokens"]) == list(ds["tokens"])


def test_conll_malformed_line_names_file_and_line(tmp_path):
    path = tmp_path / "bad.conll"
    path.write_text("EU B-ORG\nrejects O\n\nlonely\nPeter B-PER\n")
    with pytest.raises(FinetuneError, match=rf"{path}:4: expected a token and its tag .* got 'lonely'"):
        read_conll(str(path))


def test_task_reads_conll_and_leaves_other_formats_to_data(tmp_path):
    task = ner_task()
    assert task.read_file(str(write_conll(tmp_path / "a.txt", make_ner(2, 0)))) is not None
    assert task.read_file(str(tmp_path / "a.jsonl")) is None  # never opened: data.py's generic reader takes it


def test_ner_learning_rate_default_and_overrides():
    assert compose_cfg("task=ner").trainer.learning_rate == pytest.approx(3e-4)
    assert compose_cfg("task=ner", "peft=lora").trainer.learning_rate == pytest.approx(1e-3)
    assert compose_cfg("task=ner", "trainer.learning_rate=5e-5").trainer.learning_rate == pytest.approx(5e-5)
    assert compose_cfg("task=sentiment").trainer.learning_rate == pytest.approx(1e-4)


def test_missing_conll_file_is_a_path_error_not_a_hub_lookup():
    cfg = compose_cfg("task=ner", "data=missing.conll")
    with pytest.raises(FinetuneError, match="data file or directory not found: missing.conll; check the path"):
        data.load(cfg.data, get_task(cfg.task))


def test_directory_of_conll_files_with_split_names(tmp_path):
    for split, n in (("train", 30), ("dev", 6), ("test", 7)):
        write_conll(tmp_path / f"{split}.conll", make_ner(n, n))
    cfg = compose_cfg("task=ner", f"data={tmp_path}")
    task = get_task(cfg.task)
    raw = data.load(cfg.data, task)
    assert [len(raw[s]) for s in data.SPLITS] == [30, 6, 7]
    assert raw["train"].features["tags"] == List(ClassLabel(names=LABELS))
    assert task.labels == LABELS  # derived: O, then B-/I- per entity type, sorted


# --- schemes, tag names, columns --------------------------------------------------------------------
def test_schemes_are_detected_and_converted_to_iob2():
    iob2 = [(["a", "b", "c", "d"], ["B-PER", "I-PER", "B-PER", "O"])]
    assert prepare(iob2)[1] == [["B-PER", "I-PER", "B-PER", "O"]]
    iob1 = [(["a", "b", "c", "d", "e"], ["I-PER", "I-PER", "B-PER", "O", "I-LOC"])]
    task, tags = prepare(iob1)
    assert tags == [["B-PER", "I-PER", "B-PER", "O", "B-LOC"]]
    assert task.labels == ["O", "B-LOC", "I-LOC", "B-PER", "I-PER"]
    bioes = [(["a", "b", "c", "d", "e"], ["S-PER", "O", "B-LOC", "I-LOC", "E-LOC"])]
    assert prepare(bioes)[1] == [["B-PER", "O", "B-LOC", "I-LOC", "I-LOC"]]
    assert prepare(bioes, "task.tag_scheme=IOBES")[1] == prepare(bioes)[1]


@pytest.mark.parametrize("tags, scheme, message", [
    (["O", "I-PER"], "IOB2", r"train sentence 1 \(w0 w1 ...\): 'I-PER' at word 2 follows O, not B-PER or I-PER, "
                             r"which IOB2 does not allow; fix the tags or set task.tag_scheme="),
    (["B-LOC", "O"], "BIOES", r"'O' at word 2 comes before the open LOC entity ends \(with E-LOC\)"),
    (["B-LOC", "I-LOC"], "BIOES", "the sentence ends inside a LOC entity"),
    (["O", "E-LOC"], "auto", "'E-LOC' at word 2 continues no open LOC entity"),
    (["PER", "O"], "auto", "tag 'PER' at word 1 is neither O nor B/I-<type>"),
    (["X-PER", "O"], "IOB1", "tag 'X-PER' at word 1 is neither O nor B/I-<type>"),
])
def test_tags_outside_the_scheme_are_rejected(tags, scheme, message):
    with pytest.raises(FinetuneError, match=message):
        prepare([([f"w{i}" for i in range(len(tags))], tags)], f"task.tag_scheme={scheme}")


def test_other_tag_errors():
    with pytest.raises(FinetuneError, match="unknown task.tag_scheme 'IOE2'"):
        validate.config(compose_cfg("task=ner", "task.tag_scheme=IOE2"))
    with pytest.raises(FinetuneError, match="train sentence 2 has 2 tokens but 1 tags"):
        prepare([(["a"], ["B-PER"]), (["a", "b"], ["O"])])
    with pytest.raises(FinetuneError, match="no entities"):
        prepare([(["a", "b"], ["O", "O"])])
    with pytest.raises(FinetuneError, match=r"tags B-ORG are not in data.label_names"):
        prepare([(["a", "b"], ["B-PER", "B-ORG"])], label_names="[O,B-PER,I-PER]")


def test_integer_tags_named_by_label_names_from_jsonl(tmp_path):
    path = tmp_path / "train.jsonl"
    rows = [{"words": ["alice", "went", "to", "new", "york"], "ner": [1, 0, 0, 3, 4]}] * 20
    path.write_text("\n".join(json.dumps(r) for r in rows))
    cfg = compose_cfg("task=ner", f"data={path}", "data.text_column=words", "data.label_column=ner",
                      "data.label_names=[O,B-PER,I-PER,B-LOC,I-LOC]")
    task = get_task(cfg.task)
    raw = data.load(cfg.data, task)
    assert task.labels == ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]  # IOB2 names keep their order and ids
    assert raw["train"][0] == {"tokens": ["alice", "went", "to", "new", "york"], "tags": [1, 0, 0, 3, 4]}
    with pytest.raises(FinetuneError, match=r"integers without names; set data.label_names="):
        data.load(compose_cfg("task=ner", f"data={path}", "data.text_column=words", "data.label_column=ner").data, task)


def test_classlabel_tags_and_string_columns():
    """A Hub-style List(ClassLabel) feature names the tags; BIOES names become IOB2 labels per type."""
    names = ["O", "S-LOC", "B-PER", "E-PER"]
    features = Features({"tokens": List(Value("string")), "tags": List(ClassLabel(names=names))})
    raw = DatasetDict({"train": Dataset.from_dict({"tokens": [["bob", "smith", "in", "paris"]], "tags": [[2, 3, 0, 1]]},
                                                   features=features)})
    task = ner_task()
    out = task.prepare(raw, data_cfg())
    assert task.labels == ["O", "B-LOC", "I-LOC", "B-PER", "I-PER"]  # types in the given names' order
    assert [task.labels[i] for i in out["train"][0]["tags"]] == ["B-PER", "I-PER", "O", "B-LOC"]
    # a csv-style table: tokens and tags as space-separated strings
    strings = Dataset.from_dict({"tokens": ["bob smith in paris"], "tags": ["B-PER I-PER O B-LOC"]})
    strings = DatasetDict({"train": strings})
    assert task.prepare(strings, data_cfg())["train"][0]["tokens"] == ["bob", "smith", "in", "paris"]


# --- sub-word alignment ----------------------------------------------------------------------------
def test_label_alignment_first_and_all_subtokens(tiny_bert):
    """tiny_bert's vocabulary has no names: they split into several pieces."""
    task = ner_task(f"model={tiny_bert}")
    tokenizer = task.load_tokenizer(str(tiny_bert), compose_cfg("task=ner", f"model={tiny_bert}").model)
    words = ["montreal", "was", "great", "acme"]
    enc = tokenizer(words, is_split_into_words=True)
    word_ids = enc.word_ids()
    assert word_ids.count(0) >= 3 and word_ids.count(3) >= 2 and word_ids[0] is None and word_ids[-1] is None
    labels = ["O", "B-LOC", "I-LOC", "B-ORG", "I-ORG"]
    tags = [1, 0, 0, 3]  # B-LOC O O B-ORG
    b_to_i = [0, 2, 2, 4, 4]
    first = align_labels(word_ids, tags, b_to_i, all_tokens=False)
    expected_first = [-100 if w is None or w == p else tags[w] for p, w in zip([None] + word_ids[:-1], word_ids)]
    assert first == expected_first
    assert [first[word_ids.index(w)] for w in range(4)] == tags and first.count(-100) == len(word_ids) - 4
    every = align_labels(word_ids, tags, b_to_i, all_tokens=True)
    pieces = [labels[t] if t != -100 else None for t in every]
    assert pieces[0] is None and pieces[-1] is None  # [CLS], [SEP]
    n = [word_ids.count(w) for w in range(4)]
    assert pieces[1:-1] == (["B-LOC"] + ["I-LOC"] * (n[0] - 1) + ["O"] * (n[1] + n[2])
                            + ["B-ORG"] + ["I-ORG"] * (n[3] - 1))


def test_label_all_tokens_trains_every_piece_but_scores_words(tiny_bert):
    task = ner_task(f"model={tiny_bert}", "task.label_all_tokens=true")
    tokenizer = task.load_tokenizer(str(tiny_bert), compose_cfg("task=ner", f"model={tiny_bert}").model)
    split = Dataset.from_dict({"tokens": [["montreal", "was", "great"]], "tags": [["B-LOC", "O", "O"]]})
    raw = task.prepare(DatasetDict({"train": split, "validation": split}), data_cfg())
    feats = task.tokenize(raw, tokenizer)
    train, valid = feats["train"][0]["labels"], feats["validation"][0]["labels"]
    assert sum(t != -100 for t in train) == len(train) - 2  # every piece but [CLS]/[SEP]
    assert sum(t != -100 for t in valid) == 3  # one per word
    assert feats["train"][0]["length"] == len(feats["train"][0]["input_ids"])


def test_byte_level_bpe_gets_a_prefix_space(ner_roberta):
    from transformers import AutoTokenizer

    plain = AutoTokenizer.from_pretrained(ner_roberta)
    words = ["alice", "went", "to", "paris"]
    assert plain(words, is_split_into_words=True)["input_ids"] != plain(" ".join(words))["input_ids"]
    task = ner_task(f"model={ner_roberta}")
    tokenizer = task.load_tokenizer(str(ner_roberta), compose_cfg("task=ner", f"model={ner_roberta}").model)
    assert tokenizer.add_prefix_space
    assert tokenizer(words, is_split_into_words=True)["input_ids"] == tokenizer(" ".join(words))["input_ids"]


# --- metrics and the pipeline's character spans -------------------------------------------------------
def test_entity_metrics_known_example():
    y_true = [["B-PER", "I-PER", "O", "B-LOC"], ["B-ORG", "O", "O"]]
    y_pred = [["B-PER", "I-PER", "O", "B-ORG"], ["B-ORG", "O", "I-LOC"]]  # I- after O: an entity (conlleval)
    m = entity_metrics(y_true, y_pred)
    # gold PER, LOC, ORG; predicted PER (right), ORG (wrong type), ORG (right), LOC (spurious)
    assert m["precision"] == pytest.approx(2 / 4) and m["recall"] == pytest.approx(2 / 3)
    assert m["f1"] == pytest.approx(2 * (1 / 2) * (2 / 3) / (1 / 2 + 2 / 3))
    assert m["accuracy"] == pytest.approx(5 / 7)
    assert (m["f1_PER"], m["precision_ORG"], m["recall_ORG"], m["f1_LOC"]) == (1.0, 0.5, 1.0, 0.0)


def test_pipeline_entities_map_back_to_words():
    words = ["kilimanjaro", "is", "in", "new", "york", "x"]
    text = " ".join(words)  # kilimanjaro(0-11) is(12-14) in(15-17) new(18-21) york(22-26) x(27-28)
    offsets = [(0, 4), (4, 11), (12, 14), (15, 17), (18, 21), (22, 24), (24, 26)]  # "x" was cut off
    anchors = word_anchors(words, offsets)
    assert anchors == [0, 12, 15, 18, 22, None] and text[22:26] == "york"
    seen = anchors[:5]
    ent = lambda group, s, e: {"entity_group": group, "start": s, "end": e}  # noqa: E731
    assert entities_to_tags(seen, [ent("LOC", 18, 26)]) == ["O", "O", "O", "B-LOC", "I-LOC"]
    assert entities_to_tags(seen, [ent("LOC", 4, 11)]) == ["O"] * 5  # only a continuation piece: not the word's tag
    assert entities_to_tags(seen, [ent("LOC", 0, 4), ent("PER", 4, 11)]) == ["B-LOC", "O", "O", "O", "O"]
    assert entities_to_tags(seen, [ent("LOC", 18, 21), ent("LOC", 22, 26)]) == ["O", "O", "O", "B-LOC", "B-LOC"]
    assert entities_to_tags(seen, [ent("ORG", 15, 24)]) == ["O", "O", "B-ORG", "I-ORG", "I-ORG"]
    assert word_anchors(["a", "", "b"], [(0, 1), (3, 4)]) == [0, None, 3]  # an empty word has no piece


@pytest.fixture(scope="module")
def ner_distilbert(ner_bert, tmp_path_factory) -> Path:
    return tiny_variant(ner_bert, tmp_path_factory.mktemp("ner-distilbert"), "distilbert")


@pytest.fixture(scope="module")
def ner_deberta(ner_bert, tmp_path_factory) -> Path:
    return tiny_variant(ner_bert, tmp_path_factory.mktemp("ner-deberta"), "deberta")


@pytest.mark.parametrize("checkpoint", ["ner_bert", "ner_roberta", "ner_distilbert", "ner_deberta"])
def test_pipeline_round_trip_matches_trainer_metrics(checkpoint, request, tmp_path):
    """verify() re-scores through pipeline(aggregation_strategy="simple") exactly like compute_metrics on the
    model's logits when every word is one piece (with several pieces, see the task's verify_tolerance)."""
    import torch
    from transformers import AutoModelForTokenClassification, EvalPrediction

    from finetune.export import export

    path = request.getfixturevalue(checkpoint)
    cfg = compose_cfg("task=ner", f"model={path}")
    task = get_task(cfg.task)
    tokens, tags = zip(*make_ner(24, 5))
    raw = task.prepare(DatasetDict({"test": Dataset.from_dict({"tokens": tokens, "tags": tags})}), cfg.data)
    tokenizer = task.load_tokenizer(str(path), cfg.model)
    feats = task.tokenize(raw, tokenizer)["test"]
    assert all(sum(t != -100 for t in f["labels"]) == len(f["labels"]) - 2 for f in feats)  # one piece per word
    torch.manual_seed(1)
    model = AutoModelForTokenClassification.from_pretrained(path, **task.model_kwargs()).eval()
    batch = task.collator(tokenizer)([{k: v for k, v in f.items() if k != "length"} for f in feats])
    labels = batch.pop("labels")
    with torch.no_grad():
        logits = model(**batch).logits
    kept = task.preprocess_logits(logits, labels).numpy()  # what evaluation keeps: each token's tag id
    assert (kept[labels.numpy() != -100] != 0).sum() > 10  # random weights: many entities
    expected = task.compute_metrics("test", feats)(EvalPrediction(predictions=kept, label_ids=labels.numpy()))
    export(model, tokenizer, task, cfg, {}, tmp_path / "model")
    assert json.loads((tmp_path / "model" / "config.json").read_text())["id2label"] == dict(
        (str(i), name) for i, name in enumerate(task.labels))
    scores = task.verify(tmp_path / "model", raw["test"])
    assert scores["precision"] > 0
    for key in ("f1", "precision", "recall", "accuracy", "f1_PER"):
        assert scores[key] == pytest.approx(expected[key]), key


def test_export_check_uses_the_task_tolerance_when_larger():
    from finetune.export import VerificationError, verify
    from finetune.tasks.ner import NerTask

    class Fixed(NerTask):
        def verify(self, model_dir, raw):
            return {"f1": 0.492}

    task = Fixed(compose_cfg("task=ner").task)
    assert task.verify_tolerance == 0.01  # the bound: pipeline within 1 F1 point of the trainer
    assert verify(task, Path("."), None, {"test_f1": 0.5}, 0.005) == {"pipeline_test_f1": 0.492}
    with pytest.raises(VerificationError, match="pipeline scores test f1=0.4920 but the trainer measured 0.5200"):
        verify(task, Path("."), None, {"test_f1": 0.52}, 0.005)


# --- the CLI -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("setup", [[], ["trainer=accelerate"], ["peft=lora"]], ids=["hf", "accelerate", "lora"])
@pytest.mark.slow
def test_cli_ner_run(setup, ner_bert, tmp_path):
    (tmp_path / "conll").mkdir()
    for split, n, seed in (("train", 160, 1), ("dev", 30, 2), ("test", 30, 3)):
        write_conll(tmp_path / "conll" / f"{split}.conll", make_ner(n, seed))
    proc = run_cli("task=ner", f"model={ner_bert}", "data=conll", "trainer.num_train_epochs=5",
                   "trainer.learning_rate=2e-3", "trainer.per_device_train_batch_size=16", "trainer.warmup_ratio=0.0",
                   *setup, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run,) = (tmp_path / "runs" / "ner").iterdir()
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["num_train_examples"] == 160 and metrics["num_test_examples"] == 30
    if "peft=lora" not in setup:  # LoRA on a frozen *random* tiny base learns too slowly to score in 5 epochs
        assert metrics["test_f1"] > 0.8, metrics["test_f1"]  # learned the entities, far above chance
    assert metrics["pipeline_test_f1"] == pytest.approx(metrics["test_f1"])  # one piece per word: exact
    for key in ("test_precision", "test_recall", "test_accuracy", "test_f1_PER", "test_f1_LOC", "pipeline_test_recall"):
        assert key in metrics
    config = json.loads((run / "model" / "config.json").read_text())
    assert list(config["id2label"].values()) == LABELS
    assert "pipeline_tag: token-classification" in (run / "model" / "README.md").read_text()


def test_cli_without_data_says_how_to_pass_it(tmp_path, monkeypatch, capfd):
    from helpers.cli import fail

    assert fail(["task=ner"], tmp_path, monkeypatch, capfd).startswith("no data given: pass data=<file, directory or "
                                                                       "Hub dataset id>")
