"""task=translation / task=summarization on tiny random models of each family (T5, BART, mBART-50, a BERT2BERT warm
start, a decoder-only Llama): data shapes and their errors, features per family, and the whole walk -- train, generate,
export, the shipped pipeline -- on both engines, with LoRA, through the CLI, and resumed after a kill."""

from __future__ import annotations

import gzip
import json

import pytest

from finetune import validate
from helpers import seq2seq_models as tiny
from helpers.cli import compose_cfg, run_main
from helpers.data import read_jsonl, write_jsonl
from helpers.processes import assert_same_scores, kill_and_resume, run_cli
from helpers.seq2seq_models import ROWS, features, write_parallel

pytestmark = pytest.mark.usefixtures("one_thread")
# the tiny models learn part of the toy translation in these settings (test chrF far above the base model's)
TRAIN = ["trainer.num_train_epochs=4", "trainer.learning_rate=5e-3", "trainer.per_device_train_batch_size=16",
         "trainer.warmup_ratio=0", "trainer.logging_steps=10", "task.generation.max_new_tokens=10"]

# task=translation trains 4 pairs a micro-batch, 4 accumulated; the settings above were chosen for 16 pairs a step in one
TRANSLATION = ["task=translation", "trainer.gradient_accumulation_steps=1"]
# a tiny decoder-only model learns to attend back to the source slower: 200 steps for translation, 120 for summarization
DECODER_ONLY = ["trainer.eval_strategy=steps", "trainer.learning_rate=1e-2"]


def load(*overrides):
    from finetune import data
    from finetune.tasks import get_task

    cfg = compose_cfg(*overrides)
    task = get_task(cfg.task)
    return task, data.load(cfg.data, task), cfg


# --- data -------------------------------------------------------------------------------------
def test_parallel_directory_gives_line_aligned_splits(tmp_path):
    write_parallel(tmp_path / "multi30k")
    (tmp_path / "multi30k" / "README.md").write_text("not data")
    task, raw, _ = load("task=translation", f"data={tmp_path / 'multi30k'}")
    assert {s: len(d) for s, d in raw.items()} == {"train": 240, "validation": 30, "test": 30}
    assert raw["train"][0] == {"source": ROWS[0][0], "references": [ROWS[0][1]]}
    assert raw["test"][-1] == {"source": ROWS[-1][0], "references": [ROWS[-1][1]]}


@pytest.mark.parametrize("case, message", [
    ("mismatch", "train.en has 3 lines but {d}/train.de.gz has 2; parallel files must match line for line"),
    ("empty", "train.de.gz:2 is empty; every line needs its translation"),
    ("alone", "has no parallel file train.de beside it; set task.source_lang / task.target_lang"),
    ("json_empty", "row 1 of the train data has an empty target; fill it in or remove the row"),
    ("keys", "a translation row of the train data has en, fr, not en and de; set task.source_lang="),
    ("columns", "the train data needs a source and a target column (data.source_column=source, "
                "data.target_column=target) but has none (renamed)"),
    ("summarize", "column 'source' (data.source_column) not found in the train data; available columns: text"),
])
def test_data_errors_are_one_line(tmp_path, case, message):
    from finetune.errors import FinetuneError

    d = tmp_path / "d"
    d.mkdir()
    if case in ("mismatch", "empty", "alone"):
        en, de = ["a man", "a dog", "a cat"], {"mismatch": ["ein mann", "ein hund"], "empty": ["ein mann", "", "x"],
                                               "alone": None}[case]
        (d / "train.en").write_text("\n".join(en) + "\n")
        if de is not None:
            with gzip.open(d / "train.de.gz", "wt") as f:
                f.write("\n".join(de) + "\n")
        source = d / "train.en"
    else:
        rows = {"json_empty": [{"source": "a", "target": "b"}, {"source": "a", "target": [" "]}],
                "keys": [{"translation": {"en": "a", "fr": "b"}}],
                "columns": [{"text": "a"}], "summarize": [{"text": "a"}]}[case]
        source = write_jsonl(d / "train.jsonl", rows * 3)
    with pytest.raises(FinetuneError) as e:
        load("task=summarization" if case == "summarize" else "task=translation", f"data={source}")
    assert message.format(d=d) in str(e.value)


