"""`leangpt bench`: speed, memory and size of one or more checkpoints, side by side.

Each (model, batch) record is measured in a fresh process, so that its peak memory is its own and one model's
warm caches do not flatter the next. Prompts are random token ids; decoding is greedy and runs the full token
budget (no end-of-text stop), after one warm-up run; figures are medians over the repeats. The generation is
iterated as `leangpt generate` and `serve` iterate it (the host takes every step's tokens) and timed from the
host, so the figures are what users get.
"""

from __future__ import annotations

import multiprocessing
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from leangpt import cli
from leangpt.checkpoint import load_config, load_model, read_meta
from leangpt.cli import setting
from leangpt.device import pick_device
from leangpt.engine import Engine, Generation, Request
from leangpt.errors import UserError
from leangpt.machine import describe
from leangpt.quant.model import QuantEmbedding, kernels_used
from leangpt.sampling import SamplingConfig


@dataclass
class BenchSettings:
    models: list[Path] = setting([], "checkpoint directory; repeat to compare several", flag="--model",
                                 metavar="MODEL", required=True)
    batches: list[int] = setting([1, 8], "batch size; repeatable", flag="--batch", metavar="BATCH")
    prompt_tokens: int = setting(32, "prompt length in tokens (random ids)")
    new_tokens: int = setting(128, "tokens generated per row (greedy, no early stop)")
    repeats: int = setting(3, "timed runs after one warm-up; the median is reported")
    compile: bool = setting(True, "torch.compile the decode step (on a CPU, steps of up to 64 rows take leangpt's "
                                 "C++ step; compile time not counted); --no-compile times them eagerly")
    threads: int | None = setting(None, "torch threads (default: torch's choice, one per core)")
    device: str = setting("auto", "auto, cpu, cuda, ...")

    def validate(self) -> None:
        for name, value in (("--prompt-tokens", self.prompt_tokens), ("--new-tokens", self.new_tokens),
                            ("--repeats", self.repeats), *(("--batch", b) for b in self.batches)):
            if value < 1:
                raise UserError(f"{name} must be >= 1, got {value}")


