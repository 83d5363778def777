"""task=generation on tiny random decoder-only models (Llama with a ChatML template, GPT-2 without one):
loss masks per data shape on the token ids, block packing, metrics, the exported pipeline, engines, LoRA."""

from __future__ import annotations

import json

import pytest
from datasets import Dataset, DatasetDict

from helpers.cli import LM_TRAINER, cli_main, compose_cfg, fail
from helpers.data import lm_corpus


def make_task(*overrides: str):
    from finetune.tasks import get_task

    cfg = compose_cfg("task=generation", *overrides)
    return get_task(cfg.task), cfg


def tokenizer_of(path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def test_text_is_packed_into_blocks_in_order(tiny_llama):
    task, cfg = make_task("task.block_size=8")
    raw = task.prepare(DatasetDict({"train": Dataset.from_dict({"text": ["to be or not", "", "to be that is the question"]})}),
                       cfg.data)
    assert task.format == "text" and task.split_in_order
    tok = tokenizer_of(tiny_llama)
    feats = task.tokenize(raw, tok)["train"]
    ids = tok("to be or not\n\nto be that is the question", add_special_tokens=False)["input_ids"]
    assert [x for block in feats["input_ids"] for x in block] == ids  # all tokens, in order, nothing repeated
    assert [len(b) for b in feats["input_ids"]] == [8, len(ids) - 8]
    assert feats["labels"] == feats["input_ids"]  # running text: every token is predicted


def test_prompt_completion_masks_the_prompt_and_trains_eos(tiny_llama):
    task, cfg = make_task()
    tok = tokenizer_of(tiny_llama)
    raw = task.prepare(DatasetDict({"train": Dataset.from_dict({"prompt": ["say hello"], "completion": ["hello world"]})}),
                       cfg.data)
    assert task.format == "prompt_completion"
    row = task.tokenize(raw, tok)["train"][0]
    prompt = tok("say hello")["input_ids"]
    completion = tok("hello world", add_special_tokens=False)["input_ids"]
    assert row["input_ids"] == prompt + completion + [tok.eos_token_id]
    assert row["labels"] == [-100] * len(prompt) + completion + [tok.eos_token_id]


def test_chat_trains_assistant_turns_with_their_end_of_turn_token_only(tiny_llama):
    task, cfg = make_task()
    tok = tokenizer_of(tiny_llama)
    chat = [{"role": "system", "content": "you are a bot"}, {"role": "user", "content": "who are you"},
            {"role": "assistant", "content": "i am a bot"}, {"role": "user", "content": "ok"},
            {"role": "assistant", "content": "yes"}]
    raw = task.prepare(DatasetDict({"train": Dataset.from_list([{"messages": chat}])}), cfg.data)
    assert task.format == "messages"
    row = task.tokenize(raw, tok)["train"][0]
    ids, labels = row["input_ids"], row["labels"]
    assert ids == tok.apply_chat_template(chat, tokenize=True, return_dict=False)
    trained = [tok.convert_ids_to_tokens(i) for i, label in zip(ids, labels) if label != -100]
    assert trained == ["i", "am", "a", "bot", "<|im_end|>", "yes", "<|im_end|>"]
    assert all(label in (-100, i) for i, label in zip(ids, labels))


def test_perplexity_is_token_weighted():
    import numpy as np
    import torch

    task, _ = make_task()
    logits = torch.zeros(2, 4, 5)  # uniform: NLL log(5) per predicted token
    labels = torch.tensor([[1, 2, 3, 4], [1, 2, -100, -100]])
    sums = task.preprocess_logits(logits, labels).numpy()
    assert sums[:, 1].tolist() == [3, 1]
    out = task.compute_metrics("test", None)(type("P", (), {"predictions": sums})())
    assert out["perplexity"] == pytest.approx(5.0) and out["num_tokens"] == 4
    assert np.isclose(out["nll"], np.log(5))


@pytest.mark.parametrize("args, message", [
    (["data.format=messages"], "needs a messages column"),
    (["data=pc.jsonl", "data.completion_column=answer"], "needs a completion column (data.completion_column=answer)"),
    (["data=pc.jsonl", "task.block_size=8"], "tokens, not below task.block_size=8"),
    (["data=chat.jsonl", "model=GPT2"], "needs a tokenizer with a chat template"),
    (["data=empty.txt"], "empty"),
])
def test_generation_input_errors(tmp_path, tiny_llama, tiny_gpt2, monkeypatch, capfd, args, message):
    (tmp_path / "pc.jsonl").write_text("".join(json.dumps({"prompt": "say hello " * 5, "completion": "hello"}) + "\n"
                                               for _ in range(20)))
    chat = [{"role": "user", "content": "who are you"}, {"role": "assistant", "content": "i am a bot"}]
    (tmp_path / "chat.jsonl").write_text("".join(json.dumps({"messages": chat}) + "\n" for _ in range(20)))
    (tmp_path / "empty.txt").write_text("\n\n")
    args = [a.replace("GPT2", str(tiny_gpt2)) for a in args]
    if not any(a.startswith("model=") for a in args):
        args.append(f"model={tiny_llama}")
    if not any(a.startswith("data=") for a in args):
        args.append("data=pc.jsonl")
    assert message in fail(["task=generation", *args], tmp_path, monkeypatch, capfd)


@pytest.mark.parametrize("shape, extra", [
    ("text", ["trainer=accelerate"]),
    ("chat", []),
    ("pc", ["peft=lora", "peft.r=4"]),
])
@pytest.mark.slow
def test_cli_trains_exports_and_verifies(tmp_path, tiny_llama, shape, extra, monkeypatch, capfd):
    rows = lm_corpus(240)
    if shape == "text":
        (tmp_path / "data.txt").write_text("\n".join(rows))
    elif shape == "chat":
        (tmp_path / "data.jsonl").write_text("".join(json.dumps({"messages": [
            {"role": "user", "content": r.split()[0]}, {"role": "assistant", "content": "answer " + r.split()[0]}]}) + "\n"
            for r in rows))
    else:
        (tmp_path / "data.jsonl").write_text("".join(json.dumps({"prompt": r, "completion": "answer " + r.split()[-1]})
                                                     + "\n" for r in rows))
    data = "data.txt" if shape == "text" else "data.jsonl"
    # in this process (test_killed_generation_run_resumes_to_the_same_metrics runs the CLI as a real process)
    code, _, err = cli_main(["task=generation", f"model={tiny_llama}", f"data={data}", *LM_TRAINER, *extra], tmp_path,
                            monkeypatch, capfd)
    assert code == 0, err[-4000:]
    run = next((tmp_path / "runs" / "generation").iterdir())
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["test_perplexity"] < 0.8 * metrics["base_test_perplexity"]  # it learned the data
    rel = abs(metrics["pipeline_test_perplexity"] - metrics["test_perplexity"]) / metrics["test_perplexity"]
    assert rel <= 0.005 and metrics["pipeline_test_greedy_prompts_matched"] == 4
    if shape != "text":
        assert {"test_rougeL", "test_chrf", "base_test_rougeL"} <= set(metrics)
    samples = [json.loads(line) for line in (run / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 4 and all("generated" in s for s in samples)
    gen = json.loads((run / "model" / "generation_config.json").read_text())
    assert gen["max_new_tokens"] == 8 and gen["eos_token_id"] == 2 and gen["do_sample"] is False
    tokenizer = json.loads((run / "model" / "tokenizer_config.json").read_text())
    assert tokenizer["model_max_length"] == 256  # the checkpoint's own limit, not task.block_size=32
    assert "## Samples" in (run / "model" / "README.md").read_text()
    if "peft=lora" in extra:
        assert (run / "model" / "adapter" / "adapter_config.json").is_file()

    from finetune.predict import main as predict

    column = {"text": "text", "chat": "messages", "pc": "prompt"}[shape]
    inputs = [json.loads(line) for line in (tmp_path / data).read_text().splitlines()[:3]] if shape != "text" else \
        [{"text": r} for r in rows[:3]]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps({column: r[column][:1] if shape == "chat" else r[column]})
                                               + "\n" for r in inputs))
    predict([str(run), str(tmp_path / "in.jsonl"), "--output", str(tmp_path / "out.jsonl")])
    outputs = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert len(outputs) == 3 and all(isinstance(o["generated_text"], str) for o in outputs)

    from transformers import pipeline

    pipe = pipeline("text-generation", model=str(run / "model"))
    out = pipe([{"role": "user", "content": "to"}], max_new_tokens=4)
    assert out[0]["generated_text"][-1]["role"] == "assistant"  # chat messages work on the exported model


def test_generation_after_mixed_precision_training_runs_in_the_exported_precision(tiny_llama):
    """accelerate wraps a prepared model's forward in autocast for bf16 training; the greedy outputs the exported
    (fp32) pipeline must reproduce are generated without it, or on a GPU they differ from the pipeline's."""
    import torch
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from transformers import AutoModelForCausalLM

    from finetune.engines import own_precision

    torch.manual_seed(0)
    plain = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    AcceleratorState._reset_state(reset_partial_state=True)  # the process-wide state earlier tests set (fp32)
    try:
        wrapped = Accelerator(cpu=True, mixed_precision="bf16").prepare(AutoModelForCausalLM.from_pretrained(tiny_llama))
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    ids = torch.tensor([[1, 5, 7, 9, 11, 13]])
    with torch.inference_mode():
        assert wrapped(ids).logits.dtype == torch.float32  # cast back to fp32, but computed in bf16:
        assert not torch.equal(wrapped(ids).logits, plain(ids).logits)
        assert torch.equal(own_precision(wrapped).eval()(ids).logits, plain(ids).logits)