def test_rows_translation_dicts_sentence_lists_and_references(tmp_path):
    rows = [{"translation": {"en": s, "de": t, "fr": "x"}} for s, t in ROWS[:40]]
    _, raw, _ = load("task=translation", f"data={write_jsonl(tmp_path / 'hub.jsonl', rows)}")
    assert sorted(s for split in raw.values() for s in split["source"]) == sorted(s for s, _ in ROWS[:40])
    rows = [{"source": ["First sentence.", " Second one. "], "target": ["ref one", "ref two"]}] * 30
    task, raw, _ = load("task=summarization", f"data={write_jsonl(tmp_path / 'tldr.jsonl', rows)}",
                        "data.references=each")
    assert raw["test"][0] == {"source": "First sentence. Second one.", "references": ["ref one", "ref two"]}
    assert task._pairs(raw["train"], "train")[1][:2] == ["ref one", "ref two"]  # each reference is a training pair
    assert task._pairs(raw["test"], "test")[1][:1] == ["ref one"]  # held-out loss: the first


def test_without_data_the_error_says_how_to_pass_it():
    from finetune.errors import FinetuneError

    with pytest.raises(FinetuneError, match=r"data=<directory> with train.en \+ train.de \(line N <-> line N"):
        load("task=translation")


def test_each_seq2seq_task_has_its_own_schema():
    from hydra.errors import ConfigCompositionException

    cfg = compose_cfg("task=summarization")
    assert "source_lang" not in cfg.task and "translation_column" not in cfg.data and "references" in cfg.data
    assert cfg.model.name_or_path == "bundled:smollm2"  # the offline default of both tasks
    with pytest.raises(ConfigCompositionException):
        compose_cfg("task=summarization", "task.source_lang=en")
    with pytest.raises(ConfigCompositionException):
        compose_cfg("task=sentiment", "task.prompt_template=x")
    assert compose_cfg("task=translation", "model=bert2bert").model.name_or_path == "bundled:minilm"


# --- features per family ----------------------------------------------------------------------
def test_encoder_decoder_features_t5_prefix_bart_and_mbart_language_codes(s2s_models):
    task, tok, row, _ = features(s2s_models["t5"])
    assert tok.convert_ids_to_tokens(row["input_ids"]) == [*tiny.PREFIX.split(), "a", "man", "runs", "</s>"]
    assert tok.convert_ids_to_tokens(row["labels"]) == ["ein", "mann", "rennt", "</s>"]
    _, tok, row, _ = features(s2s_models["t5"], "task.prefix=")  # an explicit prefix wins (here: none)
    assert tok.convert_ids_to_tokens(row["input_ids"]) == ["a", "man", "runs", "</s>"]
    _, tok, row, _ = features(s2s_models["bart"])
    assert tok.convert_ids_to_tokens(row["labels"]) == ["<s>", "ein", "mann", "rennt", "</s>"]
    task, tok, row, cfg = features(s2s_models["mbart"])
    assert tok.convert_ids_to_tokens(row["input_ids"])[0] == "en_XX"
    assert tok.convert_ids_to_tokens(row["labels"])[0] == "de_DE"
    model = task.load_model(s2s_models["mbart"], cfg.model)
    assert model.generation_config.forced_bos_token_id == tok.convert_tokens_to_ids("de_DE")
    from finetune.errors import FinetuneError

    with pytest.raises(FinetuneError, match="none fits 'xx': set task.target_lang_code=<code>"):
        features(s2s_models["mbart"], "task.target_lang=xx")


def test_warm_started_encoder_decoder_generates_from_cls_and_stops_at_sep(s2s_models):
    bert = s2s_models["bert"]
    task, tok, row, cfg = features("bert2bert", f"model.encoder={bert}", f"model.decoder={bert}")
    assert tok.convert_ids_to_tokens(row["labels"]) == ["ein", "mann", "rennt", "[SEP]"]  # [CLS] is the start token
    model = task.load_model(cfg.model.name_or_path, cfg.model)
    g = model.generation_config
    assert (g.decoder_start_token_id, g.eos_token_id, g.pad_token_id) == (tok.cls_token_id, tok.sep_token_id,
                                                                          tok.pad_token_id)
    assert model.config.decoder.add_cross_attention and model.config.decoder.is_decoder
    # what model=bert2bert trains at trainer.new_parameters_lr_scale (10) x the rate: all the new, none of the loaded
    from finetune import adapters

    assert cfg.trainer.new_parameters_lr_scale == 10
    new = adapters.new_parameters(model)
    assert new and all(".crossattention." in n or ".cls.predictions.transform." in n
                       or n == "decoder.cls.predictions.bias" for n in new), sorted(new)
    assert {n.split(".crossattention.")[0] for n in new if ".crossattention." in n} == \
        {f"decoder.bert.encoder.layer.{i}" for i in range(model.config.decoder.num_hidden_layers)}


