"""Memory levers on tiny random models: model.dtype (what it loads, what auto picks, the export in that dtype
through its pipeline, the LoRA merge on a 16-bit base), gradient checkpointing (the same gradients as without, with
and without LoRA; both engines wire it) and the memory figures a run writes to metrics.json."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from finetune import adapters, memory, validate
from finetune.engines import make_engine
from finetune.errors import FinetuneError
from finetune.tasks import get_task
from helpers.cli import LM_TRAINER, compose_cfg, fail
from helpers.data import lm_corpus
from helpers.processes import run_cli

pytestmark = pytest.mark.usefixtures("one_thread")

def _generation(tiny_llama, *overrides):
    cfg = compose_cfg("task=generation", f"model={tiny_llama}", *overrides)
    return cfg, get_task(cfg.task)


# --- model.dtype ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["float32", "bfloat16", "float16"])
def test_model_dtype_loads_what_it_says(tiny_llama, name):
    cfg, task = _generation(tiny_llama, f"model.dtype={name}")
    model = task.load_model(str(tiny_llama), cfg.model, memory.model_dtype(cfg))
    assert {p.dtype for p in model.parameters()} == {getattr(torch, name)}


def test_auto_dtype(tiny_llama, monkeypatch):
    full, _ = _generation(tiny_llama)
    lora, _ = _generation(tiny_llama, "peft=lora")
    assert memory.model_dtype(full) == memory.model_dtype(lora) == "float32"  # on a CPU
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert memory.model_dtype(full) == "float32"  # fp32 master weights; trainer.mixed_precision computes in bf16
    assert memory.model_dtype(lora) == "bfloat16"  # the frozen base


def test_full_fine_tuning_in_float16_is_warned_and_in_bfloat16_rounds_stochastically(tiny_llama, caplog):
    with caplog.at_level("INFO", logger=memory.log.name):
        assert memory.model_dtype(_generation(tiny_llama, "model.dtype=float16")[0]) == "float16"
        assert [r.levelname for r in caplog.records] == ["WARNING"] and "trains in pure float16" in caplog.text
        caplog.clear()
        assert memory.model_dtype(_generation(tiny_llama, "model.dtype=bfloat16")[0]) == "bfloat16"
    assert [r.levelname for r in caplog.records] == ["INFO"]
    assert "rounded back to bfloat16 stochastically" in caplog.text


def test_bad_dtype_is_a_one_line_error(tmp_path, monkeypatch, capfd):
    message = fail(["model.dtype=bf16"], tmp_path, monkeypatch, capfd)
    assert message == "model.dtype must be one of auto, float32, bfloat16, float16 (got 'bf16')"
    cfg = compose_cfg("model.dtype=float16", "trainer.mixed_precision=fp16")  # (GradScaler refuses fp16 weights)
    with pytest.raises(FinetuneError, match="with full fine-tuning use model.dtype=auto"):
        validate.model(cfg)


def test_lora_merge_on_a_bf16_base_is_done_in_fp32_then_cast(tiny_llama):
    cfg, task = _generation(tiny_llama, "peft=lora", "peft.r=4", "model.dtype=bfloat16")
    model = adapters.wrap(task.load_model(str(tiny_llama), cfg.model, "bfloat16"), cfg.peft, task)
    layer = next(m for n, m in model.named_modules() if n.endswith("mlp.up_proj"))
    assert layer.lora_A["default"].weight.dtype == torch.float32  # the adapters train in fp32
    torch.nn.init.normal_(layer.lora_B["default"].weight, std=0.5)  # (B starts at zero)
    expected = (layer.base_layer.weight.float() + layer.get_delta_weight("default")).to(torch.bfloat16)
    merged = adapters.merge(model)
    weight = layer.base_layer.weight  # merge_and_unload puts the base layer, merged in place, back in the model
    assert any(w is weight for w in merged.parameters())
    assert weight.dtype == torch.bfloat16 and torch.equal(weight, expected)


@pytest.mark.slow
def test_lora_on_a_bf16_base_exports_in_bf16_and_passes_its_pipeline_check(tiny_llama, tmp_path):
    (tmp_path / "data.txt").write_text("\n".join(lm_corpus(240)))
    proc = run_cli("task=generation", f"model={tiny_llama}", "data=data.txt", *LM_TRAINER, "trainer.num_train_epochs=1",
                   "peft=lora", "peft.r=4", "model.dtype=bfloat16", "trainer.gradient_checkpointing=true", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]  # the run verifies the export through its pipeline
    (run,) = (tmp_path / "runs" / "generation").iterdir()
    assert json.loads((run / "model" / "config.json").read_text())["dtype"] == "bfloat16"
    from safetensors import safe_open

    with safe_open(str(run / "model" / "model.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    metrics = json.loads((run / "metrics.json").read_text())
    assert "pipeline_test_perplexity" in metrics
    # the memory figures of every run
    assert metrics["memory_measure"] == "peak RSS" and len(metrics["peak_memory_mb_per_process"]) == 1
    assert metrics["peak_memory_mb"] == metrics["peak_memory_mb_per_process"][0] > metrics["model_loaded_memory_mb"] > 0
    assert metrics["num_parameters"] == metrics["total_params"]
    assert metrics["memory_available_mb"] > metrics["memory_estimate_mb"] > 0  # estimated before training
    assert metrics["bytes_per_parameter"] == pytest.approx(metrics["peak_memory_mb"] * 2**20 / metrics["total_params"],
                                                           rel=1e-2)


# --- gradient checkpointing -------------------------------------------------------------------------------------
def _gradients(model, batch) -> dict[str, torch.Tensor]:
    model.train()
    model.zero_grad()
    model(**batch).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("family", ["llama", "bert"])
@pytest.mark.parametrize("peft", ["none", "lora"])
def test_checkpointing_gives_the_same_gradients(family, peft, tiny_llama, tiny_bert):
    overrides = ["task=generation", f"model={tiny_llama}"] if family == "llama" else ["task=mlm", f"model={tiny_bert}"]
    cfg = compose_cfg(*overrides, f"peft={peft}", "model.hidden_dropout=0", "model.attention_dropout=0")
    task = get_task(cfg.task)
    path = str(tiny_llama if family == "llama" else tiny_bert)
    torch.manual_seed(0)
    ids = torch.randint(5, 30, (2, 12))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    plain = adapters.wrap(task.load_model(path, cfg.model), cfg.peft, task)
    expected = _gradients(plain, batch)
    model = adapters.wrap(task.load_model(path, cfg.model), cfg.peft, task)
    model.load_state_dict(plain.state_dict())
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    assert model.is_activation_checkpointing
    got = _gradients(model, batch)
    assert expected.keys() == got.keys() and len(got) > 0
    for name, grad in expected.items():
        torch.testing.assert_close(got[name], grad, rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize("engine", ["hf", "accelerate"])
def test_engines_turn_checkpointing_on_and_free_the_training_state(engine, tiny_llama, tmp_path):
    from datasets import Dataset, DatasetDict

    cfg, task = _generation(tiny_llama, f"trainer={engine}", "peft=lora", "trainer.gradient_checkpointing=true",
                            "task.block_size=16", "trainer.report_to=[]", "trainer.max_steps=1",
                            "trainer.eval_strategy=no")
    tokenizer = task.load_tokenizer(str(tiny_llama), cfg.model)
    raw = DatasetDict({s: Dataset.from_dict({"text": lm_corpus(40)}) for s in ("train", "validation", "test")})
    model = adapters.wrap(task.load_model(str(tiny_llama), cfg.model), cfg.peft, task)
    engine_ = make_engine(cfg, task, model, tokenizer, task.tokenize(raw, tokenizer), tmp_path)
    engine_.train()  # (the Trainer turns it on when training starts)
    assert engine_.model.is_activation_checkpointing
    # LoRA freezes the embeddings: their output must require grad, or no gradient reaches the checkpointed blocks
    embeddings = engine_.model.get_input_embeddings()(torch.tensor([[5, 6]]))
    assert embeddings.requires_grad
    # training over, its optimizer states and gradients are freed before the test evaluation and the export
    optimizer = engine_.trainer.optimizer if engine == "hf" else engine_.optimizer
    assert len(optimizer.state) == 0 and all(p.grad is None for p in engine_.model.parameters())


def test_checkpointing_a_model_without_support_is_an_error(tiny_llama, tmp_path):
    cfg, task = _generation(tiny_llama, "trainer.gradient_checkpointing=true")
    model = task.load_model(str(tiny_llama), cfg.model)
    model.supports_gradient_checkpointing = False
    with pytest.raises(FinetuneError, match="LlamaForCausalLM does not support gradient checkpointing; set "
                                            "trainer.gradient_checkpointing=false"):
        validate.training(cfg, model, None)


def test_a_cpu_peak_is_the_process_own_not_its_parents():
    # a run started by a larger process (pytest, a launcher, a sweep) keeps the parent's ru_maxrss across vfork and exec
    held = b"x" * (768 << 20)  # noqa: F841 (resident while the child runs)
    child = ("import resource; from finetune import memory; "
             "print(memory.rss_peak_mb(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)")
    own, inherited = map(float, subprocess.run([sys.executable, "-c", child], capture_output=True, text=True,
                                               check=True).stdout.split())
    assert inherited > 768 > 200 > own > 0
