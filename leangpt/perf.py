"""FLOP counts and the measured matmul peak that model FLOPs utilisation (MFU) is reported against."""

from __future__ import annotations

import time

import torch

from leangpt.model import GPT

_peak_cache: dict[str, float] = {}


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


def matmul_peak_flops(device: torch.device, n: int = 1024, seconds: float = 0.5) -> float:
    """Achievable dense matmul FLOP/s at the training precision, measured once per process."""
    key = str(device)
    if key in _peak_cache:
        return _peak_cache[key]
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if device.type == "cuda":
        n = 8192
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    for _ in range(2):
        a @ b
    sync()
    iters, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        iters += 1
        sync()
    _peak_cache[key] = 2 * n**3 * iters / (time.perf_counter() - t0)
    return _peak_cache[key]
