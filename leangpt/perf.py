"""FLOP counts and the measured matmul peak that model FLOPs utilisation (MFU) is reported against.

The peak is measured once per machine (device name, dtype, thread count, torch version) and cached in
~/.cache/leangpt/peak.json ($LEANGPT_CACHE_DIR overrides the directory).
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

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


def cache_file() -> Path:
    root = os.environ.get("LEANGPT_CACHE_DIR") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "leangpt"
    return Path(root) / "peak.json"


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_matmul_flops(device: torch.device, dtype: torch.dtype, sizes: tuple[int, ...], seconds: float) -> float:
    """Best over square sizes of the median FLOP/s of repeated timed matmuls (after a warm-up)."""
    best = 0.0
    for n in sizes:
        a = torch.randn(n, n, device=device).to(dtype)
        b = torch.randn(n, n, device=device).to(dtype)
        out = torch.empty(n, n, device=device, dtype=dtype)
        torch.matmul(a, b, out=out)
        _sync(device)
        rates, t_end = [], time.perf_counter() + seconds / len(sizes)
        while time.perf_counter() < t_end or len(rates) < 3:
            t0 = time.perf_counter()
            torch.matmul(a, b, out=out)
            _sync(device)
            rates.append(2 * n**3 / (time.perf_counter() - t0))
        best = max(best, statistics.median(rates))
    return best


def cached(key: str, measure) -> float:
    """A per-machine measurement from the cache file, measured and stored on first use."""
    path = cache_file()
    try:
        table = json.loads(path.read_text())
    except (OSError, ValueError):
        table = {}
    if key not in table:
        table[key] = measure()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{os.getpid()}")
            tmp.write_text(json.dumps(table, indent=1))
            os.replace(tmp, path)
        except OSError:
            pass  # a read-only home still gets the figure, just not cached
    return table[key]


def machine_key(device: torch.device, dtype: torch.dtype) -> str:
    threads = torch.get_num_threads() if device.type == "cpu" else 0
    return f"{_device_name(device)}|{dtype}|threads={threads}|torch={torch.__version__}"


def matmul_peak_flops(device: torch.device, dtype: torch.dtype | None = None) -> float:
    """Achievable dense matmul FLOP/s at the training precision: measured once per machine, then cached."""
    if dtype is None:
        from leangpt.device import compute_dtype
        dtype = compute_dtype(device)
    sizes = (4096, 8192) if device.type == "cuda" else (1024, 2048)
    seconds = 2.0
    return cached(machine_key(device, dtype), lambda: measure_matmul_flops(device, dtype, sizes, seconds))


def bf16_matmul_speedup(device: torch.device, m: int = 1024, k: int = 1024, n: int = 1024) -> float:
    """bf16 over fp32 throughput of an (m, k) @ (k, n) matmul, timed alternately so that load changes cancel.

    Below 1 on CPUs without AMX / AVX512-BF16, and on small matrices where bf16 conversions dominate.
    """
    key = machine_key(device, torch.bfloat16) + f"|bf16/fp32|{m}x{k}x{n}"

    def measure() -> float:
        times: dict[torch.dtype, list[float]] = {torch.float32: [], torch.bfloat16: []}
        mats = {dt: (torch.randn(m, k, device=device).to(dt), torch.randn(k, n, device=device).to(dt)) for dt in times}
        for rep in range(6):
            for dt, (a, b) in mats.items():
                _sync(device)
                t0 = time.perf_counter()
                for _ in range(3):
                    a @ b
                _sync(device)
                if rep:  # the first round warms up
                    times[dt].append(time.perf_counter() - t0)
        return statistics.median(times[torch.float32]) / statistics.median(times[torch.bfloat16])
    return cached(key, measure)
