"""Model-FLOPs utilisation for the bench (docs/benchmarks.md#mfu): a training step's FLOPs a token, and the matmul rate
of this machine on the shapes a model runs."""

from __future__ import annotations

import time

from finetune import adapters

SQUARE = (2048, 2048, 2048)


def matmul_peak_flops(shapes=(SQUARE,), dtype: str = "float32", repeats: int = 5,
                      seconds: float = 0.2) -> dict[tuple, float]:
    """FLOP/s of x (m x k) @ w (k x n) in `dtype` for each shape: the best of `repeats` timings of about `seconds` each
    (a shared machine's slow moments and the thread pool's start do not count)."""
    import torch

    rates = {}
    for m, k, n in shapes:
        x, w = torch.randn(m, k, dtype=getattr(torch, dtype)), torch.randn(k, n, dtype=getattr(torch, dtype))
        x @ w
        start, calls = time.perf_counter(), 0
        while time.perf_counter() - start < seconds / 4:  # calls per timing
            x @ w
            calls += 1
        calls = max(1, calls * 4)
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            for _ in range(calls):
                x @ w
            best = min(best, time.perf_counter() - start)
        rates[(m, k, n)] = 2 * m * k * n * calls / best
    return rates


def matmul_shapes(model, tokens: int) -> list[tuple[int, int, int]]:
    """The matmuls of the model's linear layers at `tokens` tokens a micro-batch: forward (tokens x in @ in x out),
    input gradient (tokens x out @ out x in) and weight gradient (out x tokens @ tokens x in)."""
    import torch

    layers = {(m.in_features, m.out_features) for m in model.modules() if isinstance(m, torch.nn.Linear)}
    return sorted({shape for i, o in layers if min(i, o) > 64  # (not LoRA's rank-16 factors)
                   for shape in ((tokens, i, o), (tokens, o, i), (o, tokens, i))})


def flops_per_token(model) -> float:
    """(4 + 2 x trainable fraction) x N: forward 2N, input gradients 2N, weight gradients 2N of the trained part.
    N counts the weights that multiply: not the input embedding table (a lookup), unless the LM head shares it."""
    base = adapters.base_model(model)
    lookup = {id(p) for n, p in base.named_parameters() if "embed" in n}
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    if head is not None:
        lookup -= {id(head.weight)}
    weights = [(p, n) for n, p in model.named_parameters() if id(p) not in lookup and "lora_" not in n]
    params = sum(p.numel() for p, _ in weights)
    # trained weights that multiply (a tied LM head trained in full included), and the adapters'
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad and id(p) not in lookup)
    return (4 + 2 * min(trainable / params, 1)) * params
