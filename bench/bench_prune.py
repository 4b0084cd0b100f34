"""Pruning on the small-cpu model trained on the embedded corpus: quality, speed, and sparse-vs-dense kernels.

Every variant is scored on the same val tokens (the first --eval-tokens of the val split) against the dense
model it came from (the peer), in this one process:

  unstructured 50 %   magnitude (per layer and global), Wanda, SparseGPT: perplexity, no recovery
  N:M 2:4             the same three scores
  structured          --heads / --neurons removed (`leangpt prune --method structured` as a user runs it),
                      perplexity before and after --recover-steps of LM-loss recovery, and decode speed
                      (leangpt's engine, eager and compiled, batch 1 and 8, greedy, 16-token prompts, 128 new
                      tokens, after the first token, median of paired repeats) against the dense model
  sparse kernels      one 50 %-sparse layer as torch CSR vs the dense matmul with zeros, decode (1 row) and
                      prefill (2048 rows) shapes, at several sparsities

    flock /tmp/leangpt-bench.lock python bench/bench_prune.py --model CKPT --data DATA --json-out bench/prune.json
"""

from __future__ import annotations

import argparse
import copy
import json
import time
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from leangpt.bench import timed_generation
from leangpt.calibration import calibration_tokens
from leangpt.checkpoint import load_checkpoint
from leangpt.data.shards import Dataset
from leangpt.engine import Engine, Request
from leangpt.evaluate import evaluate_tokens
from leangpt.machine import describe, paired_medians
from leangpt.model import GPT
from leangpt.prune import main as prune_main
from leangpt.prune import prune_model
from leangpt.sampling import SamplingConfig


def decoder(model: GPT, batch: int, compile: bool, prompt_len: int = 16, new_tokens: int = 128):
    """A function that decodes `batch` rows greedily with leangpt's engine, step by step as `leangpt generate`
    and `bench` do, compiled or not, and returns the seconds after the first token; and the tokens decoded in
    them."""
    engine = Engine(model, compile=compile)
    new_tokens = min(new_tokens, model.config.block_size - prompt_len)
    prompts = torch.randint(0, model.config.vocab_size, (batch, prompt_len), generator=torch.Generator().manual_seed(0))
    requests = [Request(p, new_tokens, SamplingConfig(temperature=0)) for p in prompts.tolist()]

    def run() -> float:
        return timed_generation(engine, requests)[1]

    run()  # compiles, when compiling, before the timed rounds
    return run, batch * (new_tokens - 1)


