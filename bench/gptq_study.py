"""GPTQ vs RTN int4 on the whole val split, one pass: per-token NLL and KL(fp32 || variant), paired standard errors.

    nice -n 19 python bench/gptq_study.py CKPT DATA "rtn,gptq,gptq:seed=1,gptq:act=1,gptq:n=512,gptq:damp=0.1" [MAX_TOKENS]

A variant is METHOD[:key=value...] with keys g (group size), n (windows), len, seed, damp, act (1: act-order)."""
import argparse
import copy
import math
import time

import torch
import torch.nn.functional as F

from leangpt.calibration import calibration_tokens
from leangpt.checkpoint import load_checkpoint
from leangpt.data.shards import Dataset
from leangpt.quant.formats import Scheme
from leangpt.quant.model import quantize_model


def quantized_variant(fp32, data: str, variant: str):
    """fp32 with its block linears replaced by the variant's dequantized int4 weights."""
    parts = dict(kv.split("=") for kv in variant.split(":")[1:])
    method = variant.split(":")[0]
    m = copy.deepcopy(fp32)
    calib = calibration_tokens(data, int(parts.get("n", 128)), int(parts.get("len", 256)), int(parts.get("seed", 0)),
                               "train") if method == "gptq" else None
    qws = quantize_model(m, Scheme(4, int(parts.get("g", 64))), method, calib, damp=float(parts.get("damp", 0.01)),
                         act_order=parts.get("act", "0") == "1")
    for name, qw in qws.items():
        m.get_submodule(name).weight.data.copy_(qw.dequantize())
    return m.eval()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("ckpt", help="float checkpoint directory")
    p.add_argument("data", help="its dataset directory (val scored, train calibrates)")
    p.add_argument("variants", help="comma-separated variants, METHOD[:key=value...]")
    p.add_argument("max_tokens", type=int, nargs="?", help="score at most this many val tokens")
    args = p.parse_args()
    variants = args.variants.split(",")
    fp32, _, _ = load_checkpoint(args.ckpt)
    T = fp32.config.block_size
    val = Dataset(args.data).tokens("val")
    n = (len(val) - 1) // T
    if args.max_tokens:
        n = min(n, args.max_tokens // T)
    X = torch.from_numpy(val[:n * T + 1].astype("int64"))
    inp, tgt = X[:-1].view(n, T), X[1:].view(n, T)
    models = {}
    for v in variants:
        t0 = time.time()
        models[v] = quantized_variant(fp32, args.data, v)
        print(f"quantized {v} in {time.time() - t0:.0f}s", flush=True)
    nll = {v: [] for v in ["fp32", *variants]}
    kl = {v: [] for v in variants}
    with torch.no_grad():
        for i in range(0, n, 16):
            r = F.log_softmax(fp32(inp[i:i + 16]).float(), -1)
            nll["fp32"].append(-r.gather(-1, tgt[i:i + 16, :, None])[..., 0])
            for v, m in models.items():
                lp = F.log_softmax(m(inp[i:i + 16]).float(), -1)
                nll[v].append(-lp.gather(-1, tgt[i:i + 16, :, None])[..., 0])
                kl[v].append((r.exp() * (r - lp)).sum(-1))
    nll = {k: torch.cat(v) for k, v in nll.items()}
    kl = {k: torch.cat(v) for k, v in kl.items()}
    base = nll["fp32"]
    print(f"val tokens {n * T}, fp32 ppl {base.mean().exp():.3f}")
    for v in variants:
        d = (nll[v] - base).mean(1)
        print(f"{v:28s} ppl {nll[v].mean().exp():.3f} ({nll[v].mean().exp() / base.mean().exp() - 1:+.3%})  "
              f"dNLL vs fp32 {float(d.mean()):+.5f} ± {float(d.std() / math.sqrt(n)):.5f}  KL {float(kl[v].mean()):.5f}")
    for v in variants[1:]:
        d = (nll[v] - nll[variants[0]]).mean(1)
        print(f"{v} - {variants[0]}: dNLL {float(d.mean()):+.5f} ± {float(d.std() / math.sqrt(n)):.5f} "
              f"(paired SE over {n} windows of {T})")


if __name__ == "__main__":
    main()
