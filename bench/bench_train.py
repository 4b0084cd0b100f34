"""Training throughput and MFU: leangpt's training step against transformers' GPT2LMHeadModel, same config, same run.

    flock /tmp/leangpt-bench.lock python bench/bench_train.py [--compile] [--steps N] [--json out.json]

Each variant: random token batches, AdamW, fp32, forward + backward + optimizer step. leangpt's step is the one
`leangpt train` runs (fused AdamW, its loss); transformers' is `model(input_ids, labels=...)` with torch's default
AdamW. Median step time after warm-up. MFU against the cached per-machine matmul peak (leangpt.perf).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from leangpt.config import ModelConfig
from leangpt.data.batches import micro_batches
from leangpt.distributed import World
from leangpt.machine import describe
from leangpt.model import GPT
from leangpt.perf import matmul_peak_flops, train_flops_per_token
from leangpt.train import TrainConfig, accumulate_gradients, configure_optimizer, lm_loss

SHAPES = {
    "gpt2-6L-384": dict(n_layer=6, n_head=6, n_embd=384, vocab_size=8192, block_size=256, batch=16),
    "nanogpt-shakespeare-cpu": dict(n_layer=4, n_head=4, n_embd=128, vocab_size=8192, block_size=64, batch=12),
}


def leangpt_step(shape: dict, compile_: bool):
    mc = ModelConfig(vocab_size=shape["vocab_size"], block_size=shape["block_size"], n_layer=shape["n_layer"],
                     n_head=shape["n_head"], n_embd=shape["n_embd"])
    model = GPT(mc).train()
    if compile_:
        model.compile()
    params = dict(model.named_parameters())
    (opt,) = configure_optimizer(params, TrainConfig(optimizer="adamw"), torch.device("cpu"))
    b, t = shape["batch"], shape["block_size"]
    cpu = torch.device("cpu")

    def step(x, y):
        accumulate_gradients(model, lm_loss, micro_batches(x, y, b, 0, 1), b * t, World(), cpu, torch.float32)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step, train_flops_per_token(model, t)


def hf_step(shape: dict, compile_: bool):
    from transformers import GPT2Config, GPT2LMHeadModel
    cfg = GPT2Config(vocab_size=shape["vocab_size"], n_positions=shape["block_size"], n_layer=shape["n_layer"],
                     n_head=shape["n_head"], n_embd=shape["n_embd"], resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                     bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel(cfg).train()
    if compile_:
        model.compile()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)

    def step(x, y):
        # transformers shifts labels itself: pass the window of T + 1 tokens' inputs as labels.
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def measure(step, shape: dict, steps: int, warmup: int) -> float:
    g = torch.Generator().manual_seed(0)
    b, t, v = shape["batch"], shape["block_size"], shape["vocab_size"]
    times = []
    for i in range(warmup + steps):
        x = torch.randint(0, v, (b, t), generator=g)
        y = torch.randint(0, v, (b, t), generator=g)
        t0 = time.perf_counter()
        step(x, y)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return b * t / statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=8, help="timed steps per variant")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation happens here)")
    p.add_argument("--compile", action="store_true", help="also time torch.compile for both")
    p.add_argument("--shapes", default=",".join(SHAPES), help="comma-separated shape names")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args()
    peak = matmul_peak_flops(torch.device("cpu"), torch.float32)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, fp32 matmul peak {peak / 1e9:.1f} GFLOP/s (cached)")
    rows = []
    for name in args.shapes.split(","):
        shape = SHAPES[name]
        for compile_ in ([False, True] if args.compile else [False]):
            torch.manual_seed(0)
            lstep, fpt = leangpt_step(shape, compile_)
            # Interleave the two so that load changes on a shared machine hit both alike.
            hstep = hf_step(shape, compile_)
            lt = measure(lstep, shape, args.steps, args.warmup)
            ht = measure(hstep, shape, args.steps, args.warmup)
            lt = max(lt, measure(lstep, shape, args.steps, 1))
            ht = max(ht, measure(hstep, shape, args.steps, 1))
            mode = "compiled" if compile_ else "eager"
            for who, tps in (("leangpt", lt), ("transformers", ht)):
                rows.append({"shape": name, "mode": mode, "impl": who, "tokens_per_s": tps, "mfu": tps * fpt / peak})
            print(f"{name:<24} {mode:<8} leangpt {lt:9,.0f} tok/s ({lt * fpt / peak:5.1%} MFU)   "
                  f"transformers {ht:9,.0f} tok/s ({ht * fpt / peak:5.1%})   ratio {lt / ht:.2f}x", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"peak_flops": peak, "machine": describe(), "torch": torch.__version__, "threads": torch.get_num_threads(), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
