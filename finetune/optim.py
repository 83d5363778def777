"""trainer.optim: the optimizer, from its name, its own settings (trainer.optim_args) and the engine's parameter
groups; bfloat16 weights rounded stochastically; the step inside the backward pass (trainer.optimizer_in_backward).

    optim.check(t, processes)                      # refused combinations, one line each (before anything loads)
    optimizer = optim.build(t.optim, t.optim_args, groups, t.learning_rate, device, t.optimizer_in_backward)
    loss.backward(); optimizer.step(); optimizer.zero_grad()     # as any torch optimizer (in backward: no-ops)
    optimizer.state_dict() / optimizer.load_state_dict(state)    # resume: torch's layout, whatever the optimizer

Names (TRAINER_NAMES: the Trainer's own name for each), bytes of state a trained parameter:
  adamw        torch.optim.AdamW, fused kernel on CPU and CUDA (the engines' optimizer before trainer.optim): 8
  adamw_fused  the same, refused on a device without the fused kernel: 8
  adamw_8bit   bitsandbytes' AdamW8bit (blockwise 8-bit states, CPU and GPU; tensors under 4,096 values: 32-bit): 2
  adafactor    transformers' Adafactor at trainer.learning_rate (the Trainer's): factored second moments, no first
               moment (a row and a column a matrix)
  sgd          torch.optim.SGD with momentum 0.9: 4

A trained bfloat16 parameter (full fine-tuning with model.dtype=bfloat16) steps in float32 (its states are float32)
and is rounded back to bfloat16 stochastically, so updates below bfloat16's precision survive on average.
"""

from __future__ import annotations

import inspect
from collections import defaultdict

import torch

from finetune.errors import FinetuneError

NAMES = ("adamw", "adamw_fused", "adamw_8bit", "adafactor", "sgd")
TRAINER_NAMES = {"adamw": "adamw_torch_fused", "adamw_fused": "adamw_torch_fused", "adamw_8bit": "adamw_bnb_8bit",
                 "adafactor": "adafactor", "sgd": "sgd"}
FUSED_DEVICES = ("cpu", "cuda")  # where the engines used AdamW's fused kernel (torch has it on both)
# optimizers whose states follow FSDP2's sharded (DTensor) parameters
SHARDABLE = ("adamw", "adamw_fused", "sgd")


def check(t, processes: int = 1) -> None:
    """The trainer settings' optimizer choices that cannot work together, refused in one line each."""
    if t.optim not in NAMES:
        raise FinetuneError(f"unknown trainer.optim '{t.optim}': choose one of {', '.join(NAMES)}")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    settings(t.optim, optimizer_class(t.optim, device)[0], t.optim_args)  # trainer.optim_args the class takes
    if t.fsdp and t.optim not in SHARDABLE:
        raise FinetuneError(f"trainer.optim={t.optim} keeps no sharded states under trainer.fsdp=true: use one of "
                            f"{', '.join(SHARDABLE)}")
    if not t.optimizer_in_backward:
        return
    why = None
    if processes > 1 or t.fsdp:
        why = "runs in one process (each weight steps before gradients are averaged across processes)"
    elif t.gradient_accumulation_steps > 1:
        why = "steps on each micro-batch's gradient: set trainer.gradient_accumulation_steps=1"
    elif t.max_grad_norm > 0:
        why = "steps each weight before the whole gradient's norm is known: set trainer.max_grad_norm=0"
    elif t.mixed_precision == "fp16":
        why = "cannot unscale fp16's scaled gradients before the step: use trainer.mixed_precision=bf16 or no"
    if why:
        raise FinetuneError(f"trainer.optimizer_in_backward=true {why}")


def optimizer_class(name: str, device: torch.device) -> tuple[type, dict]:
    """The optimizer class a name builds and the settings it starts from (trainer.optim_args override them)."""
    if name in ("adamw", "adamw_fused"):
        fused = device.type in FUSED_DEVICES
        if name == "adamw_fused" and not fused:
            raise FinetuneError(f"trainer.optim=adamw_fused: PyTorch has no fused AdamW for {device.type}; use "
                                f"trainer.optim=adamw")
        return torch.optim.AdamW, {"fused": True} if fused else {}
    if name == "adamw_8bit":
        # bitsandbytes, not torchao: on a CPU its step ran 1.8x faster, with no compiling first
        # (docs/benchmarks.md#optimizers)
        try:
            import bitsandbytes
        except ImportError:
            raise FinetuneError("trainer.optim=adamw_8bit needs bitsandbytes: pip install 'finetune[bnb]'") from None
        return bitsandbytes.optim.AdamW8bit, {}
    if name == "adafactor":
        from transformers.optimization import Adafactor

        # as the Trainer's: trainer.learning_rate is the step size (not one relative to each weight's scale)
        return Adafactor, {"scale_parameter": False, "relative_step": False, "warmup_init": False}
    if name == "sgd":
        return torch.optim.SGD, {"momentum": 0.9}
    raise FinetuneError(f"unknown trainer.optim '{name}': choose one of {', '.join(NAMES)}")


