"""Memory: the dtype the model's weights are loaded in (model.dtype), and the memory figures of a run (metrics.json).

    dtype = memory.model_dtype(cfg)          # from_pretrained's dtype, from model.dtype and peft.method
    loaded = memory.usage_mb()               # after the model is loaded and placed on its device
    peaks = memory.gather_peaks()            # every process's peak so far (a collective: all processes call it)
    metrics.update(memory.figures(loaded, peaks, total_params))

On a CPU the figures are resident set sizes (the peak is the process's own high-water mark, VmHWM); on a GPU they
are torch.cuda's allocated bytes (max_memory_allocated): `memory_measure` says which.
"""

from __future__ import annotations

import logging
import re
import resource
import sys

log = logging.getLogger(__name__)

DTYPES = ("auto", "float32", "bfloat16", "float16")
MB = 2**20


def model_dtype(cfg) -> str:
    """The dtype the weights are loaded in (model.dtype, checked by finetune/validate.py). auto: float32, except a LoRA
    base on a GPU with bf16, which is frozen and loaded in bfloat16 (the adapters stay float32: peft's
    autocast_adapter_dtype). Full fine-tuning in a 16-bit dtype, asked for explicitly, trains the weights, gradients
    and optimizer states in that dtype (warned)."""
    import torch

    name = cfg.model.dtype
    if name == "auto":
        # not on a CPU: with AVX512-BF16 a LoRA step on a bf16 base ran faster (docs/benchmarks.md#lora-bf16), but
        # CPUs without it emulate bf16 (not measured): docs/memory.md#dtype
        gpu_bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        name = "bfloat16" if cfg.peft.method == "lora" and gpu_bf16 else "float32"
    elif name != "float32" and cfg.peft.method == "none":
        if name == "bfloat16":  # (finetune/optim.py)
            log.info("model.dtype=bfloat16 with full fine-tuning: the weights step in float32 and are rounded back to "
                     "bfloat16 stochastically, so updates below its precision survive on average")
        else:
            log.warning("model.dtype=%s with full fine-tuning trains in pure %s: no float32 master weights, so updates "
                        "below its precision are lost; model.dtype=float32 (with trainer.mixed_precision on a GPU) "
                        "or bfloat16 (rounded stochastically) keeps them", name, name)
    return name


def _on_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def usage_mb() -> float:
    """The memory this process uses now: resident set size (CPU), or the GPU memory torch has allocated."""
    if _on_gpu():
        import torch

        return torch.cuda.memory_allocated() / MB
    import psutil

    return psutil.Process().memory_info().rss / MB


def peak_mb() -> float:
    """This process's peak so far: its resident high-water mark, or torch's GPU peak."""
    if _on_gpu():
        import torch

        return torch.cuda.max_memory_allocated() / MB
    return rss_peak_mb()


def rss_peak_mb() -> float:
    """This process's own resident high-water mark: Linux's VmHWM, not ru_maxrss, which a process started by vfork and
    exec (subprocess, a launcher) keeps from its parent when the parent's was the higher."""
    try:
        with open("/proc/self/status") as status:
            return int(re.search(r"VmHWM:\s+(\d+) kB", status.read())[1]) / 1024
    except (OSError, TypeError):  # no procfs (macOS: ru_maxrss in bytes, not KiB)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak / (MB if sys.platform == "darwin" else 1024)


def gather_peaks() -> list[float]:
    """Every process's peak so far, in rank order (one entry for a single process)."""
    from accelerate.utils import gather_object

    return [float(p) for p in gather_object([peak_mb()])]


def figures(loaded_mb: float, peaks: list[float], params: int) -> dict:
    """metrics.json's memory entries; bytes per parameter in total and above the loaded model."""
    peak = max(peaks)
    return {"peak_memory_mb": round(peak, 1), "peak_memory_mb_per_process": [round(p, 1) for p in peaks],
            "model_loaded_memory_mb": round(loaded_mb, 1),
            "memory_measure": "cuda max_memory_allocated" if _on_gpu() else "peak RSS",
            "num_parameters": params, "bytes_per_parameter": round(peak * MB / params, 2),
            "bytes_per_parameter_above_loaded": round((peak - loaded_mb) * MB / params, 2)}
