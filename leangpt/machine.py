"""Facts about the machine, read in one place: the CPU (name, the instruction-set flags that decide which kernels
and precisions pay), cores, memory; the cache directory and the one cache of per-machine measurements; a
description for reports and JSON; and the paired-median timer that benchmarks use.

A leaf: it imports nothing from leangpt, so every other module may import it.
"""

from __future__ import annotations

import functools
import json
import os
import platform
import random
import statistics
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

# The CPU flags (as Linux's /proc/cpuinfo spells them) that decide which matmul kernels and precisions are fast.
CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8")

MEASUREMENTS_FILE = "measurements.json"


@functools.cache
def _cpuinfo() -> dict[str, str]:
    """The first processor's fields of /proc/cpuinfo; empty where there is none (not Linux)."""
    fields: dict[str, str] = {}
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return fields
    for line in text.splitlines():
        if not line.strip():
            break  # the end of the first processor's block
        key, sep, value = line.partition(":")
        if sep:
            fields.setdefault(key.strip(), value.strip())
    return fields


def cpu_name() -> str:
    """The CPU's model name, e.g. "AMD EPYC 9B14"; the platform's processor or machine type where unknown."""
    return _cpuinfo().get("model name") or platform.processor() or platform.machine()


def cpu_flags() -> list[str]:
    """Those of CPU_FLAGS that this CPU has (empty where /proc/cpuinfo is not available)."""
    have = set(_cpuinfo().get("flags", "").split())
    return [f for f in CPU_FLAGS if f in have]


def memory_gib() -> float | None:
    try:
        return round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (AttributeError, ValueError, OSError):
        return None


def device_name(device: torch.device) -> str:
    """The GPU's name for a CUDA device, else the CPU's."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return cpu_name()


def describe() -> dict[str, Any]:
    """The machine, for reports and JSON results."""
    info: dict[str, Any] = {
        "cpu": cpu_name(), "cpu_flags": cpu_flags(), "cores": os.cpu_count(), "memory_gib": memory_gib(),
        "torch": torch.__version__, "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
        "platform": platform.platform()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


# ---------------------------------------------------------------- the cache of measurements

def cache_dir() -> Path:
    """$LEANGPT_CACHE_DIR, else $XDG_CACHE_HOME/leangpt, else ~/.cache/leangpt."""
    if root := os.environ.get("LEANGPT_CACHE_DIR"):
        return Path(root)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "leangpt"


def cache_file() -> Path:
    return cache_dir() / MEASUREMENTS_FILE


def _read_measurements(path: Path) -> dict[str, Any]:
    try:
        table = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return table if isinstance(table, dict) else {}


def machine_key(device: torch.device, dtype: torch.dtype | None = None) -> str:
    """What a measurement on `device` depends on: the device's name (and on a CPU the instruction set torch
    dispatches to and its thread count), the dtype when given, and torch's version."""
    if device.type == "cpu":
        where = f"{device_name(device)}|{torch.backends.cpu.get_cpu_capability()}|threads={torch.get_num_threads()}"
    else:
        where = f"{device_name(device)}|threads=0"
    return f"{where}|{dtype}|torch={torch.__version__}" if dtype is not None else f"{where}|torch={torch.__version__}"


def cached(key: str, measure: Callable[[], Any], accept: Callable[[Any], bool] | None = None) -> Any:
    """The measurement stored under `key` in the cache file, else measure() now, stored for next time.

    A stored value that accept() refuses is measured again (e.g. kernel timings from before a new candidate
    kernel existed). Values must be JSON-serialisable."""
    path = cache_file()
    table = _read_measurements(path)
    if key in table and (accept is None or accept(table[key])):
        return table[key]
    value = measure()
    table = _read_measurements(path)  # measuring can take seconds: keep what other processes stored meanwhile
    table[key] = value
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        tmp.write_text(json.dumps(table, indent=1, sort_keys=True))
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only home still gets the figure, just not cached
    return value


# ---------------------------------------------------------------- timing

Figure = float | dict[str, float]


def _median(values: list[Figure]) -> Figure:
    if isinstance(values[0], dict):
        return {k: statistics.median(v[k] for v in values) for k in values[0]}  # type: ignore[index]
    return statistics.median(values)  # type: ignore[arg-type]


def paired_medians(candidates: Mapping[str, Callable[[], Figure | None]], repeats: int,
                   warmup: int = 1) -> dict[str, Figure]:
    """The median of each candidate over `repeats` rounds, every round calling each candidate in turn, so that
    load from other processes on a shared machine falls on all of them alike; `warmup` untimed rounds first.
    The rounds after the first take the candidates in a shuffled order (seeded), so that none always runs
    after the same other one: after one that filled the CPU's caches with its own data, or whose threads still
    spin for work (onnxruntime's, OpenMP's).

    A candidate returns None (then its whole call is timed), the seconds of a part it timed itself (e.g. the
    decoding after the first token), or several figures by name, each of which gets its own median."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    samples: dict[str, list[Figure]] = {name: [] for name in candidates}
    names = list(candidates)
    for round_ in range(warmup + repeats):
        for name in names if round_ == 0 else random.Random(round_).sample(names, len(names)):
            t0 = time.perf_counter()
            figure = candidates[name]()
            if round_ >= warmup:
                samples[name].append(time.perf_counter() - t0 if figure is None else figure)
    return {name: _median(values) for name, values in samples.items()}
