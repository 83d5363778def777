"""The peak-memory estimate (finetune/memory_estimate.py) on tiny models: weights, gradients and AdamW states by dtype
and by what LoRA trains, activations scaled from the probe, and the whole estimate against the peak of live bytes
of real training steps (glibc's allocator counts them); the refusal of a run that would not fit."""

from __future__ import annotations

import ctypes
import re
from dataclasses import replace

import pytest
import torch

from finetune import memory_estimate as me
from finetune import memory_probe as mp

MB = 2**20


class _Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                     "fsmblks", "uordblks", "fordblks", "keepcost")]


def _allocated() -> int:
    """Bytes glibc has handed out and not yet been given back (heap and mmap'ed blocks)."""
    info = _LIBC.mallinfo2()
    return info.uordblks + info.hblkhd


try:
    _LIBC = ctypes.CDLL(None)
    _LIBC.mallinfo2.restype = _Mallinfo2
except (OSError, AttributeError):
    _LIBC = None


def measured_peak(model, batch: dict, checkpointing: bool = False, accumulation: int = 1) -> int:
    """The peak of live bytes in a training step after a first one (AdamW's states exist), plus the weights and those
    states: after every tensor operation (forward, backward, update) glibc's count of allocated bytes is read."""
    if checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], fused=True)
    model.train()

    def step():
        for _ in range(accumulation):
            model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    step()
    peak = live_peak(step)
    states = sum(v.nbytes for s in optimizer.state.values() for v in s.values() if v.dim())
    weights = sum(t.nbytes for t in mp.unique_tensors(model, None))
    return peak + weights + states


def live_peak(fn) -> int:
    """The peak of live bytes while fn() runs, above those live before: glibc's count read after every tensor
    operation."""
    import gc

    from torch.utils._python_dispatch import TorchDispatchMode

    class Peak(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            self.peak = max(self.peak, _allocated())
            return out

    gc.collect()
    mode = Peak()
    mode.peak = start = _allocated()
    with mode:
        fn()
    return mode.peak - start


def tiny_llama(layers: int = 3, dtype=torch.float32):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=4096, hidden_size=256, intermediate_size=768, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=True)
    return LlamaForCausalLM(config).to(dtype)


def tiny_bert_classifier():
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    return BertForSequenceClassification(BertConfig(vocab_size=2048, hidden_size=128, num_hidden_layers=3,
                                                    num_attention_heads=4, intermediate_size=512))


def lora(model, targets):
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(r=8, target_modules=targets))


def test_weights_gradients_and_optimizer_states_by_dtype_and_by_what_lora_trains():
    model = tiny_llama()
    params = sum(p.numel() for p in model.parameters())  # (tied: the embedding once)
    full = me.estimate(model, me.Settings(micro_batch=1), me.Batch(1, 64))
    buffers = sum(b.nbytes for b in model.buffers())  # (rotary frequencies)
    assert full.weights == 4 * params + buffers and full.gradients == 4 * params and full.optimizer == 8 * params
    base = tiny_llama(dtype=torch.bfloat16)
    adapted = lora(base, ["gate_proj", "up_proj", "down_proj"])
    adapters = sum(p.numel() for p in adapted.parameters() if p.requires_grad)
    assert all(p.dtype == torch.float32 for p in adapted.parameters() if p.requires_grad)
    est = me.estimate(adapted, me.Settings(micro_batch=1), me.Batch(1, 64))
    assert est.weights == 2 * params + 4 * adapters + buffers / 2  # a bf16 base, float32 adapters
    assert est.gradients == 4 * adapters and est.optimizer == 8 * adapters
    sharded = me.estimate(model, me.Settings(micro_batch=1, shards=4), me.Batch(1, 64))
    assert sharded.weights == full.weights / 4 and sharded.optimizer == full.optimizer / 4


def test_the_probe_scales_to_the_real_micro_batch():
    """What autograd keeps, counted at 2 x 16 and 2 x 32 tokens, scaled to 4 x 256 (padded) and 1 x 512: the same as
    counted on those batches themselves, in all and in blocks below a size."""
    for model in (tiny_llama(), tiny_bert_classifier()):
        layers = mp.checkpoint_layers(model)
        assert len(layers) == 3
        for padded, rows, tokens in ((True, 4, 256), (False, 1, 512)):
            probe = mp.probe(model, padded=padded)
            mp.PROBE_ROWS, rows_before = rows, mp.PROBE_ROWS
            try:
                direct = mp._saved_bytes(model, layers, tokens, padded, None)
            finally:
                mp.PROBE_ROWS = rows_before
            assert probe.bytes(rows, tokens) == pytest.approx(sum(direct["layers"]) + direct["other"], rel=0.01)
            # the part in blocks below a size (a CPU heap's, under its mapping threshold): all but the largest (BERT's
            # attention matrices, a term per token squared)
            sizes = sorted(set(direct["blocks"]))
            below = (sizes[-2] + sizes[-1]) / 2
            small = sum(b for b in direct["blocks"] if b < below)
            assert 0 < small < sum(direct["blocks"])
            assert probe.heaped(rows, tokens, below) == pytest.approx(small, rel=0.02)
            assert probe.heaped(rows, tokens, 1 << 40) == pytest.approx(probe.bytes(rows, tokens))
        with_ckpt = probe.bytes(4, 256, checkpointing=True)
        assert with_ckpt < probe.bytes(4, 256) / 2


