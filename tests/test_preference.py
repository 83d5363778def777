"""task=preference on a tiny random Llama with a ChatML template: each data shape down to the scored token ids, refused
pairs, the reference log-probs (stored once and read back from the cache; LoRA's adapter-disabled base), each loss
through the task, and whole runs on both engines (full fine-tuning and LoRA) with the export's check, predict, and a
killed run resumed."""

from __future__ import annotations

import json
import random

import pytest
import torch
from datasets import Dataset, DatasetDict

from finetune.tasks import preference_scoring as scoring
from helpers.cli import cli_main, compose_cfg, fail, prepared
from helpers.data import LM_WORDS as WORDS
from helpers.processes import assert_same_scores, kill_and_resume

pytestmark = pytest.mark.usefixtures("one_thread")

USER = [{"role": "user", "content": "who are you"}]


def make_task(*overrides: str):
    from finetune.tasks import get_task

    cfg = compose_cfg("task=preference", *overrides)
    return get_task(cfg.task), cfg


def encoded(task, cfg, tokenizer, rows: list[dict]):
    raw = task.prepare(DatasetDict({"train": Dataset.from_list(rows)}), cfg.data)
    return raw, task.tokenize(raw, tokenizer)["train"]


def tokens(tokenizer, ids):
    return tokenizer.convert_ids_to_tokens(ids)


def pairs_file(path, n: int = 96, seed: int = 0, chat: bool = False):
    """Pairs a model can learn: the chosen answer starts with "yes" and repeats the prompt's first word."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        words = [rng.choice(WORDS[:20]) for _ in range(rng.randint(2, 6))]
        chosen, rejected = f"yes {words[0]}", f"no {rng.choice(WORDS[:20])}"
        if chat:
            rows.append({"prompt": [{"role": "user", "content": " ".join(words)}],
                         "chosen": [{"role": "assistant", "content": chosen}],
                         "rejected": [{"role": "assistant", "content": rejected}]})
        else:
            rows.append({"prompt": " ".join(words), "chosen": chosen, "rejected": rejected})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# --- data shapes ----------------------------------------------------------------------------------------------
def test_text_pairs_score_each_answer_and_its_eos(tiny_llama):
    from transformers import AutoTokenizer

    task, cfg = make_task()
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    _, row = encoded(task, cfg, tok, [{"prompt": "say hello", "chosen": "hello world", "rejected": "no"}])
    (row,) = row
    assert row["prompt_ids"] == tok("say hello")["input_ids"]
    assert tokens(tok, row["chosen_ids"]) == ["hello", "world", "<|im_end|>"]
    assert tokens(tok, row["rejected_ids"]) == ["no", "<|im_end|>"]
    batch = task.collator(tok)([row])
    assert batch["input_ids"].shape == (2, len(row["prompt_ids"]) + 3)  # chosen, then rejected, padded alike
    scored = [tokens(tok, [t for t in r.tolist() if t != -100]) for r in batch["targets"]]
    assert scored == [["hello", "world", "<|im_end|>"], ["no", "<|im_end|>"]]
    assert batch["attention_mask"][1].tolist() == [1] * (len(row["prompt_ids"]) + 2) + [0]
    assert row["scored"] == 5 == int((batch["targets"] != -100).sum())  # what the memory estimate sizes the loss by


def test_changed_pair_code_tokenizes_again(tmp_path, monkeypatch):
    """datasets hashes a module's function by its name only: the pairs' cache key holds the module's source."""
    from pathlib import Path

    from finetune.tasks import preference_data as pairs

    ds, kwargs = Dataset.from_dict({"prompt": ["a"]}), {"max_length": 8}
    key = pairs.fingerprint(ds, pairs.encode, kwargs)
    assert key == pairs.fingerprint(ds, pairs.encode, dict(kwargs))  # a resumed run, a sweep's trials: the cache
    assert key != pairs.fingerprint(ds, pairs.encode, {"max_length": 9}) != pairs.fingerprint(ds, pairs.normalize,
                                                                                                 kwargs)
    changed = tmp_path / "preference_data.py"
    changed.write_bytes(Path(pairs.__file__).read_bytes() + b"# changed\n")
    monkeypatch.setattr(pairs, "__file__", str(changed))
    assert key != pairs.fingerprint(ds, pairs.encode, kwargs)


