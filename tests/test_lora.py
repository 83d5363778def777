"""peft=lora: only adapters + head train, the head is saved, the export loads without peft, the adapter reloads."""

import json
import subprocess
import sys

import pytest
import torch
import yaml
from safetensors import safe_open

from finetune import adapters, validate
from finetune.errors import FinetuneError
from finetune.export import export
from finetune.tasks import get_task
from finetune.tasks.base import auto_class
from helpers.cli import TINY_TRAINER, compose_cfg
from helpers.data import make_sentences

TEXTS = ["the movie was wonderful", "a dull and tedious film", "the acting was superb", "boring plot",
         "really great cast", "an awful script"]


def _task_and_model(tiny_bert, *overrides):
    cfg = compose_cfg(f"model={tiny_bert}", "peft=lora", *overrides)
    task = get_task(cfg.task)
    task.labels = ["neg", "pos"]
    return cfg, task, task.load_model(str(tiny_bert), cfg.model)


def test_peft_config_sets_its_learning_rate_and_dropouts_and_the_command_line_wins():
    cfg = compose_cfg()
    assert cfg.trainer.learning_rate == pytest.approx(1e-4)
    assert cfg.model.attention_dropout is None and cfg.model.hidden_dropout is None  # full fine-tuning: the model's
    cfg = compose_cfg("peft=lora")
    assert cfg.peft.method == "lora" and cfg.peft.target_modules == "ffn"
    assert cfg.trainer.learning_rate == pytest.approx(1e-3)
    assert cfg.model.attention_dropout == 0 and cfg.model.hidden_dropout is None
    assert compose_cfg("peft=lora", "model.attention_dropout=0.1").model.attention_dropout == pytest.approx(0.1)
    assert compose_cfg("peft=lora", "trainer.learning_rate=3e-4").trainer.learning_rate == pytest.approx(3e-4)
    assert list(compose_cfg("peft=lora", "peft.target_modules=[query,value]").peft.target_modules) == ["query", "value"]


def test_wrap_trains_only_lora_and_the_head(tiny_bert):
    cfg, task, model = _task_and_model(tiny_bert)
    full = adapters.parameter_counts(model)
    assert full["trainable_params"] == full["total_params"] == sum(p.numel() for p in model.parameters())
    r = cfg.peft.r
    # ffn: each block's intermediate.dense and output.dense (not attention's output.dense, nor the pooler) gets
    # A (r x in) and B (out x r); the head is trained in full
    lora = sum(r * (m.in_features + m.out_features) for n, m in model.named_modules()
               if n.endswith(("intermediate.dense", "output.dense")) and "attention" not in n)
    head = sum(p.numel() for p in model.classifier.parameters())
    wrapped = adapters.wrap(model, cfg.peft, task)
    trainable = [n for n, p in wrapped.named_parameters() if p.requires_grad]
    assert all("lora_" in n or "classifier.modules_to_save" in n for n in trainable), trainable
    assert any("classifier.modules_to_save" in n for n in trainable)
    counts = adapters.parameter_counts(wrapped)
    assert counts["trainable_params"] == lora + head
    assert counts["total_params"] == full["total_params"] + lora + head  # the head's frozen original is kept
    assert adapters.wrap(model, compose_cfg().peft, task) is model  # peft=none: untouched


@pytest.mark.parametrize("task_name", ["sentiment", "ner", "qa"])
def test_wrapped_model_sees_every_input(task_name, tiny_bert):
    """Segment ids reach the model (peft's PeftModelForQuestionAnswering drops token_type_ids)."""
    cfg = compose_cfg(f"task={task_name}", f"model={tiny_bert}", "peft=lora")
    task = get_task(cfg.task)
    model = auto_class(task.auto_model).from_pretrained(tiny_bert, **({} if task_name == "qa" else {"num_labels": 3})).eval()
    with torch.no_grad():  # a trained head and a nonzero adapter, as after training
        for name, param in model.named_parameters():
            if name.startswith(("classifier", "qa_outputs")):
                param.normal_()
    wrapped = adapters.wrap(model, cfg.peft, task).eval()
    ids = torch.randint(5, 40, (2, 12))
    segments = (torch.arange(12) >= 6).long().expand(2, 12)
    with torch.no_grad():
        with_segments = wrapped(input_ids=ids, token_type_ids=segments)
        without = wrapped(input_ids=ids)
        plain = adapters.merge(wrapped)(input_ids=ids, token_type_ids=segments)
    assert not torch.allclose(with_segments[0], without[0])
    torch.testing.assert_close(with_segments[0], plain[0])  # the merged export computes what training did