def settings(name: str, cls: type, optim_args) -> dict:
    """trainer.optim_args as keyword arguments of the optimizer class (lists become tuples: betas, eps)."""
    from omegaconf import OmegaConf

    taken = set(inspect.signature(cls).parameters) - {"params", "lr", "weight_decay"}
    if OmegaConf.is_config(optim_args):
        optim_args = OmegaConf.to_container(optim_args)
    kwargs = {}
    for key, value in (optim_args or {}).items():
        if key in ("lr", "weight_decay"):
            raise FinetuneError(f"trainer.optim_args.{key}: set trainer.{'learning_rate' if key == 'lr' else key}")
        if key not in taken:
            raise FinetuneError(f"trainer.optim_args.{key}: {name} ({cls.__module__}.{cls.__name__}) has no such "
                                f"setting; it takes {', '.join(sorted(taken))}")
        kwargs[key] = tuple(value) if isinstance(value, list) else value
    return kwargs


def build(name: str, optim_args, groups: list[dict], lr: float, device, in_backward: bool = False):
    """The optimizer over the engine's parameter groups (each may set its own lr and weight_decay)."""
    device = torch.device(device)
    cls, kwargs = optimizer_class(name, device)
    kwargs.update(settings(name, cls, optim_args))

    def make(param_groups: list[dict]) -> torch.optim.Optimizer:
        try:
            return cls(param_groups, lr=lr, **kwargs)
        except (TypeError, ValueError, RuntimeError) as exc:
            raise FinetuneError(f"trainer.optim={name} with trainer.optim_args {kwargs}: {exc}") from None

    params = [p for group in groups for p in group["params"]]
    if not (in_backward or any(p.dtype == torch.bfloat16 for p in params)):
        return make(groups)
    from torch.distributed.tensor import DTensor

    if any(isinstance(p, DTensor) for p in params):
        raise FinetuneError("trainer.fsdp=true with bfloat16 weights: their stochastic rounding does not run on "
                            "sharded parameters; use model.dtype=float32")
    return PerParameter(groups, make, in_backward)


def describe(optimizer) -> str:
    """One line for the model card: the optimizer class, and how it steps."""
    inner = optimizer.optimizers[0] if isinstance(optimizer, PerParameter) else optimizer
    parts = [f"{type(inner).__module__}.{type(inner).__name__}"]
    if isinstance(optimizer, PerParameter):
        if optimizer.generator is not None:
            parts.append("bfloat16 weights rounded stochastically")
        if optimizer.in_backward:
            parts.append("step inside the backward pass")
    return ", ".join(parts)


def round_to_bfloat16(x: torch.Tensor, generator: torch.Generator, out: torch.Tensor | None = None,
                      noise: torch.Tensor | None = None) -> torch.Tensor:
    """float32 -> bfloat16, rounding away from zero with probability (the 16 bits bfloat16 drops) / 2^16, so the
    result equals x on average (rounding to nearest drops every update below half a bfloat16 step). Into `out` if
    given, a slice of int32 `noise` at a time (x is then overwritten)."""
    out = torch.empty(x.shape, dtype=torch.bfloat16, device=x.device) if out is None else out
    flat, target = x.view(-1).view(torch.int32), out.view(-1)
    size = flat.numel() if noise is None else noise.numel()
    for start in range(0, flat.numel(), size):
        part = flat[start:start + size]
        bits = torch.randint(0, 1 << 16, part.shape, dtype=torch.int32, device=x.device, generator=generator,
                             out=None if noise is None else noise[:part.numel()])
        # adding the noise to the low 16 bits carries into the kept bits with exactly that probability
        target[start:start + size].copy_(part.add_(bits).bitwise_and_(-65536).view(torch.float32))
    return out


