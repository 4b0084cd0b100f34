"""Decode tokens/s at batch 1: fp32 vs int4 RTN g64 on the `inductor` kernel vs the previous `fbgemm-groups` route.

One float checkpoint, quantized in memory; every model in the engine's CPU decode layout; 16-token prompt, 64 new
tokens per round, rounds interleaved over the models, median of rounds.

    flock /tmp/leangpt-bench.lock python bench/bench_int4_decode.py CKPT [ROUNDS]
"""

import argparse
import copy
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(__file__))
from bench_quantize import decode_seconds  # noqa: E402

from leangpt.checkpoint import load_model  # noqa: E402
from leangpt.cpu_linear import use_decode_linears  # noqa: E402
from leangpt.machine import paired_medians  # noqa: E402
from leangpt.quant.formats import Scheme  # noqa: E402
from leangpt.quant.model import quantize_model, swap_linears  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", type=Path, help="float checkpoint directory")
    p.add_argument("rounds", type=int, nargs="?", default=21, help="timing rounds (interleaved over the models)")
    args = p.parse_args()
    base = load_model(args.model)
    models = {"fp32": base}
    qws = quantize_model(copy.deepcopy(base), Scheme(4, 64), "rtn")
    for kernel in ["inductor", "fbgemm-groups"]:
        m = copy.deepcopy(base)
        swap_linears(m, qws, torch.device("cpu"), kernel)
        models[kernel] = m.eval()
    for m in models.values():
        use_decode_linears(m)
        decode_seconds(m, 16, 8)  # warm-up, compiles
    seconds = paired_medians({k: lambda m=m: decode_seconds(m, 16, 64) for k, m in models.items()}, args.rounds,
                             warmup=0)
    print("load average", os.getloadavg())
    for k, v in seconds.items():
        print(f"{k:14s} {1 / v:6.0f} tokens/s  {seconds['fp32'] / v:.2f}x fp32")


if __name__ == "__main__":
    main()
