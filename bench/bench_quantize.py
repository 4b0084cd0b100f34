"""Quantized checkpoints vs fp32 and vs PyTorch's own dynamic int8 quantization, on one model and data.

Variants (all from the same float checkpoint, scored on the same val tokens):

  fp32            the float model
  int8            leangpt RTN int8 per channel, blocks' linears (head and embedding in fp32)
  int8+head       the same with the output head quantized too
  ao-int8         torch.ao.quantization.quantize_dynamic(qint8) on the same linears as int8 (the peer)
  ao-int8+head    quantize_dynamic on every nn.Linear, head included
  int4-g64        leangpt RTN int4, groups of 64
  int4-g64@fbgemm-groups  the same checkpoint forced onto the previous int4 route (one FBGEMM call per group)
  gptq-int4-g64   leangpt GPTQ int4, groups of 64, calibrated on the train split

For each: perplexity, bits per byte, KL(fp32 || variant) and top-1 agreement, decode tokens/s at batch 1
(one token per forward with the KV cache, after a prefill; every model in the decode weight layout that
leangpt's generation engine uses on CPUs; variants timed round-robin, median of rounds),
size on disk, bits per weight with scales, and the kernels the quantized layers run on.

    flock /tmp/leangpt-bench.lock python bench/bench_quantize.py --model CKPT --data DATA --json-out bench/quantize.json
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from leangpt.checkpoint import load_checkpoint, load_model, read_meta
from leangpt.data.shards import Dataset
from leangpt.cpu_linear import use_decode_linears
from leangpt.evaluate import evaluate_tokens
from leangpt.machine import describe, paired_medians
from leangpt.quant.model import kernels_used, target_layers
from leangpt.quantize import main as quantize_main

OURS = {
    "int8": ["--method", "int8", "--no-quantize-head"],
    "int8+head": ["--method", "int8"],
    "int4-g64": ["--method", "int4", "--group-size", "64", "--no-quantize-head"],
    "gptq-int4-g64": ["--method", "gptq-int4", "--group-size", "64", "--no-quantize-head"],
}


@torch.no_grad()
def decode_seconds(model: nn.Module, prompt_len: int, new_tokens: int) -> float:
    """Seconds per decoded token at batch 1 (greedy), prefill excluded."""
    device = next(model.parameters()).device
    model.setup_cache(1, prompt_len + new_tokens)
    x = torch.arange(1, prompt_len + 1, device=device)[None]
    logits = model(x, torch.arange(prompt_len, device=device))[:, -1]
    t0 = time.perf_counter()
    for pos in range(prompt_len, prompt_len + new_tokens):
        nxt = logits.argmax(-1)
        logits = model(nxt.view(1, 1), torch.tensor([pos], device=device))[:, -1]
    return (time.perf_counter() - t0) / new_tokens


@torch.no_grad()
def window_nll(model: nn.Module, tokens, block_size: int, max_tokens: int | None) -> torch.Tensor:
    """Mean next-token NLL of each consecutive window of block_size targets: (windows,), for paired errors."""
    n = (len(tokens) - 1) // block_size
    if max_tokens:
        n = min(n, max_tokens // block_size)
    ids = torch.from_numpy(tokens[:n * block_size + 1].astype("int64"))
    x, y = ids[:-1].view(n, block_size), ids[1:].view(n, block_size)
    out = []
    for i in range(0, n, 8):
        logits = model(x[i:i + 8]).float()
        out.append(F.cross_entropy(logits.transpose(1, 2), y[i:i + 8], reduction="none").mean(1))
    return torch.cat(out)


def ao_dynamic(model_dir: Path, with_head: bool) -> nn.Module:
    model = load_model(model_dir)
    names = set(target_layers(model, with_head))
    return torch.ao.quantization.quantize_dynamic(model, names, dtype=torch.qint8)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, required=True, help="float checkpoint (small-cpu trained on the corpus)")
    p.add_argument("--data", type=Path, required=True, help="its dataset dir (val split scored, train calibrates)")
    p.add_argument("--work", type=Path, default=Path("/tmp/leangpt-bench-quantize"), help="quantized checkpoints go here")
    p.add_argument("--eval-tokens", type=int, default=32768, help="val tokens scored per variant")
    p.add_argument("--paired-tokens", type=int, default=0,
                   help="val tokens for the paired GPTQ-vs-RTN NLL comparison (0: the whole split)")
    p.add_argument("--calib-samples", type=int, default=64, help="GPTQ calibration windows of 256 tokens")
    p.add_argument("--prompt-len", type=int, default=16, help="prefill tokens before timing decode")
    p.add_argument("--new-tokens", type=int, default=64, help="decoded tokens per timing round")
    p.add_argument("--rounds", type=int, default=5, help="timing rounds (round-robin over variants)")
    p.add_argument("--json-out", type=Path, help="write the results here")
    args = p.parse_args()

    torch.manual_seed(0)
    fp32, tokenizer, _ = load_checkpoint(args.model)
    dirs: dict[str, Path | None] = {"fp32": args.model}
    quant_seconds: dict[str, float] = {}
    for name, argv in OURS.items():
        out = args.work / name
        if name.startswith("gptq"):
            argv = [*argv, "--calib-data", str(args.data), "--calib-samples", str(args.calib_samples)]
        t0 = time.perf_counter()
        quantize_main(["--model", str(args.model), "--out", str(out), "--overwrite", *argv])
        quant_seconds[name] = time.perf_counter() - t0
        dirs[name] = out
    models: dict[str, nn.Module] = {"fp32": fp32}
    for name in OURS:
        models[name] = load_model(dirs[name])  # kernels chosen here (measured once, cached)
    os.environ["LEANGPT_QUANT_KERNEL"] = "fbgemm-groups"
    models["int4-g64@fbgemm-groups"] = load_model(dirs["int4-g64"])
    del os.environ["LEANGPT_QUANT_KERNEL"]
    dirs["int4-g64@fbgemm-groups"] = dirs["int4-g64"]
    models["ao-int8"] = ao_dynamic(args.model, with_head=False)
    models["ao-int8+head"] = ao_dynamic(args.model, with_head=True)
    order = ["fp32", "int8", "ao-int8", "int8+head", "ao-int8+head", "int4-g64", "int4-g64@fbgemm-groups",
             "gptq-int4-g64"]

    tokens = Dataset(args.data).tokens("val")
    rows: dict[str, dict[str, Any]] = {}
    fp32_size = (args.model / "model.safetensors").stat().st_size
    for name in order:
        model = models[name]
        q = evaluate_tokens(model, tokens, tokenizer.token_bytes, fp32.config.block_size, batch_size=8,
                            max_tokens=args.eval_tokens, reference=None if name == "fp32" else fp32)
        d = dirs.get(name)
        size = (d / "model.safetensors").stat().st_size if d else None
        meta = read_meta(d).get("quantization", {}) if d else {}
        # torch.ao's weights: per-tensor int8 with one fp32 scale per layer, so 8.0 to two decimals
        bpw = meta.get("bits_per_weight", 32.0 if name == "fp32" else 8.0)
        rows[name] = {"perplexity": q["perplexity"], "bits_per_byte": q["bits_per_byte"], "kl": q.get("kl", 0.0),
                      "top1_agreement": q.get("top1_agreement", 1.0), "size_bytes": size,
                      "size_vs_fp32": size / fp32_size if size else None, "bits_per_weight": bpw,
                      "kernels": kernels_used(model) if not name.startswith("ao-") else {"fbgemm (torch.ao)": len(
                          [m for m in model.modules() if isinstance(m, torch.ao.nn.quantized.dynamic.Linear)])},
                      "quantize_seconds": quant_seconds.get(name)}
        print(f"{name}: ppl {q['perplexity']:.3f}", flush=True)
    # GPTQ vs RTN at int4 g64 differ by less than the noise of a short eval: paired per-window differences of
    # NLL over (by default) the whole val split, with their standard error.
    nll = {n: window_nll(models[n], tokens, fp32.config.block_size, args.paired_tokens)
           for n in ("fp32", "int4-g64", "gptq-int4-g64")}
    paired = {}
    for a, b in (("int4-g64", "fp32"), ("gptq-int4-g64", "fp32"), ("gptq-int4-g64", "int4-g64")):
        d = nll[a] - nll[b]
        paired[f"{a} - {b}"] = {"dnll": float(d.mean()), "se": float(d.std() / len(d) ** 0.5),
                                "tokens": len(d) * fp32.config.block_size}
    load_before = os.getloadavg()
    for name in order:
        use_decode_linears(models[name])  # as leangpt's Engine does on CPUs (fp32 linears: MKL, best layout)
        decode_seconds(models[name], args.prompt_len, 8)  # warm-up (and compiles of one-row kernels)
    seconds = paired_medians({name: lambda m=models[name]: decode_seconds(m, args.prompt_len, args.new_tokens)
                              for name in order}, args.rounds, warmup=0)
    base_ppl, base_tps = rows["fp32"]["perplexity"], 1 / seconds["fp32"]
    for name in order:
        tps = 1 / seconds[name]
        rows[name].update(decode_tokens_per_s=tps, decode_vs_fp32=tps / base_tps,
                          perplexity_change=rows[name]["perplexity"] / base_ppl - 1)
    for a, b in (("int8", "ao-int8"), ("int8+head", "ao-int8+head")):
        rows[a]["decode_vs_torch_ao"] = rows[a]["decode_tokens_per_s"] / rows[b]["decode_tokens_per_s"]

    load_after = os.getloadavg()
    print(f"\n{'variant':<24}{'ppl':>9}{'Δppl':>8}{'bpb':>8}{'KL':>9}{'top1':>7}{'tok/s':>8}{'×fp32':>7}"
          f"{'MB':>7}{'×size':>7}{'bits/w':>8}  kernels")
    for name in order:
        r = rows[name]
        size = f"{r['size_bytes'] / 1e6:7.2f}{r['size_vs_fp32']:7.3f}" if r["size_bytes"] else f"{'-':>7}{'-':>7}"
        print(f"{name:<24}{r['perplexity']:9.3f}{r['perplexity_change']:+8.2%}{r['bits_per_byte']:8.4f}"
              f"{r['kl']:9.5f}{r['top1_agreement']:7.1%}{r['decode_tokens_per_s']:8.0f}{r['decode_vs_fp32']:7.2f}"
              f"{size}{r['bits_per_weight']:8.2f}  {r['kernels']}")
    for a in ("int8", "int8+head"):
        print(f"{a} decode vs torch.ao quantize_dynamic on the same layers: {rows[a]['decode_vs_torch_ao']:.2f}x")
    for k, v in paired.items():
        print(f"NLL {k}: {v['dnll']:+.5f} ± {v['se']:.5f} nats/token (paired over {v['tokens']} val tokens)")
    print(f"load average (1, 5, 15 min): before timing {load_before}, after {load_after}")
    result = {"machine": describe(), "model": str(args.model), "eval_tokens": args.eval_tokens, "rounds": args.rounds,
              "new_tokens": args.new_tokens, "paired_nll": paired, "load_average_before": load_before, "load_average_after": load_after,
              "variants": rows}
    if args.json_out:
        args.json_out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
