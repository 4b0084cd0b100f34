"""One-row (decode) time of every quantized linear kernel on a checkpoint's layer shapes, beside fp32 F.linear.

For each distinct (out, in) shape of the model's linear layers and head, a random weight quantized by RTN to
int8 and to int4 (--group-size): microseconds per call of each candidate kernel, timed as the automatic choice
times them (`leangpt.quant.kernels.benchmark_kernels`: module call, median of repeats), and of F.linear on the
fp32 weight. "—" marks a kernel that is not correct or cannot run here.

    flock /tmp/leangpt-bench.lock python bench/bench_kernels.py --model CKPT
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from leangpt.checkpoint import load_checkpoint
from leangpt.machine import describe
from leangpt.quant.formats import Scheme
from leangpt.quant.kernels import _time_call, benchmark_kernels


def layer_shapes(model: torch.nn.Module) -> list[tuple[int, int]]:
    return sorted({tuple(m.weight.shape) for m in model.modules() if isinstance(m, torch.nn.Linear)})


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, required=True, help="checkpoint whose layer shapes are timed")
    p.add_argument("--group-size", type=int, default=64, help="int4 group size")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json-out", type=Path, help="also write the results here")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model, _, _ = load_checkpoint(args.model)
    cpu = torch.device("cpu")
    rows = []
    for out_f, in_f in layer_shapes(model):
        w, x = torch.randn(out_f, in_f), torch.randn(1, in_f)
        fp32 = _time_call(lambda: F.linear(x, w), cpu, calls=200)
        for scheme in (Scheme(8), Scheme(4, args.group_size)):
            timings = benchmark_kernels(scheme, out_f, in_f, cpu)
            rows.append({"shape": [out_f, in_f], "scheme": scheme.name, "fp32_us": fp32 * 1e6,
                         "kernels_us": {k: None if v is None else v * 1e6 for k, v in timings.items()}})
    for r in rows:
        cells = "  ".join(f"{k} {'—' if v is None else f'{v:.1f}'}" for k, v in r["kernels_us"].items())
        print(f"{r['shape'][0]:>5}x{r['shape'][1]:<5} {r['scheme']:<9} fp32 {r['fp32_us']:.1f}  {cells}")
    if args.json_out:
        args.json_out.write_text(json.dumps({"command": " ".join(sys.argv), "machine": describe(), "rows": rows},
                                            indent=2))


if __name__ == "__main__":
    main()
