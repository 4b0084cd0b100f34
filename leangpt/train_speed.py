"""Training speed options that must not change the result: the compute precision (measured, for "auto" on
CPUs), torch.compile with a fallback to eager, and activation checkpointing."""

from __future__ import annotations

import time
import warnings

import torch

from leangpt.device import autocast, resolve_precision
from leangpt.machine import cached, machine_key
from leangpt.model import GPT


def pick_precision(model: GPT, precision: str, batch_size: int, block_size: int, device: torch.device) -> torch.dtype:
    """precision; "auto" on a CPU whose bf16 matmuls are fast times a training micro-batch both ways.

    bf16 matmul kernels can be 2x faster than fp32 on AVX512-BF16 CPUs while a small model still trains 4x
    slower under bf16 autocast (casts and bf16 element-wise ops dominate), so the whole step is measured once
    per machine and model shape, and cached.
    """
    dtype = resolve_precision(device, precision)
    if precision != "auto" or device.type != "cpu" or dtype == torch.float32:
        return dtype
    c = model.config
    key = (machine_key(device, torch.bfloat16) + f"|train-step bf16/fp32|L{c.n_layer} C{c.n_embd} V{c.vocab_size} "
           f"I{c.intermediate_size} B{batch_size} T{block_size}")
    # bf16 also costs precision: take it only when it is clearly faster.
    return torch.bfloat16 if cached(key, lambda: _bf16_step_speedup(model, batch_size, block_size, device)) > 1.25 \
        else torch.float32


def _bf16_step_speedup(model: GPT, batch_size: int, block_size: int, device: torch.device) -> float:
    """fp32 over bf16-autocast time of a forward and backward, timed alternately so that load hits both alike;
    the fastest of each (a load spike or a first-call kernel build only ever adds time, and is cached for good)."""
    x = torch.zeros(batch_size, block_size, dtype=torch.long, device=device)
    times: dict[torch.dtype, list[float]] = {torch.float32: [], torch.bfloat16: []}
    with torch.random.fork_rng(devices=[]):
        for rep in range(8):
            for dt in times:
                t0 = time.perf_counter()
                with autocast(device, dt):
                    logits = model(x)
                logits.float().mean().backward()
                if rep:  # the first round warms up
                    times[dt].append(time.perf_counter() - t0)
    model.zero_grad(set_to_none=True)
    return min(times[torch.float32]) / min(times[torch.bfloat16])


def compile_model(model: GPT, per_block: bool, block_size: int, device: torch.device, dtype: torch.dtype) -> None:
    """Compile in place (parameter names unchanged); FSDP-sharded models compile block by block.

    A forward and backward on a dummy batch compile now, so a failure falls back to eager before training.
    """
    modules = list(model.blocks) if per_block else [model]
    for m in modules:
        m.compile()
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), autocast(device, dtype):
            x = torch.zeros(1, block_size, dtype=torch.long, device=device)
            model(x).float().mean().backward()
    except Exception as e:  # inductor raises many kinds (no compiler, unsupported op, ...)
        warnings.warn(f"torch.compile failed, training eagerly instead: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
        for m in modules:
            m._compiled_call_impl = None
    model.zero_grad(set_to_none=True)


def apply_activation_checkpointing(model: GPT) -> None:
    """Wrap each block so its activations are recomputed in the backward pass (state-dict keys stay the same)."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import apply_activation_checkpointing
    from leangpt.model import Block
    apply_activation_checkpointing(model, check_fn=lambda m: isinstance(m, Block))