@pytest.mark.skipif(_LIBC is None, reason="counting live bytes needs glibc's mallinfo2")
@pytest.mark.parametrize("name, rows, tokens, settings", [
    ("full", 4, 256, {}),
    ("checkpointing", 4, 256, {"checkpointing": True}),
    ("lora", 4, 256, {"lora": True}),
    ("accumulation", 2, 256, {"accumulation": 2}),
    ("the model's own loss", 2, 256, {"loss_chunk": 0}),
    ("bert classifier", 32, 64, {}),
    ("bert classifier, checkpointing", 32, 64, {"checkpointing": True}),
])
def test_the_estimate_is_within_10_percent_of_the_live_peak(name, rows, tokens, settings, one_thread):
    from finetune import cpu, lm_loss

    cpu.keep_freed_memory()  # as a run does (mallinfo2 counts the heap's blocks and the mapped ones)
    bert = name.startswith("bert")
    model = tiny_bert_classifier() if bert else tiny_llama()
    if settings.pop("lora", False):
        model = lora(model, ["gate_proj", "up_proj", "down_proj"])
    chunk = settings.pop("loss_chunk", 512)
    if not bert and chunk:
        lm_loss.attach(model, 1, chunk)
    torch.manual_seed(1)
    ids = torch.randint(5, 2000, (rows, tokens))
    batch = {"input_ids": ids, "labels": torch.zeros(rows, dtype=torch.long) if bert else ids}
    # live bytes: no heap slack (the peak of glibc's count of allocated bytes is not the resident size)
    estimate = me.estimate(model, me.Settings(micro_batch=rows, loss_chunk=chunk, **settings), me.Batch(rows, tokens),
                           heap=False)
    peak = measured_peak(model, batch, settings.get("checkpointing", False), settings.get("accumulation", 1))
    assert estimate.total == pytest.approx(peak, rel=0.10), (name, estimate, peak / MB)


def test_a_run_that_does_not_fit_is_refused_in_one_line_naming_what_lowers_it(monkeypatch):
    from helpers.cli import compose_cfg

    from finetune.errors import FinetuneError

    model = tiny_llama()
    cfg = compose_cfg("task=generation", "trainer.per_device_train_batch_size=4")  # (8 micro-batches a step)
    features = {"train": {"length": [200, 256, 180, 256, 240]}}
    fits = me.check(cfg, model, features)  # this machine holds a 20 MB model
    assert fits.available > fits.total > fits.weights + fits.optimizer
    assert set(fits.figures()) == {"memory_estimate_mb", "memory_estimate_parts_mb", "memory_available_mb"}
    free = 0.5 * (fits.optimizer + fits.step)  # room for the weights and half of what training adds
    monkeypatch.setattr(me, "_usage_and_available", lambda: (fits.overhead + fits.weights, free))
    with pytest.raises(FinetuneError) as info:
        me.check(cfg, model, features)
    message = str(info.value)
    assert "\n" not in message
    size = r"([\d.]+ [MG]B)"
    pattern = (rf"this run needs an estimated {size} of memory at its peak \(weights {size}, optimizer states {size}, "
               rf"a training step {size} \(activations {size}, loss {size}, gradients {size}\), heap slack {size}, "
               rf"libraries and data {size}\) but {size} is "
               r"available; lower it with trainer.per_device_train_batch_size=2 trainer.gradient_accumulation_steps=16 "
               rf"\({size}\), trainer.gradient_checkpointing=true \({size}\), peft=lora \(no gradients or optimizer "
               r"states for the frozen weights\), a 16-bit base: peft=lora model.dtype=bfloat16, or skip this check "
               r"with trainer.memory_check=false$")
    sizes = [float(x.split()[0]) * (1024 if x.endswith("GB") else 1) for x in re.fullmatch(pattern, message).groups()]
    needed, available, halved, checkpointed = sizes[0], sizes[9], sizes[10], sizes[11]
    assert sizes[1] + sizes[2] + sizes[3] + sizes[7] + sizes[8] == pytest.approx(needed, rel=0.05)  # they add up
    assert available < needed and halved < needed and checkpointed < needed