@pytest.mark.parametrize("chosen", [[{"role": "assistant", "content": "i am a bot"}], "i am a bot"],
                         ids=["messages", "text-answer"])
def test_conversational_pairs_score_the_answer_up_to_its_end_of_turn(tiny_llama, chosen):
    from transformers import AutoTokenizer

    from finetune.tasks.generation import render

    task, cfg = make_task()
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    _, (row,) = encoded(task, cfg, tok, [{"prompt": USER, "chosen": chosen, "rejected": "no"}])
    assert row["prompt_ids"] == render(tok, USER, prompt=True)  # ... <|im_start|> assistant \n
    assert tokens(tok, row["chosen_ids"]) == ["i", "am", "a", "bot", "<|im_end|>"]  # not the "\n" after it
    assert tokens(tok, row["rejected_ids"]) == ["no", "<|im_end|>"]


def test_two_dialogues_sharing_their_start_make_the_prompt(tiny_llama):
    """The hh-rlhf shape, as texts (cut back to a whitespace) and as message lists."""
    from transformers import AutoTokenizer

    task, cfg = make_task()
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    start = "\n\nuser who are you\n\nassistant"
    raw, (row,) = encoded(task, cfg, tok, [{"chosen": f"{start} i am a bot", "rejected": f"{start} i say no"}])
    assert raw["train"][0]["prompt"] == f"{start} i"  # a common first word belongs to the prompt
    raw, (row,) = encoded(task, cfg, tok, [{"chosen": f"{start} i am a bot", "rejected": f"{start} no"}])
    assert raw["train"][0] == {"prompt": start, "chosen": " i am a bot", "rejected": " no"}
    assert tokens(tok, row["chosen_ids"]) == ["i", "am", "a", "bot", "<|im_end|>"]
    dialogue = [*USER, {"role": "assistant", "content": "i am a bot"}]
    raw, (row,) = encoded(task, cfg, tok, [{"chosen": dialogue, "rejected": [*USER, {"role": "assistant",
                                                                                        "content": "no"}]}])
    assert raw["train"][0]["prompt"] == USER and raw["train"][0]["chosen"] == dialogue[1:]
    assert tokens(tok, row["rejected_ids"]) == ["no", "<|im_end|>"]


def test_nested_chat_pairs_are_mapped_by_column_settings(tmp_path):
    """orca_dpo_pairs' shape: input.messages, preferred_output, non_preferred_output."""
    from finetune import data
    from finetune.tasks import get_task

    row = {"input": {"messages": USER}, "preferred_output": [{"role": "assistant", "content": "i am a bot"}],
           "non_preferred_output": [{"role": "assistant", "content": "no"}]}
    (tmp_path / "orca.jsonl").write_text(json.dumps(row) + "\n")
    files = [f"data.{split}_file={tmp_path / 'orca.jsonl'}" for split in ("train", "validation", "test")]
    cfg = compose_cfg("task=preference", *files, "data.prompt_column=input.messages",
                      "data.chosen_column=preferred_output", "data.rejected_column=non_preferred_output")
    raw = data.load(cfg.data, get_task(cfg.task))
    assert raw["train"][0] == {"prompt": USER, "chosen": row["preferred_output"],
                               "rejected": row["non_preferred_output"]}