def _save_tiny(model_cls, config, path):
    torch.manual_seed(0)
    model_cls(config).save_pretrained(path)
    return path


def test_head_discovery_across_architectures(tmp_path):
    from transformers import (AutoModelForCausalLM, AutoModelForQuestionAnswering, AutoModelForSequenceClassification,
                              BertConfig, BertModel, DistilBertConfig, DistilBertModel, LlamaConfig, LlamaForCausalLM,
                              RobertaConfig, RobertaModel)

    kw = dict(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
              max_position_embeddings=40)
    bert = _save_tiny(BertModel, BertConfig(**kw), tmp_path / "bert")
    cases = [
        (AutoModelForSequenceClassification, bert, ["classifier"]),
        (AutoModelForQuestionAnswering, bert, ["qa_outputs"]),
        (AutoModelForSequenceClassification, _save_tiny(
            DistilBertModel, DistilBertConfig(vocab_size=64, dim=16, n_layers=1, n_heads=2, hidden_dim=32),
            tmp_path / "distil"), ["classifier", "pre_classifier"]),  # peft's default would miss pre_classifier
        (AutoModelForSequenceClassification, _save_tiny(RobertaModel, RobertaConfig(**kw), tmp_path / "roberta"),
         ["classifier"]),
        (AutoModelForCausalLM, _save_tiny(  # the LM head is the pretrained (tied) embedding: LoRA only
            LlamaForCausalLM, LlamaConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                          intermediate_size=32, tie_word_embeddings=True), tmp_path / "llama"), []),
        # a checkpoint without a pooler: the newly initialized pooler must train too, not stay random and frozen
        (AutoModelForSequenceClassification, tmp_path / "nopool", ["bert.pooler", "classifier"]),
    ]
    torch.manual_seed(0)
    BertModel(BertConfig(**kw), add_pooling_layer=False).save_pretrained(tmp_path / "nopool")
    for auto_cls, path, expected in cases:
        assert adapters.trainable_modules(auto_cls.from_pretrained(path)) == expected, (auto_cls, path)
    built = AutoModelForSequenceClassification.from_config(BertConfig(**kw))
    assert adapters.trainable_modules(built) == ["classifier"]  # no load flags: the structure alone


def test_bad_peft_settings_are_one_line_errors(tiny_bert):
    cfg, task, model = _task_and_model(tiny_bert, "peft.target_modules=[nonexistent]")
    with pytest.raises(FinetuneError, match=r"peft.target_modules=\['nonexistent'\] does not fit this model.*query"):
        adapters.wrap(model, cfg.peft, task)
    cfg, task, model = _task_and_model(tiny_bert, "peft.modules_to_save=[headless]")
    with pytest.raises(FinetuneError, match="peft.modules_to_save names no module of this model: headless"):
        adapters.wrap(model, cfg.peft, task)
    with pytest.raises(FinetuneError, match="unknown peft.method 'ia3'"):
        validate.peft(compose_cfg("peft.method=ia3").peft)


@pytest.fixture(scope="module")
def trained_export(tiny_bert, tmp_path_factory):
    """A few optimizer steps on the wrapped model (head included), its logits, and its export (its tests are marked
    slow: they share its cost)."""
    cfg, task, model = _task_and_model(tiny_bert)
    tokenizer = task.load_tokenizer(str(tiny_bert), cfg.model)
    initial_head = model.classifier.weight.detach().clone()
    model = adapters.wrap(model, cfg.peft, task)
    rows = make_sentences(64)
    batch = tokenizer([t for t, _ in rows], return_tensors="pt", padding=True)
    labels = torch.tensor([int(label == "pos") for _, label in rows])
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(8):
        optimizer.zero_grad()
        model(**batch, labels=labels).loss.backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        logits = model(**tokenizer(TEXTS, return_tensors="pt", padding=True)).logits
    trained_head = model.base_model.model.classifier.modules_to_save["default"].weight
    assert not torch.allclose(trained_head, initial_head, atol=1e-3)  # the head really trained
    model_dir = export(model, tokenizer, task, cfg, {"test_accuracy": 0.5}, tmp_path_factory.mktemp("lora") / "model")
    return cfg, task, logits, model_dir