def test_dropouts_reach_every_family_that_has_them(s2s_models, caplog):
    """model.attention_dropout / hidden_dropout set the checkpoint's own keys (0 attention dropout lets PyTorch's fused
    attention kernel run)."""
    from finetune.errors import FinetuneError

    bert = s2s_models["bert"]
    task, _, _, cfg = features("bert2bert", f"model.encoder={bert}", f"model.decoder={bert}",
                               "model.attention_dropout=0", "model.hidden_dropout=0.05")
    model = task.load_model(cfg.model.name_or_path, cfg.model)
    assert model.config.encoder.attention_probs_dropout_prob == model.config.decoder.attention_probs_dropout_prob == 0
    assert model.config.encoder.hidden_dropout_prob == model.config.decoder.hidden_dropout_prob == 0.05
    task, _, _, cfg = features(s2s_models["bart"], "model.hidden_dropout=0")
    config = task.load_model(s2s_models["bart"], cfg.model).config
    assert (config.dropout, config.attention_dropout) == (0, 0.0)  # the other stays the checkpoint's own
    task, _, _, cfg = features(s2s_models["t5"], "model.hidden_dropout=0.2")
    assert task.load_model(s2s_models["t5"], cfg.model).config.dropout_rate == 0.2
    task, _, _, cfg = features(s2s_models["llama"], "model.hidden_dropout=0")
    task.load_model(s2s_models["llama"], cfg.model)
    assert "model.hidden_dropout=0.0 is not applied" in caplog.text and "(llama) has no hidden dropout" in caplog.text
    task, _, _, cfg = features(s2s_models["llama"], "model.attention_dropout=0.25")
    assert task.load_model(s2s_models["llama"], cfg.model).config.attention_dropout == 0.25
    task, _, _, cfg = features(s2s_models["t5"], "model.attention_dropout=0")
    task.load_model(s2s_models["t5"], cfg.model)  # T5 has no such setting: said, not silently ignored
    assert "model.attention_dropout=0.0 is not applied" in caplog.text and "(t5) has no attention dropout" in caplog.text
    with pytest.raises(FinetuneError, match="model.attention_dropout must be at least 0 and below 1"):
        validate.model(compose_cfg("model.attention_dropout=1.5"))
    with pytest.raises(FinetuneError, match="model.hidden_dropout must be at least 0 and below 1"):
        validate.model(compose_cfg("model.hidden_dropout=-0.1"))


def test_decoder_only_loss_is_on_the_target_and_its_end_of_turn_only(s2s_models):
    task, tok, row, _ = features(s2s_models["llama"], "task.prompt_template='translate {source}'")
    trained = [tok.convert_ids_to_tokens(i) for i, label in zip(row["input_ids"], row["labels"]) if label != -100]
    assert trained == ["ein", "mann", "rennt", "<|im_end|>"]
    prompt = tok.apply_chat_template([{"role": "user", "content": "translate a man runs"}], tokenize=True,
                                     add_generation_prompt=True, return_dict=False)
    assert row["input_ids"][: len(prompt)] == list(prompt)  # a chat user turn, as the pipeline renders it
    _, tok, row, _ = features(s2s_models["llama_plain"], "task.prompt_template='translate {source}'")
    n = len(tok("translate a man runs")["input_ids"])
    assert row["labels"][:n] == [-100] * n and row["labels"][n:] == row["input_ids"][n:]
    assert tok.convert_ids_to_tokens(row["input_ids"][n:]) == ["ein", "mann", "rennt", tok.eos_token]


# --- the whole walk ---------------------------------------------------------------------------
def train(tmp_path, *overrides):
    from finetune.run import run

    cfg = compose_cfg(*overrides, *TRAIN)
    run_dir = tmp_path / "run"
    metrics = run(cfg, run_dir)
    return metrics, run_dir / "model"


def check_learned_and_verified(metrics, main, score, margin):
    """It learned (the score beats the base model's by the margin) and the exported pipeline reproduces it."""
    assert metrics[f"test_{score}"] > metrics[f"base_test_{score}"] + margin, metrics
    assert metrics["test_loss"] < metrics["base_test_loss"]
    assert metrics[f"pipeline_test_{main}"] == pytest.approx(metrics[f"test_{main}"], abs=1e-9)