def peak_rss_mb() -> float:
    """This process's peak resident set. /proc's VmHWM starts afresh at exec; getrusage's ru_maxrss does not
    (Linux carries the parent's peak through fork + exec, so a child of a large process reported its parent's)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    import resource  # elsewhere (macOS: bytes; not reset at exec either)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (2**20 if sys.platform == "darwin" else 1024)


def count_params(model: nn.Module) -> int:
    """Parameters, each tied tensor once; a quantized linear without a float weight counts in × out (+ bias)."""
    n = sum(p.numel() for p in model.parameters())
    for m in model.modules():
        if hasattr(m, "in_features") and not isinstance(getattr(m, "weight", None), nn.Parameter):
            n += m.in_features * m.out_features  # held packed, not as a parameter
            bias = getattr(m, "bias", None)
            if isinstance(bias, torch.Tensor) and not isinstance(bias, nn.Parameter):
                n += bias.numel()
        if isinstance(m, QuantEmbedding) and not model.config.tie_embeddings:  # a tied table counts in the head
            n += m.num_embeddings * m.embedding_dim
    return n


def size_on_disk_mb(directory: Path) -> float:
    return sum(f.stat().st_size for f in directory.glob("model*.safetensors")) / 2**20


def timed_generation(engine: Engine, requests: list[Request]) -> tuple[float, float, Generation]:
    """Run a generation as `leangpt generate` and `serve` do, iterating it step by step, timed from the host:
    (seconds to the first token in hand, seconds from then to the last, the finished generation)."""
    t0 = time.perf_counter()
    gen = engine.start(requests)
    first = None
    for _ in gen:
        if first is None:
            first = time.perf_counter()
    end = time.perf_counter()
    return first - t0, end - first, gen


def timed_run(engine: Engine, batch: int, prompt_tokens: int, new_tokens: int, seed: int) -> tuple[float, float]:
    """One greedy generation of random prompts: (time to first token s, decode s for new_tokens - 1 steps)."""
    g = torch.Generator().manual_seed(seed)
    prompts = torch.randint(0, engine.model.config.vocab_size, (batch, prompt_tokens), generator=g).tolist()
    ttft, decode, _ = timed_generation(engine, [Request(p, new_tokens, SamplingConfig(temperature=0)) for p in prompts])
    return ttft, decode


def measure(s: BenchSettings, directory: str, batch: int) -> dict[str, Any]:
    """One record; runs in its own process."""
    if s.threads:
        torch.set_num_threads(s.threads)
    dev = pick_device(s.device)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    model = load_model(directory, dev)
    engine = Engine(model, compile=s.compile)
    timed_run(engine, batch, s.prompt_tokens, s.new_tokens, seed=0)  # warm-up (and compilation)
    runs = [timed_run(engine, batch, s.prompt_tokens, s.new_tokens, seed=1 + r) for r in range(s.repeats)]
    ttft = statistics.median(r[0] for r in runs)
    decode = statistics.median(r[1] for r in runs)
    if dev.type == "cuda":
        peak = torch.cuda.max_memory_allocated(dev) / 2**20
    else:
        peak = peak_rss_mb()
    meta = read_meta(directory)
    record: dict[str, Any] = {
        "model": str(directory), "batch": batch, "prompt_tokens": s.prompt_tokens, "new_tokens": s.new_tokens,
        "decode_tokens_per_s": round(batch * (s.new_tokens - 1) / decode, 2) if s.new_tokens > 1 else None,
        "prefill_tokens_per_s": round(batch * s.prompt_tokens / ttft, 2),
        "time_to_first_token_s": round(ttft, 5),
        "peak_memory_mb": round(peak, 1),
        "size_mb": round(size_on_disk_mb(Path(directory)), 3),
        "params": count_params(model),
        "device": str(dev), "threads": torch.get_num_threads(), "decode_step": engine.decode_step(batch),
        "machine": describe(),
    }
    if meta.get("quantization"):
        record["quantization"] = meta["quantization"]
    if kernels := kernels_used(model):
        record["kernels"] = kernels
    return record


def bench(s: BenchSettings) -> list[dict[str, Any]]:
    """One record per (model, batch size), in that order, each measured in a fresh process."""
    s.validate()
    batches = sorted(set(s.batches))
    for directory in s.models:
        config = load_config(directory)  # fail fast, before any worker starts
        if s.prompt_tokens + s.new_tokens > config.block_size:
            raise UserError(f"{directory}: prompt + new tokens ({s.prompt_tokens + s.new_tokens}) exceed the "
                            f"context of {config.block_size}")
    pick_device(s.device)
    records = []
    # A fresh process per record: its own peak memory, no state carried over from the previous model.
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=1, mp_context=ctx, max_tasks_per_child=1) as pool:
        for directory in s.models:
            for batch in batches:
                cli.log(f"bench: {directory} batch {batch}")
                records.append(pool.submit(measure, s, str(directory), batch).result())
    return records


def build_parser() -> cli.ArgumentParser:
    return cli.build_parser(BenchSettings, "bench", "Speed (prefill, decode, time to first token), peak memory, size "
                            "on disk and parameters of one or more checkpoints, side by side.")


def _table(records: list[dict[str, Any]]) -> str:
    cols = [("model", "model"), ("batch", "batch"), ("decode_tokens_per_s", "decode tok/s"),
            ("prefill_tokens_per_s", "prefill tok/s"), ("time_to_first_token_s", "TTFT s"),
            ("peak_memory_mb", "peak MB"), ("size_mb", "size MB"), ("params", "params")]
    rows = [[str(r.get(k)) for k, _ in cols] for r in records]
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, (_, h) in enumerate(cols)]
    lines = ["  ".join(h.ljust(w) for (_, h), w in zip(cols, widths))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    settings, output = cli.parse(build_parser(), argv)
    records = bench(settings)
    if output.json:
        cli.print_json(records)
    else:
        print(_table(records))
    sys.stdout.flush()
    return 0
