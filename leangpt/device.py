"""Device and precision choices, detected rather than assumed."""

from __future__ import annotations

import contextlib
import functools

import torch

from leangpt.errors import UserError


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown device {name!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("device cuda requested but no CUDA GPU is available")
    return device


@functools.lru_cache(maxsize=None)
def compute_dtype(device: torch.device, shape: tuple[int, int, int] | None = None) -> torch.dtype:
    """bf16 where it is measurably faster than fp32 (GPUs with bf16, CPUs with AMX / AVX512-BF16); fp32 elsewhere.

    On CPUs this is measured (once per machine, cached) on a matmul of the given (m, k, n) shape, e.g. a model's
    MLP: AVX2-only CPUs run bf16 at a small fraction of fp32, and even AVX512-BF16 loses on small matrices.
    """
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    if device.type == "cpu":
        from leangpt.perf import bf16_matmul_speedup
        return torch.bfloat16 if bf16_matmul_speedup(device, *(shape or (1024, 1024, 1024))) > 1.3 else torch.float32
    return torch.float32


PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16}


def resolve_precision(device: torch.device, precision: str = "auto", shape: tuple[int, int, int] | None = None) -> torch.dtype:
    """"auto" (measured on a matmul of shape, see compute_dtype), "fp32" or "bf16"."""
    if precision == "auto":
        return compute_dtype(device, shape)
    if precision not in PRECISIONS:
        raise UserError(f"precision must be auto, fp32 or bf16, got {precision!r}")
    return PRECISIONS[precision]


def autocast(device: torch.device, dtype: torch.dtype | None = None):
    """Autocast to dtype (default: the measured compute dtype); plain fp32 where bf16 does not pay."""
    dtype = dtype or compute_dtype(device)
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)