@torch.no_grad()
def sparse_kernels(weight: torch.Tensor, sparsities: list[float]) -> list[dict[str, Any]]:
    """Dense matmul with zeros vs torch CSR (to_sparse_csr) on one layer's shape, randomly pruned.
    (torch's 2:4 semi-structured format, to_sparse_semi_structured, runs on CUDA only.)"""
    rows = []
    gen = torch.Generator().manual_seed(0)
    warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
    for s in sparsities:
        w = weight.clone()
        w[torch.rand(w.shape, generator=gen) < s] = 0
        csr = w.to_sparse_csr()
        for name, n in (("decode", 1), ("prefill", 2048)):
            x = torch.randn(n, w.shape[1], generator=gen)
            xt = x.t().contiguous()
            torch.testing.assert_close(torch.sparse.mm(csr, xt).t(), F.linear(x, w), atol=1e-3, rtol=1e-3)
            t = paired_medians({"dense": lambda: F.linear(x, w), "csr": lambda: torch.sparse.mm(csr, xt)}, 50)
            dense, sparse = t["dense"], t["csr"]
            rows.append({"sparsity": s, "shape": name, "rows": n, "threads": torch.get_num_threads(), "dense_ms": dense * 1e3, "csr_ms": sparse * 1e3,
                         "csr_speedup": dense / sparse})
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, required=True, help="dense checkpoint (small-cpu trained on the embedded corpus)")
    p.add_argument("--data", type=Path, required=True, help="its dataset dir: calibration (train split) and eval (val)")
    p.add_argument("--eval-tokens", type=int, default=65536, help="val tokens scored for every variant")
    p.add_argument("--calib-samples", type=int, default=128, help="calibration windows of block_size tokens")
    p.add_argument("--heads", type=float, default=0.25, help="structured: fraction of heads removed")
    p.add_argument("--neurons", type=float, default=0.5, help="structured: fraction of MLP neurons removed")
    p.add_argument("--scope", default="layer", choices=["layer", "global"], help="structured scope")
    p.add_argument("--recover-steps", type=int, default=200, help="recovery steps for the structured model")
    p.add_argument("--recover-set", action="append", default=[], help="extra --set for the recovery run")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's choice for this machine)")
    p.add_argument("--decode-repeats", type=int, default=9, help="timed decode runs per model (median)")
    p.add_argument("--skip", action="append", default=[],
                   help="skip a section: unstructured, nm, structured, speed (needs the structured checkpoint in "
                        "--work from this or an earlier run), kernels")
    p.add_argument("--work", type=Path, default=Path("/tmp/leangpt-bench-prune"), help="where the structured checkpoint is kept")
    p.add_argument("--json-out", type=Path, default=Path("bench/prune.json"), help="where to write the results")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    dense, tokenizer, _ = load_checkpoint(args.model, "cpu")
    val = Dataset(args.data).tokens("val")
    block = dense.config.block_size
    calib = calibration_tokens(args.data, args.calib_samples, block, seed=0)

    def ppl(model: GPT) -> float:
        return evaluate_tokens(model, val, tokenizer.token_bytes, block, 8, args.eval_tokens)["perplexity"]

    results: dict[str, Any] = {"machine": describe(), "model": str(args.model), "eval_tokens": args.eval_tokens,
                               "calib_samples": args.calib_samples}
    if {"unstructured", "nm", "structured"} - set(args.skip):
        base = ppl(dense)
        results["dense"] = {"perplexity": base, "params": dense.num_params()}
        print(f"dense: perplexity {base:.3f}, {dense.num_params():,} parameters", flush=True)

    variants = []
    if "unstructured" not in args.skip:
        variants += [("magnitude", None, "layer"), ("magnitude", None, "global"), ("wanda", None, "layer"),
                     ("sparsegpt", None, "layer")]
    if "nm" not in args.skip:
        variants += [(m, (2, 4), "layer") for m in ("magnitude", "wanda", "sparsegpt")]
    rows = []
    for method, pattern, scope in variants:
        t0 = time.perf_counter()
        model, _, summary = prune_model(copy.deepcopy(dense), method, calib, 0.5, pattern, scope)
        seconds = time.perf_counter() - t0
        value = ppl(model)
        row = {"method": method, "pattern": f"{pattern[0]}:{pattern[1]}" if pattern else "unstructured",
               "scope": scope, "sparsity": summary["sparsity"], "perplexity": value, "vs_dense": value / base,
               "prune_s": seconds}
        rows.append(row)
        print(f"{method:>9} {row['pattern']:>12} {scope:>6}: sparsity {row['sparsity']:.3f}, perplexity {value:.3f} "
              f"({row['vs_dense']:.3f}x dense), pruned in {seconds:.1f}s", flush=True)
    if variants:
        results["unstructured"] = rows

    structured_dir = args.work / "structured"
    if "structured" not in args.skip:
        model, _, summary = prune_model(copy.deepcopy(dense), "structured", calib, heads=args.heads,
                                        neurons=args.neurons, scope=args.scope)
        before = ppl(model)
        argv = ["--model", str(args.model), "--method", "structured", "--heads", str(args.heads),
                "--neurons", str(args.neurons), "--scope", args.scope, "--calib-data", str(args.data),
                "--calib-samples", str(args.calib_samples), "--recover-steps", str(args.recover_steps),
                "--device", "cpu", "--overwrite", "--out", str(structured_dir)]
        for s in args.recover_set:
            argv += ["--set", s]
        t0 = time.perf_counter()
        prune_main(argv)
        recover_s = time.perf_counter() - t0
        recovered, _, _ = load_checkpoint(structured_dir, "cpu")
        after = ppl(recovered)
        results["structured"] = {
            "heads_removed": args.heads, "neurons_removed": args.neurons, "scope": args.scope, **summary,
            "params": recovered.num_params(), "params_ratio": recovered.num_params() / dense.num_params(),
            "perplexity_no_recovery": before, "perplexity_recovered": after, "vs_dense": after / base,
            "recover_steps": args.recover_steps, "recover_set": args.recover_set, "prune_and_recover_s": recover_s}
        print(f"structured (-{args.heads:.0%} heads, -{args.neurons:.0%} neurons, {args.scope}): heads {summary['heads']}, "
              f"neurons {summary['neurons']}, {recovered.num_params():,} parameters; perplexity {before:.3f} before, "
              f"{after:.3f} after {args.recover_steps} recovery steps ({after / base:.3f}x dense)", flush=True)

    if "speed" not in args.skip:
        small, _, _ = load_checkpoint(structured_dir, "cpu")  # made by the structured section (this or an earlier run)
        results["speed"] = []
        for compile in (False, True):
            for batch in (1, 8):
                (run_dense, n), (run_small, _) = decoder(dense, batch, compile), decoder(small, batch, compile)
                t = paired_medians({"dense": run_dense, "structured": run_small}, args.decode_repeats)
                dense_s, small_s = t["dense"], t["structured"]
                results["speed"].append({
                    "threads": torch.get_num_threads(), "compile": compile, "batch": batch, "decode_tokens": n,
                    "dense_tokens_per_s": n / dense_s, "structured_tokens_per_s": n / small_s,
                    "speedup": dense_s / small_s, "params_ratio": small.num_params() / dense.num_params()})
                print(f"batch-{batch} decode, {'compiled' if compile else 'eager'}, {torch.get_num_threads()} "
                      f"threads: structured {n / small_s:.1f} vs dense {n / dense_s:.1f} tokens/s "
                      f"({dense_s / small_s:.2f}x)", flush=True)

    if "kernels" not in args.skip:
        weight = dense.blocks[0].mlp.fc.weight.detach()  # (intermediate, n_embd)
        results["kernels"] = sparse_kernels(weight, [0.5, 0.75, 0.9])
        for r in results["kernels"]:
            print(f"kernel {tuple(weight.shape)} sparsity {r['sparsity']:.2f} {r['shape']:>7}: dense {r['dense_ms']:.3f} ms, "
                  f"CSR {r['csr_ms']:.3f} ms ({r['csr_speedup']:.2f}x)", flush=True)

    # Sections run separately (quality without the timing lock, speed under it) land in one file.
    args.json_out.parent.mkdir(parents=True, exist_ok=True)
    old = json.loads(args.json_out.read_text()) if args.json_out.is_file() else {}
    args.json_out.write_text(json.dumps({**old, **results}, indent=2))
    print(f"wrote {args.json_out}")


if __name__ == "__main__":
    main()
