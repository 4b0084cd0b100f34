"""leangpt's C++ decode step alone: milliseconds per step of 1 to 16 rows for several checkpoints side by side.

Each checkpoint loads as leangpt loads it (quantized layers on their C++ kernels) and gets a NativeDecoder over a
KV cache of 16 rows; a step of M rows decodes one token per row at positions 40, 43, ... (each row its own).
Every round times each candidate in turn (leangpt.machine.paired_medians: shuffled order, medians), so load
from other processes falls on all alike. With --avx2, on a CPU whose build has VNNI, every checkpoint with int8
activations is timed a second time with its integer products on AVX2's instructions instead ("<name> avx2").

    flock /tmp/leangpt-bench.lock python bench/bench_step.py int8=runs/pipeline/int8 a8=/tmp/int8a8 --avx2
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Callable

import torch

from leangpt.checkpoint import load_model
from leangpt.machine import describe, paired_medians
from leangpt.native_decode import NativeDecoder, unsupported
from leangpt.quant import native
from leangpt.quant.kernels import QuantLinear

ROWS = (1, 2, 4, 8, 16)


def step_timer(decoder: NativeDecoder, rows: int, steps: int, vnni: bool) -> Callable[[], float]:
    tokens = torch.arange(rows)[:, None] + 5
    positions = torch.arange(rows)[:, None] * 3 + 40

    def run() -> float:
        native.set_vnni(vnni)
        with torch.inference_mode():
            decoder.step(tokens, positions)  # once untimed: this candidate's weights back in the caches
            t0 = time.perf_counter()
            for _ in range(steps):
                decoder.step(tokens, positions)
            return (time.perf_counter() - t0) / steps
    return run


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("models", nargs="+", help="NAME=CHECKPOINT, one per candidate")
    p.add_argument("--repeats", type=int, default=15, help="timed rounds")
    p.add_argument("--steps", type=int, default=20, help="steps per timing")
    p.add_argument("--avx2", action="store_true", help="also time int8-activation products on AVX2 (VNNI CPUs)")
    p.add_argument("--json-out", type=Path, help="also write the results here")
    args = p.parse_args()
    decoders: dict[str, tuple[NativeDecoder, bool]] = {}
    for spec in args.models:
        name, _, path = spec.partition("=")
        model = load_model(Path(path)).eval()
        if why := unsupported(model):
            print(f"{name}: no C++ step here: {why}", file=sys.stderr)
            return 1
        model.setup_cache(max(ROWS), 256)
        decoders[name] = (NativeDecoder(model), True)
        a8 = any(isinstance(m, QuantLinear) and m.scheme.activations == "int8" for m in model.modules())
        if args.avx2 and a8 and native.set_vnni(True):
            decoders[f"{name} avx2"] = (NativeDecoder(model), False)  # its own buffers, as every candidate
    results: dict[str, dict[str, float]] = {}
    for rows in ROWS:
        timers = {name: step_timer(d, rows, args.steps, vnni) for name, (d, vnni) in decoders.items()}
        medians = paired_medians(timers, args.repeats)
        results[str(rows)] = {name: round(seconds * 1e3, 4) for name, seconds in medians.items()}
        print(f"rows {rows:>2}: " + ", ".join(f"{n} {ms:.3f} ms" for n, ms in results[str(rows)].items()))
    native.set_vnni(True)
    if args.json_out:
        args.json_out.write_text(json.dumps({"machine": describe(), "ms_per_step": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