def test_memory_the_heap_keeps_freed_is_not_counted_as_libraries_and_data():
    """Tokenizing the data leaves freed blocks in the heap (keep_freed_memory), resident until training reuses them:
    the estimate gives them back before it reads the process's memory, so they are not counted twice."""
    import psutil
    from helpers.cli import compose_cfg

    from finetune import cpu

    if not cpu.keep_freed_memory():
        pytest.fail("this test needs glibc (Linux)")
    model, cfg = tiny_llama(), compose_cfg("task=generation")
    features = {"train": {"length": [64] * 8}}
    blocks = [torch.ones(1 << 18) for _ in range(256)]  # 256 blocks of 1 MiB: from the heap, kept there when freed
    del blocks
    kept = psutil.Process().memory_info().rss
    found = me.measure(cfg, model, features)
    assert found.overhead + found.weights < kept - 192 * MB, (found.overhead / MB, kept / MB)


def test_settings_come_from_the_config():
    from helpers.cli import compose_cfg

    cfg = compose_cfg("task=generation", "trainer.per_device_train_batch_size=3",
                      "trainer.gradient_accumulation_steps=5", "trainer.gradient_checkpointing=true",
                      "trainer.lm_loss_chunk_size=256")
    assert me.Settings.from_config(cfg) == me.Settings(micro_batch=3, accumulation=5, checkpointing=True,
                                                       loss_chunk=256, autocast=None, shards=1, seed=42,
                                                       grouped=True, max_steps=-1, epochs=cfg.trainer.num_train_epochs)
    from datasets import Dataset

    train = Dataset.from_dict({"length": [10, 50, 20, 50], "labels": [[-100] * 5 + [1] * 5, [-100] * 40 + [1] * 10,
                                                                       [1] * 20, [-100] * 49 + [1]]})
    assert me.Batch.of(train, 8) == me.Batch(rows=4, tokens=50, padded=True, labelled=36)
    assert me.Batch.of(train, 2) == me.Batch(rows=2, tokens=50, padded=False, labelled=11)  # the two longest
    assert me.Batch.of({"length": [7, 9]}, 1) == me.Batch(rows=1, tokens=9)  # no labels: every token counts
    pairs = Dataset.from_dict({"length": [40, 90, 60], me.SCORED: [12, 30, 20]})  # a task's scored tokens
    assert me.Batch.of(pairs, 2) == me.Batch(rows=2, tokens=90, padded=True, labelled=50)


def test_a_run_within_its_first_epoch_meets_its_longest_micro_batch_first_and_then_the_largest_after():
    lengths = [10, 50, 20, 45, 30, 12, 8, 40]
    settings = me.Settings(micro_batch=2, accumulation=2, max_steps=1)
    first, later = me.Batch.phases({"length": lengths}, settings)
    assert first.rows == 2 and first.tokens == 50 and later.rows == 2 and later.tokens < 50  # one step: 2 micro-batches
    _, whole = me.Batch.phases({"length": lengths}, replace(settings, max_steps=-1, epochs=1.0))
    assert whole == me.Batch(rows=2, tokens=45, padded=True)  # the whole epoch: the second longest comes after
    for again in (replace(settings, max_steps=3), replace(settings, max_steps=-1, epochs=2.0)):  # past one epoch
        assert me.Batch.phases({"length": lengths}, again) == (me.Batch(rows=2, tokens=50, padded=True), None)


@pytest.mark.skipif(_LIBC is None, reason="counting live bytes needs glibc's mallinfo2")
def test_a_run_whose_longest_micro_batch_comes_first_peaks_before_the_optimizer_holds_states(one_thread):
    """4 x 256 tokens first, then 4 x 32: the peak is the first step's (no AdamW states yet), which the estimate
    knows from the later micro-batch; without it (any step may be the longest) it adds the states."""
    from finetune import cpu, lm_loss

    cpu.keep_freed_memory()
    torch.manual_seed(1)
    long, short = (torch.randint(5, 2000, (4, n)) for n in (256, 32))

    def chunked():
        model = tiny_llama()
        lm_loss.attach(model, 1, 512)
        return model

    def steps(model):
        optimizer = torch.optim.AdamW(model.parameters(), fused=True)
        for ids in (long, short, short):
            model(input_ids=ids, labels=ids).loss.backward()
            optimizer.step()
            optimizer.zero_grad()

    steps(chunked())  # what a process's first steps allocate once (on its own, this test's peak was 2 MB higher)
    model = chunked()
    peak = live_peak(lambda: steps(model)) + sum(t.nbytes for t in mp.unique_tensors(model, None))
    settings = me.Settings(micro_batch=4)
    phased = me.estimate(model, settings, me.Batch(4, 256), heap=False, later=me.Batch(4, 32))
    assert phased.first and phased.optimizer == 0 and phased.total == pytest.approx(peak, rel=0.10)
    unphased = me.estimate(model, settings, me.Batch(4, 256), heap=False)  # any step may be the longest
    assert unphased.total == phased.total + unphased.optimizer > peak + unphased.optimizer / 2