class PerParameter(torch.optim.Optimizer):
    """One optimizer per parameter, driven as one optimizer: param_groups are the inner optimizers' groups (one
    parameter each, so a scheduler sets every one's lr), state is theirs (one dict), state_dict() has torch's layout.
    step() steps each parameter with a gradient; in backward, each parameter's post-accumulate-grad hook steps it as
    soon as its gradient is complete (torchtune's optimizer_in_bwd), and no whole-model gradient ever exists.
    Gradients are freed once used. A bfloat16 parameter steps in float32 and is rounded back stochastically."""

    def __init__(self, groups: list[dict], make, in_backward: bool = False):
        single = [{**group, "params": [p]} for group in groups for p in group["params"]]
        self.optimizers = [make([group]) for group in single]
        super().__init__([group["params"][0] for group in single], {})
        self.defaults = self.optimizers[0].defaults
        self.in_backward = in_backward
        self._link([o.param_groups[0] for o in self.optimizers], self.state)
        self._index = {id(o.param_groups[0]["params"][0]): i for i, o in enumerate(self.optimizers)}
        low = [g["params"][0] for g in self.param_groups if g["params"][0].dtype == torch.bfloat16]
        self.generator, self._scratch = None, None
        if low:  # its own stream (saved with the states): rounding draws nothing from the global generator
            self.generator = torch.Generator(device=low[0].device)
            self.generator.manual_seed(torch.initial_seed())
        self.hooks = [g["params"][0].register_post_accumulate_grad_hook(self._hook)
                      for g in self.param_groups] if in_backward else []

    def _link(self, groups: list[dict], state) -> None:
        self.param_groups, self.state = groups, state
        for optimizer, group in zip(self.optimizers, groups):
            optimizer.param_groups, optimizer.state = [group], state

    @torch.no_grad()
    def _step_one(self, p: torch.Tensor) -> None:
        optimizer = self.optimizers[self._index[id(p)]]
        if p.dtype != torch.bfloat16:
            optimizer.step()
        else:  # float32 arithmetic and states in reused buffers, then stochastic rounding back into the weight's own
            # memory: a new float32 copy and a new weight every step fragmented the heap to 2-3x the live bytes
            weight, grad, n = p.data, p.grad, p.numel()
            weight32, grad32, noise = self._buffers()
            p.data = weight32[:n].view(p.shape).copy_(weight)
            p.grad = grad32[:n].view(p.shape).copy_(grad)
            del grad
            optimizer.step()
            round_to_bfloat16(p.data, self.generator, out=weight, noise=noise)
            p.data = weight
        p.grad = None

    def _buffers(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """float32 weight and gradient buffers the size of the largest bfloat16 parameter, and a slice of noise."""
        if self._scratch is None:
            low = [g["params"][0] for g in self.param_groups if g["params"][0].dtype == torch.bfloat16]
            largest, device = max(p.numel() for p in low), low[0].device
            self._scratch = (torch.empty(largest, device=device), torch.empty(largest, device=device),
                             torch.empty(min(largest, 1 << 22), dtype=torch.int32, device=device))
        return self._scratch

    def _hook(self, p: torch.Tensor) -> None:
        self._step_one(p)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if not self.in_backward:  # (in backward the hooks have stepped every parameter already)
            for group in self.param_groups:
                if group["params"][0].grad is not None:
                    self._step_one(group["params"][0])
        return loss

    def state_dict(self) -> dict:
        state = super().state_dict()
        if self.generator is not None:
            state["rounding_generator"] = self.generator.get_state()
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        """Each parameter's share goes to its own optimizer's load_state_dict (bitsandbytes' keeps 8-bit states 8-bit,
        where torch's would cast them to the parameter's dtype)."""
        states, groups = state_dict["state"], state_dict["param_groups"]
        if len(groups) != len(self.optimizers):
            raise ValueError(f"the saved optimizer has {len(groups)} parameters, this one {len(self.optimizers)}")
        for optimizer, group in zip(self.optimizers, groups):
            (index,) = group["params"]
            p = optimizer.param_groups[0]["params"][0]
            # loading casts states to their parameter's dtype: a bfloat16 parameter's are float32, so it is float32
            # while its own load, one at a time (the whole model in float32 at once: 4 bytes a parameter more)
            low = p.dtype == torch.bfloat16 and index in states
            if low:
                p.data = p.data.float()
            try:
                optimizer.load_state_dict({"state": {0: states[index]} if index in states else {},
                                           "param_groups": [{**group, "params": [0]}]})
            finally:
                if low:
                    p.data = p.data.to(torch.bfloat16)  # (exact: these values came from bfloat16)
        state = defaultdict(dict)
        for optimizer in self.optimizers:
            state.update(optimizer.state)
        self._link([o.param_groups[0] for o in self.optimizers], state)
        if "rounding_generator" in state_dict and self.generator is not None:
            self.generator.set_state(state_dict["rounding_generator"])