def test_refused_pairs_are_counted_and_dropped(tiny_llama, caplog):
    from transformers import AutoTokenizer

    task, cfg = make_task("task.max_seq_length=8")
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    long = " ".join(["to"] * 8)
    rows = [{"prompt": "say", "chosen": "yes", "rejected": "no"}, {"prompt": "say", "chosen": "yes", "rejected": "yes"},
            {"prompt": "say", "chosen": " ", "rejected": "no"}, {"prompt": long, "chosen": "yes", "rejected": "no"},
            {"prompt": "say it", "chosen": f"{long} yes", "rejected": f"{long} no"}]
    with caplog.at_level("WARNING"):
        _, features = encoded(task, cfg, tok, rows)
    assert len(features) == 1
    assert "2 of 5 pairs dropped: 1 have equal answers, 1 have an empty answer" in caplog.text
    assert "2 of 3 pairs dropped: 2 lose their answers' difference to task.max_seq_length" in caplog.text


def test_a_long_prompt_keeps_its_last_tokens(tiny_llama):
    from transformers import AutoTokenizer

    task, cfg = make_task("task.max_seq_length=8", "task.max_prompt_length=2")
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    long = " ".join(["to"] * 8)
    _, (row,) = encoded(task, cfg, tok, [{"prompt": f"{long} say", "chosen": "yes", "rejected": "no"}])
    assert tokens(tok, row["prompt_ids"]) == tokens(tok, tok(f"{long} say")["input_ids"][-2:])
    assert len(row["prompt_ids"]) == 2 and tokens(tok, row["chosen_ids"])[-1] == "<|im_end|>"


@pytest.mark.parametrize("rows, message", [
    ([{"prompt": "say", "chosen": "yes", "rejected": "yes"}] * 20, "of its 20 pairs, 20 have equal answers; check data."),
    ([{"prompt": " ".join(["to"] * 40), "chosen": "yes", "rejected": "no"}] * 20,
     ("of its 16 pairs, 16 lose their answers' difference to task.max_seq_length; check data.chosen_column / "
      "data.rejected_column, or raise task.max_seq_length")),
    ([{"prompt": USER, "chosen": "yes", "rejected": [{"role": "user", "content": "no"}]}] * 20,
     "an answer holds a user message"),
])
def test_no_pair_left_is_one_line(tmp_path, tiny_llama, monkeypatch, capfd, rows, message):
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    error = fail(["task=preference", f"model={tiny_llama}", "data=pairs.jsonl", "task.max_seq_length=32"], tmp_path,
                 monkeypatch, capfd)
    assert message in error


@pytest.mark.parametrize("overrides, message", [
    (["task.loss=kto"], "unknown task.loss 'kto': choose one of dpo, ipo, orpo, simpo"),
    (["task.loss=orpo", "task.sft_weight=1"], "task.sft_weight does not apply to task.loss=orpo"),
    (["task.loss=simpo", "task.label_smoothing=0.1"], "task.label_smoothing does not apply to task.loss=simpo"),
    (["task.beta=0"], "task.beta must be above 0"),
    (["task.label_smoothing=0.5"], "task.label_smoothing must be at least 0 and below 0.5"),
    (["task.max_prompt_length=512"], "task.max_prompt_length must be at least 1 and below task.max_seq_length"),
])
def test_settings_errors(overrides, message):
    from finetune import validate
    from finetune.errors import FinetuneError

    with pytest.raises(FinetuneError, match="^" + message.replace(".", r"\.").replace("(", r"\(")):
        validate.config(compose_cfg("task=preference", "data=x.jsonl", *overrides))


