"""Device and precision choices, detected rather than assumed."""

from __future__ import annotations

import contextlib
import functools
import statistics
import time

import torch

from leangpt.errors import UserError
from leangpt.machine import cached, machine_key


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
        return torch.bfloat16 if bf16_matmul_speedup(device, *(shape or (1024, 1024, 1024))) > 1.3 else torch.float32
    return torch.float32


def sync(device: torch.device) -> None:
    """Wait for the device's queued work, so that a timer measures it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bf16_matmul_speedup(device: torch.device, m: int = 1024, k: int = 1024, n: int = 1024) -> float:
    """bf16 over fp32 throughput of an (m, k) @ (k, n) matmul, timed alternately so that load changes cancel;
    measured once per machine, then cached.

    Below 1 on CPUs without AMX / AVX512-BF16, and on small matrices where bf16 conversions dominate.
    """
    key = machine_key(device, torch.bfloat16) + f"|bf16/fp32|{m}x{k}x{n}"

    def measure() -> float:
        times: dict[torch.dtype, list[float]] = {torch.float32: [], torch.bfloat16: []}
        mats = {dt: (torch.randn(m, k, device=device).to(dt), torch.randn(k, n, device=device).to(dt)) for dt in times}
        for rep in range(6):
            for dt, (a, b) in mats.items():
                sync(device)
                t0 = time.perf_counter()
                for _ in range(3):
                    a @ b
                sync(device)
                if rep:  # the first round warms up
                    times[dt].append(time.perf_counter() - t0)
        return statistics.median(times[torch.float32]) / statistics.median(times[torch.bfloat16])
    return cached(key, measure)


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