@pytest.mark.slow
def test_export_reloads_the_trained_head_with_plain_transformers(trained_export, tiny_bert):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, pipeline

    cfg, task, logits, model_dir = trained_export
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    reloaded = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    with torch.no_grad():
        got = reloaded(**tokenizer(TEXTS, return_tensors="pt", padding=True)).logits
    torch.testing.assert_close(got, logits, atol=1e-4, rtol=1e-4)
    # the classic failure (a random head on reload) would be caught: a fresh head gives other logits
    torch.manual_seed(123)
    fresh = AutoModelForSequenceClassification.from_pretrained(tiny_bert, **task.model_kwargs()).eval()
    with torch.no_grad():
        assert not torch.allclose(fresh(**tokenizer(TEXTS, return_tensors="pt", padding=True)).logits, logits, atol=1e-2)
    scores = pipeline("text-classification", model=str(model_dir), top_k=None)(TEXTS)
    probs = torch.softmax(logits, -1)
    for row, p in zip(scores, probs):
        assert {s["label"]: s["score"] for s in row} == pytest.approx({"neg": p[0].item(), "pos": p[1].item()}, abs=1e-4)


@pytest.mark.slow
def test_export_has_no_peft_dependency(trained_export):
    cfg, task, logits, model_dir = trained_export
    names = {p.name for p in model_dir.iterdir()}
    assert "adapter_config.json" not in names and "adapter_model.safetensors" not in names
    assert "peft" not in (model_dir / "config.json").read_text().lower()
    with safe_open(model_dir / "model.safetensors", "pt") as f:
        assert not [k for k in f.keys() if "lora_" in k or "modules_to_save" in k or "base_model" in k]
    code = f"""
import importlib.abc, json, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "peft" or name.startswith("peft."):
            raise ImportError("peft is blocked")
sys.meta_path.insert(0, Block())
sys.modules["peft"] = None
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer, pipeline
d = {str(model_dir)!r}
tok = AutoTokenizer.from_pretrained(d)
model = AutoModelForSequenceClassification.from_pretrained(d).eval()
with torch.no_grad():
    logits = model(**tok({TEXTS!r}, return_tensors="pt", padding=True)).logits
labels = [o["label"] for o in pipeline("text-classification", model=d)({TEXTS!r})]
assert sys.modules.get("peft") is None
print(json.dumps({{"logits": logits.tolist(), "labels": labels}}))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    torch.testing.assert_close(torch.tensor(out["logits"]), logits, atol=1e-4, rtol=1e-4)
    assert out["labels"] == [task.labels[i] for i in logits.argmax(-1).tolist()]


@pytest.mark.slow
def test_adapter_folder_loads_onto_the_base_with_peft(trained_export, tiny_bert):
    from peft import PeftModel
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    cfg, task, logits, model_dir = trained_export
    adapter = model_dir / "adapter"
    assert {"adapter_model.safetensors", "adapter_config.json", "README.md"} <= {p.name for p in adapter.iterdir()}
    with safe_open(adapter / "adapter_model.safetensors", "pt") as f:
        assert any("classifier" in k for k in f.keys()) and any("lora_A" in k for k in f.keys())
    assert json.loads((adapter / "adapter_config.json").read_text())["r"] == cfg.peft.r
    torch.manual_seed(7)  # a different random head under the adapter: the saved one must replace it
    base = AutoModelForSequenceClassification.from_pretrained(tiny_bert, config=AutoConfig.from_pretrained(model_dir))
    model = PeftModel.from_pretrained(base, adapter).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    with torch.no_grad():
        got = model(**tokenizer(TEXTS, return_tensors="pt", padding=True)).logits
    torch.testing.assert_close(got, logits, atol=1e-4, rtol=1e-4)
    card = (model_dir / "README.md").read_text()
    assert f"PEFT: lora (r={cfg.peft.r})" in card and "## LoRA" in card and "`adapter/`" in card


@pytest.mark.usefixtures("sentiment_csv")  # tmp_path/reviews.csv
@pytest.mark.slow
def test_cli_run_with_lora(tiny_bert, tmp_path, monkeypatch, capfd):
    from helpers.cli import cli_main

    code, _, err = cli_main(["task=sentiment", f"model={tiny_bert}", "data=reviews.csv", "data.text_column=review",
                             "data.label_column=sentiment", "peft=lora", *TINY_TRAINER, "trainer.learning_rate=5e-3"],
                            tmp_path, monkeypatch, capfd)
    assert code == 0, err[-3000:]
    (run,) = (tmp_path / "runs" / "sentiment").iterdir()
    metrics = json.loads((run / "metrics.json").read_text())
    assert 0 < metrics["trainable_params"] < metrics["total_params"] / 2
    assert abs(metrics["test_accuracy"] - metrics["pipeline_test_accuracy"]) <= 0.005
    assert (run / "model" / "adapter" / "adapter_model.safetensors").is_file()
    assert "peft" not in (run / "model" / "config.json").read_text().lower()
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["peft"]["method"] == "lora" and saved["trainer"]["learning_rate"] == pytest.approx(5e-3)
    assert "trainable parameters: %d of %d" % (metrics["trainable_params"], metrics["total_params"]) in \
        (run / "finetune.log").read_text()


def test_feed_forward_layers_of_each_architecture():
    """peft.target_modules=ffn: the feed-forward linear layers of every block, never attention, pooler or head."""
    from transformers import (AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoModelForSequenceClassification,
                              BartConfig, BertConfig, GPT2Config, LlamaConfig, T5Config)

    small = dict(vocab_size=64)
    cases = [
        (AutoModelForSequenceClassification, BertConfig(**small, hidden_size=16, num_hidden_layers=2,
                                                        num_attention_heads=2, intermediate_size=32),
         {"bert.encoder.layer.0.intermediate.dense", "bert.encoder.layer.0.output.dense"}),
        (AutoModelForCausalLM, LlamaConfig(**small, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                           intermediate_size=32),
         {"model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj", "model.layers.0.mlp.down_proj"}),
        (AutoModelForCausalLM, GPT2Config(**small, n_embd=16, n_layer=2, n_head=2),
         {"transformer.h.0.mlp.c_fc", "transformer.h.0.mlp.c_proj"}),
        (AutoModelForSeq2SeqLM, T5Config(**small, d_model=16, d_ff=32, d_kv=8, num_layers=2, num_heads=2),
         {"encoder.block.0.layer.1.DenseReluDense.wi", "encoder.block.0.layer.1.DenseReluDense.wo",
          "decoder.block.0.layer.2.DenseReluDense.wi", "decoder.block.0.layer.2.DenseReluDense.wo"}),
        (AutoModelForSeq2SeqLM, BartConfig(**small, d_model=16, encoder_layers=2, decoder_layers=2,
                                           encoder_attention_heads=2, decoder_attention_heads=2,
                                           encoder_ffn_dim=32, decoder_ffn_dim=32),
         {"model.encoder.layers.0.fc1", "model.encoder.layers.0.fc2", "model.decoder.layers.0.fc1",
          "model.decoder.layers.0.fc2"}),
    ]
    for auto, config, first_block in cases:
        names = adapters.feed_forward_layers(auto.from_config(config))
        block0 = {n for n in names if ".0." in n}
        assert block0 == first_block, (config.model_type, names)
        assert len(names) == 2 * len(first_block)  # the same layers in the second block; nothing else
    with pytest.raises(FinetuneError, match="peft.target_modules=ffn finds no feed-forward layer"):
        adapters.feed_forward_layers(torch.nn.ModuleDict({"head": torch.nn.Linear(2, 2)}))


def test_evaluation_folds_the_adapters_in_and_out(tiny_bert):
    cfg, task, model = _task_and_model(tiny_bert)
    wrapped = adapters.wrap(model, cfg.peft, task).eval()
    with torch.no_grad():
        for name, param in wrapped.named_parameters():
            if "lora_B" in name:
                param.normal_()  # a trained adapter: it changes the output
    layers = [m for m in wrapped.modules() if hasattr(m, "merged")]
    before = {n: p.detach().clone() for n, p in wrapped.named_parameters()}
    ids = torch.randint(5, 40, (2, 12))
    with torch.no_grad():
        unmerged = wrapped(input_ids=ids).logits
        with adapters.merged_for_inference(wrapped):
            assert layers and all(m.merged for m in layers)
            folded = wrapped(input_ids=ids).logits
    assert torch.allclose(folded, unmerged, atol=1e-5)
    assert not any(m.merged for m in layers)
    assert all(torch.allclose(p, before[n], atol=1e-6) for n, p in wrapped.named_parameters())
    with adapters.merged_for_inference(wrapped, sharded=True):
        assert not any(m.merged for m in layers)  # FSDP shards: left alone
