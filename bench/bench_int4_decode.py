"""Decode tokens/s at batch 1: fp32 vs int4 RTN g64 on the `inductor` kernel vs the previous `fbgemm-groups` route.

One float checkpoint, quantized in memory; every model in the engine's CPU decode layout; 16-token prompt, 64 new
tokens per round, rounds interleaved over the models, median of rounds.

    flock /tmp/leangpt-bench.lock python bench/bench_int4_decode.py CKPT [ROUNDS]
"""

import copy
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from bench_quantize import decode_seconds  # noqa: E402

from leangpt.checkpoint import load_model  # noqa: E402
from leangpt.cpu_linear import use_decode_linears  # noqa: E402
from leangpt.quant.formats import Scheme  # noqa: E402
from leangpt.quant.model import quantize_model, swap_linears  # noqa: E402

base = load_model(sys.argv[1])
rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 21
models = {"fp32": base}
qws = quantize_model(copy.deepcopy(base), Scheme(4, 64), "rtn")
for kernel in ["inductor", "fbgemm-groups"]:
    m = copy.deepcopy(base)
    swap_linears(m, qws, torch.device("cpu"), kernel)
    models[kernel] = m.eval()
for m in models.values():
    use_decode_linears(m)
    decode_seconds(m, 16, 8)  # warm-up, compiles
times = {k: [] for k in models}
for _ in range(rounds):
    for k, m in models.items():
        times[k].append(decode_seconds(m, 16, 64))
fp32 = statistics.median(times["fp32"])
print("load average", os.getloadavg())
for k, v in times.items():
    print(f"{k:14s} {1 / statistics.median(v):6.0f} tokens/s  {fp32 / statistics.median(v):.2f}x fp32")