@pytest.mark.slow
def test_t5_translation_round_trip_through_the_shipped_pipeline(s2s_models, tmp_path, caplog):
    import logging

    from transformers import pipeline

    with caplog.at_level(logging.INFO, logger="finetune.tasks.seq2seq"):
        metrics, model_dir = train(tmp_path, *TRANSLATION, f"model={s2s_models['t5']}",
                                   f"data={write_parallel(tmp_path / 'data')}")
    check_learned_and_verified(metrics, "bleu", "chrf", 5)
    # the base model's test scores first, then one validation generation per epoch (best-model selection), the
    # restored best model's test scores; its validation scores are those of the evaluation that chose it
    generated = [r.getMessage().split(":")[0] for r in caplog.records if "generated" in r.getMessage()]
    assert generated == ["test", *["validation"] * 4, "test"]
    assert {"test_bleu", "test_chrf", "test_gen_len", "validation_bleu", "test_generation_new_tokens_per_second"} \
        <= set(metrics)
    config = json.loads((model_dir / "config.json").read_text())
    assert config["custom_pipelines"]["translation"]["impl"] == "seq2seq.Seq2SeqPipeline"
    assert config["seq2seq"]["prefix"] == tiny.PREFIX + " "
    assert json.loads((model_dir / "generation_config.json").read_text())["max_new_tokens"] == 10
    translator = pipeline(model=str(model_dir), trust_remote_code=True)
    one = translator("a man runs")
    assert isinstance(one, list) and list(one[0]) == ["translation_text"]
    many = translator(["a man runs", "the dog sits on the red ball", "a cat"], batch_size=2, num_beams=2)
    assert len(many) == 3 and all(set(o) == {"translation_text"} for o in many)
    assert translator(["a man runs"], max_new_tokens=1)[0]["translation_text"].count(" ") == 0
    samples = [json.loads(line) for line in (model_dir.parent / "samples.jsonl").read_text().splitlines()]
    assert samples[0]["source"] == ROWS[270][0] and samples[0]["references"] == [ROWS[270][1]]
    assert "## Samples (test split)" in (model_dir / "README.md").read_text()

    # finetune.predict and finetune.evaluate go through the same exported pipeline
    from finetune import predict
    from finetune.evaluate import evaluate

    write_jsonl(tmp_path / "in.jsonl", [{"source": s} for s, _ in ROWS[270:]])
    assert run_main(predict, [str(model_dir), str(tmp_path / "in.jsonl"), "--output", str(tmp_path / "p.jsonl"),
                              "--batch-size", "4"]) == 0
    expected = translator([s for s, _ in ROWS[270:]])
    assert read_jsonl(tmp_path / "p.jsonl") == expected
    result = evaluate(model_dir, [f"data={tmp_path / 'data'}"], tmp_path / "eval.json")
    assert result["split"] == "test" and result["bleu"] == pytest.approx(metrics["pipeline_test_bleu"])


@pytest.mark.slow
def test_bart_summarization_on_the_accelerate_engine_with_references_and_sentence_lists(s2s_models, tmp_path):
    rows = [{"source": s.split(" on "), "target": [t, t.split()[0]]} for s, t in ROWS]
    data = write_jsonl(tmp_path / "tldr.jsonl", rows)
    metrics, model_dir = train(tmp_path, "task=summarization", f"model={s2s_models['bart']}", f"data={data}",
                               "trainer=accelerate", "trainer.max_steps=150", "trainer.eval_strategy=steps",
                               "trainer.eval_steps=50", "trainer.learning_rate=5e-3", "task.max_source_length=64",
                               "task.generation.num_beams=3")
    check_learned_and_verified(metrics, "rougeL", "rougeL", 0.05)  # beam search in evaluation and in the pipeline
    assert {"test_rouge1", "test_rouge2", "test_rougeLsum"} <= set(metrics) and "test_bleu" not in metrics
    assert json.loads((model_dir / "generation_config.json").read_text())["num_beams"] == 3
    from transformers import pipeline

    summarizer = pipeline("summarization", model=str(model_dir), trust_remote_code=True)
    assert list(summarizer("a man runs")[0]) == ["summary_text"]
    assert summarizer.model.generation_config.num_beams == 3
    inputs = summarizer.tokenizer(["a man runs on the street"], return_tensors="pt")
    beams = summarizer.model.generate(**inputs, num_beams=3, max_new_tokens=10)[0, 1:].tolist()
    expected = summarizer.tokenizer.decode(beams, skip_special_tokens=True).strip()
    assert summarizer("a man runs on the street")[0]["summary_text"] == expected