# --- the reference ----------------------------------------------------------------------------------------------
def test_stored_reference_equals_the_model_on_the_fly_and_is_read_back_from_the_cache(tiny_llama, tmp_path,
                                                                                      monkeypatch):
    """Full fine-tuning: the reference log-probs stored before training are the model's own (as the loss computes
    them); a new process's model with the same weights reads them back, and so does a sweep's trial with another
    task.beta (the stored pairs do not depend on it)."""
    pairs_file(tmp_path / "pairs.jsonl", n=40)
    args = ("task=preference", f"model={tiny_llama}", f"data={tmp_path / 'pairs.jsonl'}")
    cfg, task, tok, features, model = prepared(*args)
    stored = task.prepare_training(model, cfg.trainer, features)["train"]
    rows = [stored[i] for i in range(8)]
    with torch.no_grad():
        model.eval()
        on_the_fly = scoring.log_probs(model, task.collator(tok)(rows), True, task.chunked).view(2, -1).T
    expected = torch.tensor([[r["ref_chosen"], r["ref_rejected"]] for r in rows])
    assert torch.allclose(on_the_fly.double(), expected.double(), atol=1e-5)

    def computed(*args, **kwargs):
        raise RuntimeError("computed again")

    cfg, task, _, features, model = prepared(*args, "task.beta=0.3")
    monkeypatch.setattr(scoring, "score", computed)
    again = task.prepare_training(model, cfg.trainer, features)  # the cache holds them
    assert again["train"]["ref_chosen"] == stored["ref_chosen"]
    with torch.no_grad():
        next(model.parameters()).add_(0.01)  # other weights: another cache entry
    with pytest.raises(RuntimeError, match="computed again"):
        task.prepare_training(model, cfg.trainer, features)


@pytest.mark.slow
def test_lora_reference_is_the_base_with_the_adapter_disabled(tiny_llama, tmp_path):
    from transformers import AutoModelForCausalLM

    from finetune import lm_loss

    pairs_file(tmp_path / "pairs.jsonl", n=40)
    cfg, task, tok, features, model = prepared("task=preference", f"model={tiny_llama}", f"data={tmp_path / 'pairs.jsonl'}",
                                               "peft=lora", "peft.r=4")
    features = task.prepare_training(model, cfg.trainer, features)
    assert "ref_chosen" not in features["train"].column_names and "ref_chosen" in features["test"].column_names
    torch.manual_seed(1)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5)  # a trained adapter: the policy is no longer the base
    batch = task.collator(tok)([features["train"][i] for i in range(6)])
    _, outputs = task.loss(model, batch, 6)
    base = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    lm_loss.attach(base, 1, 512)
    with torch.no_grad():
        expected = scoring.log_probs(base, batch, True, True).view(2, -1).T
    scores = outputs["scores"]  # columns: policy chosen, rejected; reference chosen, rejected; tokens
    assert torch.allclose(scores[:, 2:4], expected, atol=1e-5)
    assert not torch.allclose(scores[:, :2], expected, atol=1e-2)


@pytest.mark.parametrize("loss", ["dpo", pytest.param("ipo", marks=pytest.mark.slow),
                                  pytest.param("orpo", marks=pytest.mark.slow), "simpo"])
def test_each_loss_trains_through_the_task(tiny_llama, tmp_path, loss):
    """A few optimizer steps on one batch raise its reward margin; orpo and simpo store no reference."""
    pairs_file(tmp_path / "pairs.jsonl", n=24)
    cfg, task, tok, features, model = prepared("task=preference", f"model={tiny_llama}",
                                               f"data={tmp_path / 'pairs.jsonl'}", f"task.loss={loss}")
    features = task.prepare_training(model, cfg.trainer, features)
    assert ("ref_chosen" in features["train"].column_names) == (loss in ("dpo", "ipo"))
    batch = task.collator(tok)([features["train"][i] for i in range(8)])
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    margins = []
    for _ in range(6):
        value, outputs = task.loss(model, batch, task.items(batch))
        value.backward()
        optimizer.step()
        optimizer.zero_grad()
        margins.append(outputs["metrics"]["reward_margin"].item())
    assert margins[-1] > margins[0] and torch.isfinite(value)


