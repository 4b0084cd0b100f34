"""FLOP counts and the measured matmul peak that model FLOPs utilisation (MFU) is reported against.

The peak is measured once per machine (device, dtype, thread count, torch version) and kept in the cache of
measurements (leangpt.machine).
"""

from __future__ import annotations

import statistics
import time

import torch

from leangpt.device import compute_dtype, sync
from leangpt.machine import cached, machine_key
from leangpt.model import GPT


def train_flops_per_token(model: GPT, seq_len: int) -> float:
    """6N for the weights (forward + backward) plus attention's 12·L·C·T (PaLM appendix B).

    N counts the output head's matmul once (tied or not) and excludes the position-embedding lookup.
    """
    c = model.config
    n = sum(p.numel() for p in model.parameters())
    if model.pos_emb is not None:
        n -= model.pos_emb.weight.numel()
    if not c.tie_embeddings:
        n -= model.tok_emb.weight.numel()  # a lookup, not a matmul
    return 6 * n + 12 * c.n_layer * c.n_head * c.head_dim * seq_len


def measure_matmul_flops(device: torch.device, dtype: torch.dtype, sizes: tuple[int, ...], seconds: float) -> float:
    """Best over square sizes of the median FLOP/s of repeated timed matmuls (after a warm-up)."""
    best = 0.0
    for n in sizes:
        a = torch.randn(n, n, device=device).to(dtype)
        b = torch.randn(n, n, device=device).to(dtype)
        out = torch.empty(n, n, device=device, dtype=dtype)
        torch.matmul(a, b, out=out)
        sync(device)
        rates, t_end = [], time.perf_counter() + seconds / len(sizes)
        while time.perf_counter() < t_end or len(rates) < 3:
            t0 = time.perf_counter()
            torch.matmul(a, b, out=out)
            sync(device)
            rates.append(2 * n**3 / (time.perf_counter() - t0))
        best = max(best, statistics.median(rates))
    return best


def matmul_peak_flops(device: torch.device, dtype: torch.dtype | None = None) -> float:
    """Achievable dense matmul FLOP/s at the training precision: measured once per machine, then cached."""
    dtype = dtype or compute_dtype(device)
    sizes = (4096, 8192) if device.type == "cuda" else (1024, 2048)
    seconds = 2.0
    return cached(machine_key(device, dtype), lambda: measure_matmul_flops(device, dtype, sizes, seconds))