@pytest.mark.slow
def test_bert2bert_with_lora_exports_merged_weights_and_the_adapter(s2s_models, tmp_path):
    metrics, model_dir = train(tmp_path, *TRANSLATION, "model=bert2bert", f"model.encoder={s2s_models['bert']}",
                               f"model.decoder={s2s_models['bert']}", f"data={write_parallel(tmp_path / 'data')}",
                               "peft=lora", "peft.r=8", "trainer.learning_rate=1e-2")
    assert metrics["test_loss"] < metrics["base_test_loss"]
    assert metrics["pipeline_test_bleu"] == pytest.approx(metrics["test_bleu"], abs=1e-9)
    adapter = json.loads((model_dir / "adapter" / "adapter_config.json").read_text())
    assert adapter["task_type"] == "SEQ_2_SEQ_LM" and any("crossattention" in m for m in adapter["modules_to_save"])
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    model = AutoModelForSeq2SeqLM.from_pretrained(model_dir)
    assert type(model).__name__ == "EncoderDecoderModel" and not any("lora" in n for n, _ in model.named_parameters())
    # the model card's recipe puts the adapter on a freshly warm-started base: it writes what the merged model writes
    card = (model_dir / "README.md").read_text()
    code = card.split("## LoRA")[1].split("```python")[1].split("```")[0]
    code = code.replace("path/to/this/directory", str(model_dir))
    scope = {}
    exec(code, scope)
    tok = AutoTokenizer.from_pretrained(model_dir)
    inputs = tok(["a man runs", "the dog sits"], return_tensors="pt", padding=True)
    expected = model.generate(**inputs).tolist()
    assert scope["model"].generate(**inputs).tolist() == expected


@pytest.mark.slow
def test_decoder_only_translation_also_loads_as_text_generation(s2s_models, tmp_path):
    metrics, model_dir = train(tmp_path, *TRANSLATION, f"model={s2s_models['llama']}",
                               f"data={write_parallel(tmp_path / 'data')}", *DECODER_ONLY,
                               "trainer.max_steps=200", "trainer.eval_steps=100")
    check_learned_and_verified(metrics, "bleu", "chrf", 5)
    assert metrics["pipeline_test_text_generation_prompts_matched"] == 4  # pipeline("text-generation") agrees
    config = json.loads((model_dir / "config.json").read_text())
    assert config["custom_pipelines"]["translation"]["pt"] == ["AutoModelForCausalLM"]
    assert config["seq2seq"]["chat_template"] is True


@pytest.mark.slow
def test_cli_summarization_decoder_only(s2s_models, tmp_path):
    rows = [{"source": s, "target": t} for s, t in ROWS]
    write_jsonl(tmp_path / "docs.jsonl", rows)
    proc = run_cli("task=summarization", f"model={s2s_models['llama_plain']}", "data=docs.jsonl", "trainer=accelerate",
                   "task.prompt_template='summarize: {source}'", *TRAIN, *DECODER_ONLY, "trainer.max_steps=120",
                   "trainer.eval_steps=60", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = next((tmp_path / "runs" / "summarization").iterdir())
    metrics = json.loads((run / "metrics.json").read_text())
    check_learned_and_verified(metrics, "rougeL", "rougeL", 0.05)
    assert "checkpoints" not in {p.name for p in run.iterdir()}

    from transformers import pipeline

    summarizer = pipeline(model=str(run / "model"), trust_remote_code=True)
    generator = pipeline("text-generation", model=str(run / "model"))
    text = summarizer("a man runs")[0]["summary_text"]
    assert generator("summarize: a man runs", return_full_text=False)[0]["generated_text"].strip() == text


@pytest.mark.slow
def test_killed_translation_run_resumes_to_the_same_metrics(s2s_models, tmp_path):
    write_parallel(tmp_path / "data")
    args = [*TRANSLATION, f"model={s2s_models['t5']}", "data=data", *TRAIN, "trainer.eval_strategy=steps",
            "trainer.eval_steps=10"]
    resumed = kill_and_resume(args, tmp_path, "translation", 20)
    assert "test_bleu" in assert_same_scores(resumed.run_dir, resumed.reference, rel=1e-4, abs=1e-6)
