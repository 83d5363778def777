"""trainer.optim on a tiny model, in a plain loop: every optimizer lowers the loss and resumes from its saved state to
the same weights as an uninterrupted run (8-bit states and stochastic rounding's included); bfloat16 weights keep
updates below their precision; the step inside backward equals the plain step; refused combinations in one line."""

from __future__ import annotations

import io
from types import SimpleNamespace

import pytest
import torch

from finetune import optim
from finetune.errors import FinetuneError

pytestmark = pytest.mark.usefixtures("one_thread")
# 64 x 64 weights: the 8-bit optimizer keeps 8-bit states for tensors of 4,096 values and more (32-bit below)
WIDTH, STEPS = 64, 6


def _model(dtype=torch.float32) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(WIDTH, WIDTH), torch.nn.Tanh(), torch.nn.Linear(WIDTH, WIDTH)).to(dtype)


def _batch(step: int, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(step)
    x = torch.randn(16, WIDTH, generator=generator)
    return x.to(dtype), torch.tanh(x.flip(1)).to(dtype)


def _build(model, name, in_backward=False, optim_args=None, lr=1e-2):
    """The engines' groups (weight decay on weights, none on biases) and a linear schedule with warmup."""
    from transformers import get_scheduler

    groups = [{"params": [model[0].weight, model[2].weight], "weight_decay": 0.01},
              {"params": [model[0].bias, model[2].bias], "weight_decay": 0.0}]
    optimizer = optim.build(name, optim_args, groups, lr, "cpu", in_backward)
    return optimizer, get_scheduler("linear", optimizer, num_warmup_steps=2, num_training_steps=2 * STEPS)


def _train(model, optimizer, scheduler, steps: range, dtype=torch.float32) -> list[float]:
    losses = []
    for step in steps:
        x, y = _batch(step, dtype)
        loss = torch.nn.functional.mse_loss(model(x).float(), y.float())
        loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("name", optim.NAMES)
def test_each_optimizer_lowers_the_loss(name):
    model = _model()
    optimizer, scheduler = _build(model, name, lr=1.0 if name == "sgd" else 1e-2)
    losses = _train(model, optimizer, scheduler, range(2 * STEPS))
    assert sum(losses[-3:]) < 0.8 * sum(losses[:3]), losses


CASES = [*((name, torch.float32, False) for name in optim.NAMES),
         ("adamw", torch.bfloat16, False),       # stochastic rounding: its generator's state is saved too
         ("adamw_8bit", torch.bfloat16, False),  # 8-bit states of float32 steps on bfloat16 weights
         ("adamw", torch.float32, True), ("adafactor", torch.bfloat16, True)]


@pytest.mark.parametrize(("name", "dtype", "in_backward"), CASES)
def test_saved_state_resumes_to_the_weights_of_an_uninterrupted_run(name, dtype, in_backward):
    model = _model(dtype)
    optimizer, scheduler = _build(model, name, in_backward)
    _train(model, optimizer, scheduler, range(2 * STEPS), dtype)

    first = _model(dtype)
    optimizer, scheduler = _build(first, name, in_backward)
    _train(first, optimizer, scheduler, range(STEPS), dtype)
    saved = io.BytesIO()  # as the engines' checkpoints hold them (torch.load with weights_only)
    torch.save({"model": first.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()},
               saved)
    saved.seek(0)
    state = torch.load(saved, weights_only=True)
    resumed = _model(dtype)
    resumed.load_state_dict(state["model"])
    optimizer, scheduler = _build(resumed, name, in_backward)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    _train(resumed, optimizer, scheduler, range(STEPS, 2 * STEPS), dtype)

    assert all(p.dtype == dtype for p in resumed.parameters())
    for a, b in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(a, b)
    assert not torch.equal(model[0].weight, _model(dtype)[0].weight)  # (it trained)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_8bit_states_stay_8_bit_through_saving_and_loading(dtype):
    model = _model(dtype)
    optimizer, scheduler = _build(model, "adamw_8bit")
    _train(model, optimizer, scheduler, range(1), dtype)
    saved = io.BytesIO()
    torch.save(optimizer.state_dict(), saved)
    saved.seek(0)
    optimizer, _ = _build(_model(dtype), "adamw_8bit")
    optimizer.load_state_dict(torch.load(saved, weights_only=True))
    states = [state for p, state in optimizer.state.items() if p.dim() == 2]  # the weights' (biases' are 32-bit)
    assert [(s["state1"].dtype, s["state2"].dtype, s["absmax1"].dtype) for s in states] == \
        [(torch.uint8, torch.uint8, torch.float32)] * 2


def test_loading_no_states_leaves_bfloat16_weights_as_they_are():
    """accelerate's prepare() reloads a new optimizer's empty state: no weight is cast (the whole model in float32
    at once was a 1.7B model's peak), and a weight with states is cast back to bfloat16 after its own load."""
    model = _model(torch.bfloat16)
    optimizer, scheduler = _build(model, "adamw")
    storages = [p.untyped_storage().data_ptr() for p in model.parameters()]
    optimizer.load_state_dict(optimizer.state_dict())
    assert [p.untyped_storage().data_ptr() for p in model.parameters()] == storages
    _train(model, optimizer, scheduler, range(1), torch.bfloat16)
    optimizer.load_state_dict(optimizer.state_dict())
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert all(s["exp_avg"].dtype == torch.float32 for s in optimizer.state.values())


def test_stochastic_rounding_keeps_updates_below_bfloat16_precision():
    # 1e-4 a step is below half of bfloat16's spacing at 1.0 (2^-8): rounded to nearest, every step is lost
    def weight():
        return torch.nn.Parameter(torch.ones(4096, dtype=torch.bfloat16))

    plain, rounded = weight(), weight()
    sgd = torch.optim.SGD([plain], lr=1e-4)
    ours = optim.build("sgd", {"momentum": 0.0}, [{"params": [rounded], "weight_decay": 0.0}], 1e-4, "cpu")
    for _ in range(100):
        for p, optimizer in ((plain, sgd), (rounded, ours)):
            p.grad = torch.ones_like(p)
            optimizer.step()
    assert torch.equal(plain, torch.ones_like(plain))
    assert rounded.dtype == torch.bfloat16
    assert rounded.float().mean().item() == pytest.approx(1 - 100 * 1e-4, abs=2e-4)


def test_rounding_to_bfloat16_is_unbiased_and_exact_on_bfloat16_values():
    generator = torch.Generator().manual_seed(0)
    x = torch.full((100_000,), 1 + 2**-10)  # a quarter of the way from 1 to the next bfloat16 (1 + 2^-7)
    rounded = optim.round_to_bfloat16(x, generator)
    assert set(rounded.float().unique().tolist()) == {1.0, 1 + 2**-7}
    assert rounded.float().mean().item() == pytest.approx(1 + 2**-10, abs=2e-4)
    exact = torch.randn(1000).to(torch.bfloat16)
    assert torch.equal(optim.round_to_bfloat16(exact.float(), generator), exact)


@pytest.mark.parametrize("name", ["sgd", "adamw"])
def test_the_step_inside_backward_equals_the_plain_step(name):
    plain, inside = _model(), _model()
    optimizer, scheduler = _build(plain, name)
    expected = _train(plain, optimizer, scheduler, range(STEPS))
    optimizer, scheduler = _build(inside, name, in_backward=True)
    assert _train(inside, optimizer, scheduler, range(STEPS - 1)) == expected[:-1]
    x, y = _batch(STEPS - 1)
    before = inside[0].weight.detach().clone()
    torch.nn.functional.mse_loss(inside(x), y).backward()
    assert all(p.grad is None for p in inside.parameters())  # each gradient was used and freed inside backward
    assert not torch.equal(before, inside[0].weight)
    for a, b in zip(plain.parameters(), inside.parameters()):
        assert torch.equal(a, b)
    assert [g["lr"] for g in optimizer.param_groups] == [scheduler.get_last_lr()[0]] * 4


def _trainer(**changes):
    t = dict(optim="adamw", optim_args={}, fsdp=False, optimizer_in_backward=False, gradient_accumulation_steps=1,
             max_grad_norm=0.0, mixed_precision="auto")
    return SimpleNamespace(**{**t, **changes})


@pytest.mark.parametrize(("changes", "processes", "message"), [
    (dict(optim="adam"), 1, "unknown trainer.optim 'adam': choose one of adamw, adamw_fused"),
    (dict(optim="adafactor", fsdp=True), 2, "trainer.optim=adafactor keeps no sharded states under trainer.fsdp=true"),
    (dict(optimizer_in_backward=True), 2, "trainer.optimizer_in_backward=true runs in one process"),
    (dict(optimizer_in_backward=True, gradient_accumulation_steps=2), 1, "set trainer.gradient_accumulation_steps=1"),
    (dict(optimizer_in_backward=True, max_grad_norm=1.0), 1, "set trainer.max_grad_norm=0"),
    (dict(optimizer_in_backward=True, mixed_precision="fp16"), 1, "use trainer.mixed_precision=bf16 or no"),
])
def test_refused_combinations_are_one_line(changes, processes, message):
    with pytest.raises(FinetuneError, match=message) as error:
        optim.check(_trainer(**changes), processes)
    assert "\n" not in str(error.value)
    optim.check(_trainer(optimizer_in_backward=True), 1)  # the supported case passes


@pytest.mark.parametrize(("name", "optim_args", "device", "message"), [
    ("adamw", {"momentum": 0.9}, "cpu", (r"trainer.optim_args.momentum: adamw \(torch.optim.adamw.AdamW\) has no "
                                         r"such setting; it takes amsgrad, betas")),
    ("sgd", {"lr": 0.1}, "cpu", "trainer.optim_args.lr: set trainer.learning_rate"),
    ("adamw", {"betas": [0.9, 1.5]}, "cpu", r"trainer.optim=adamw with trainer.optim_args .*Invalid beta parameter"),
    ("adamw_fused", None, "meta", "PyTorch has no fused AdamW for meta; use trainer.optim=adamw"),
])
def test_bad_settings_are_one_line(name, optim_args, device, message):
    groups = [{"params": [torch.nn.Parameter(torch.zeros(4, device=device))], "weight_decay": 0.0}]
    with pytest.raises(FinetuneError, match=message) as error:
        optim.build(name, optim_args, groups, 1e-3, device)
    assert "\n" not in str(error.value)


def test_the_8bit_optimizer_without_bitsandbytes_names_the_install(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # (import bitsandbytes now raises ImportError)
    with pytest.raises(FinetuneError, match=r"^trainer.optim=adamw_8bit needs bitsandbytes: pip install "
                                            r"'finetune\[bnb\]'$"):
        optim.build("adamw_8bit", None, [{"params": [torch.nn.Parameter(torch.zeros(4))]}], 1e-3, "cpu")


def test_optim_args_reach_the_optimizer_and_describe_names_it():
    model = _model(torch.bfloat16)
    optimizer, _ = _build(model, "sgd", in_backward=True, optim_args={"momentum": 0.5, "nesterov": True})
    assert {(g["momentum"], g["nesterov"]) for g in optimizer.param_groups} == {(0.5, True)}
    assert optim.describe(optimizer) == ("torch.optim.sgd.SGD, bfloat16 weights rounded stochastically, step inside "
                                         "the backward pass")


def test_bfloat16_weights_sharded_by_fsdp_are_refused_in_one_line(tmp_path):
    import torch.distributed as dist
    from torch.distributed.tensor import DeviceMesh, Shard, distribute_tensor

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        weight = distribute_tensor(torch.zeros(4, 4, dtype=torch.bfloat16), DeviceMesh("cpu", [0]), [Shard(0)])
        with pytest.raises(FinetuneError, match=r"^trainer.fsdp=true with bfloat16 weights: .*model.dtype=float32$"):
            optim.build("adamw", None, [{"params": [torch.nn.Parameter(weight)]}], 1e-3, "cpu")
    finally:
        dist.destroy_process_group()