# --- whole runs ---------------------------------------------------------------------------------------------------
TRAIN = ["trainer.num_train_epochs=2", "trainer.learning_rate=3e-3", "trainer.per_device_train_batch_size=4",
         "trainer.gradient_accumulation_steps=2", "trainer.warmup_ratio=0.0", "task.eval_prompts=2",
         "task.generation.max_new_tokens=6", "trainer.report_to=[]"]


@pytest.mark.slow
@pytest.mark.parametrize("shape, extra", [("text", ["hub=push", "hub.repo_id=me/tiny-dpo", "hub.dry_run=true"]),
                                          ("chat", ["trainer=accelerate", "peft=lora", "peft.r=4",
                                                    "trainer.learning_rate=1e-2"])])
def test_cli_trains_exports_and_verifies(tmp_path, tiny_llama, shape, extra, monkeypatch, capfd):
    pairs_file(tmp_path / "pairs.jsonl", n=96, chat=shape == "chat")
    code, out, err = cli_main(["task=preference", f"model={tiny_llama}", "data=pairs.jsonl", *TRAIN, *extra], tmp_path,
                              monkeypatch, capfd)
    assert code == 0, err[-4000:]
    run = next((tmp_path / "runs" / "preference").iterdir())
    m = json.loads((run / "metrics.json").read_text())
    assert m["base_test_reward_accuracy"] == 0.5 and m["base_test_loss"] == pytest.approx(0.6931, abs=1e-4)
    assert m["test_reward_accuracy"] >= 0.8 and m["test_reward_margin"] > 0  # it learned the pairs
    assert m["pipeline_test_reward_accuracy"] == m["test_reward_accuracy"]  # the export, the base as reference
    assert m["pipeline_test_reward_margin"] == pytest.approx(m["test_reward_margin"], abs=1e-4)
    assert m["pipeline_test_greedy_prompts_matched"] == 2 and m["peak_memory_mb"] > 0
    log = (run / "finetune.log").read_text()
    assert "chosen_nll=" in log and "reward_margin=" in log  # logged beside the training loss
    samples = [json.loads(line) for line in (run / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 2 and all({"prompt", "chosen", "before", "after"} <= set(s) for s in samples)
    assert "## Answers to held-out prompts (greedy)" in (run / "model" / "README.md").read_text()
    assert json.loads((run / "model" / "preference.json").read_text()) == {"reference": str(tiny_llama)}

    from transformers import pipeline

    pipe = pipeline("text-generation", model=str(run / "model"))
    if shape == "chat":  # the export keeps the chat template
        assert pipe(USER, max_new_tokens=2)[0]["generated_text"][-1]["role"] == "assistant"
        return
    assert "dry run: would push" in out and "to me/tiny-dpo" in out
    from finetune.evaluate import evaluate

    scores = evaluate(run, [f"data={tmp_path / 'pairs.jsonl'}"], tmp_path / "evaluation.json")  # the base re-loaded
    assert scores["num_examples"] == 96 and 0 <= scores["reward_accuracy"] <= 1

    from finetune.predict import main as predict

    (tmp_path / "in.jsonl").write_text(json.dumps({"prompt": "to be"}) + "\n")
    predict([str(run), str(tmp_path / "in.jsonl"), "--output", str(tmp_path / "out.jsonl")])
    assert isinstance(json.loads((tmp_path / "out.jsonl").read_text())["generated_text"], str)


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_metrics_reading_its_reference_back(tmp_path, tiny_llama):
    pairs_file(tmp_path / "pairs.jsonl", n=96)
    args = ["task=preference", f"model={tiny_llama}", "data=pairs.jsonl", *TRAIN, "trainer.eval_strategy=steps",
            "trainer.eval_steps=3", "trainer.logging_steps=3"]
    resumed = kill_and_resume(args, tmp_path, "preference", 6)
    assert "reference log-probs of the train split: read from the cache" in resumed.log
    got = assert_same_scores(resumed.run_dir, resumed.reference, rel=1e-4, abs=1e-6)
    assert "test_reward_accuracy" in got