def test_a_model_the_probe_cannot_run_is_not_checked_and_says_so(caplog):
    from helpers.cli import compose_cfg

    model = tiny_llama()

    def needs_more(*args, **kwargs):
        raise TypeError("forward() missing 1 required positional argument: 'pixel_values'")

    model.forward = needs_more
    with caplog.at_level("WARNING", logger="finetune.memory_estimate"):
        assert me.check(compose_cfg("task=generation"), model, {"train": {"length": [64]}}) is None
    assert "memory check skipped: probing LlamaForCausalLM failed (TypeError: forward() missing" in caplog.text


@pytest.mark.slow
def test_the_command_line_refuses_a_run_that_does_not_fit_before_writing_anything(tiny_bert, sentiment_csv, tmp_path,
                                                                                  monkeypatch, capfd):
    from helpers.cli import TINY_TRAINER, cli_main

    monkeypatch.setattr(me, "_usage_and_available", lambda: (200 * MB, 0.0))  # no room beyond what it holds
    args = ["task=sentiment", f"model={tiny_bert}", f"data={sentiment_csv}", "data.text_column=review",
            "data.label_column=sentiment", *TINY_TRAINER]
    code, _, err = cli_main(args, tmp_path, monkeypatch, capfd)
    (line,) = [line for line in err.splitlines() if line.startswith("error: ")]
    assert code == 2 and "Traceback" not in err
    assert line.startswith("error: this run needs an estimated ") and " but 200 MB is available; lower it with " in line
    assert line.endswith("or skip this check with trainer.memory_check=false")
    runs = tmp_path / "runs"
    assert not runs.exists() or not [p for p in runs.rglob("*") if p.is_file()]  # nothing written


def test_memory_check_false_skips_it(tiny_bert, sentiment_csv, monkeypatch):
    from helpers.cli import prepared

    from finetune import validate
    from finetune.errors import FinetuneError

    data = [f"model={tiny_bert}", f"data={sentiment_csv}", "data.text_column=review", "data.label_column=sentiment"]
    cfg, _, _, features, model = prepared("task=sentiment", *data)
    assert set(validate.training(cfg, model, features)) == {"memory_estimate_mb", "memory_estimate_parts_mb",
                                                            "memory_available_mb"}
    monkeypatch.setattr(me, "_usage_and_available", lambda: (200 * MB, 1 * MB))
    with pytest.raises(FinetuneError, match="^this run needs an estimated "):
        validate.training(cfg, model, features)
    cfg, _, _, features, model = prepared("task=sentiment", *data, "trainer.memory_check=false")
    assert validate.training(cfg, model, features) == {}


@pytest.mark.skipif(_LIBC is None, reason="counting live bytes needs glibc's mallinfo2")
@pytest.mark.parametrize("name, dtype", [("adamw", torch.float32), ("adafactor", torch.float32), ("sgd", torch.float32),
                                         ("adafactor", torch.bfloat16)])
def test_an_optimizer_step_holds_what_the_estimate_counts_for_it(name, dtype, one_thread):
    """The first step of a trainer.optim (as the engines build it): its states and the temporaries it computes in
    (Adafactor's; a bfloat16 weight's float32 buffers), the peak of live bytes above the weights and gradients, within
    15% of the estimate's optimizer part. (bitsandbytes' 8-bit step computes inside one operation, whose temporaries
    the count between operations cannot see: the bench rows measure it.)"""
    from finetune import cpu, optim

    cpu.keep_freed_memory()
    model = tiny_llama(dtype=dtype)
    ids = torch.randint(5, 2000, (2, 32))
    model(input_ids=ids, labels=ids).loss.backward()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = optim.build(name, None, [{"params": params}], 1e-3, "cpu")
    peak, expected = live_peak(optimizer.step), me._optimizer_bytes(params, name)
    assert peak == pytest.approx(expected, rel=0.15), (name, dtype, peak / MB, expected / MB)
