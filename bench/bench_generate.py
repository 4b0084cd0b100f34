"""leangpt's generation engine against transformers' generate() on the same weights, from the same checkpoint dir.

A GPT-2 of 6 layers × 384 wide with an 8192-token vocabulary (14M parameters, random weights unless --model
gives a checkpoint) is loaded twice from one directory: by leangpt (`load_model`) and by transformers
(`AutoModelForCausalLM.from_pretrained`). Both decode greedily from the same random 32-token prompts, 128 new
tokens, batch 1 and 8; the script asserts that the tokens are identical. Runs alternate between the two
(paired, so that load from other processes falls on both alike), one warm-up round, median of --repeats.

Beside the batch-1 figures: the memory-bandwidth bound, weight bytes read per token ÷ the copy bandwidth
measured in this run (STREAM convention: a copy moves 2 × its size).

With --variant (a quantized or pruned checkpoint of --model, repeatable), that variant decoded by leangpt beside
transformers on --model's float weights, the model a user of transformers would run instead (transformers
cannot load leangpt's integer layers): the same prompts and timing, the tokens not compared.

With --spec-target and --spec-draft (two checkpoints with one tokenizer), speculative decoding at batch 1
against the same engine without a draft, greedy (tokens asserted identical) and sampled: tokens/s, speed-up and
acceptance rate.

    flock /tmp/leangpt-bench.lock python bench/bench_generate.py --json-out bench/generate.json \
        [--spec-target CKPT --spec-draft SMALL_CKPT]
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import transformers
from safetensors.torch import save_file

from leangpt import hf
from leangpt.bench import timed_generation
from leangpt.checkpoint import load_model
from leangpt.config import ModelConfig
from leangpt.data.tokenizer import TextTokenizer
from leangpt.engine import Engine, Request
from leangpt.machine import describe, paired_medians
from leangpt.model import GPT
from leangpt.sampling import SamplingConfig
from leangpt.speculative import SpeculativeGeneration

GREEDY = SamplingConfig(temperature=0)


def write_random_checkpoint(directory: Path, seed: int = 0) -> None:
    torch.manual_seed(seed)
    config = ModelConfig(vocab_size=8192, block_size=256, n_layer=6, n_head=6, n_embd=384)
    model = GPT(config)
    (directory / "config.json").write_text(json.dumps(hf.config_to_hf(config)))
    save_file(hf.to_hf_state_dict(config, model.state_dict()), str(directory / "model.safetensors"),
              metadata={"format": "pt"})


def copy_bandwidth(mb: int = 256, repeats: int = 10) -> float:
    """Bytes/s of a large tensor copy (read + write counted), the same threads as the decode."""
    a = torch.ones(mb * 2**20 // 4)
    b = torch.empty_like(a)
    times = []
    for _ in range(repeats + 1):
        t0 = time.perf_counter()
        b.copy_(a)
        times.append(time.perf_counter() - t0)
    return 2 * a.numel() * 4 / statistics.median(times[1:])


def weight_bytes_per_token(model: GPT) -> int:
    """Every weight read once per decoded token: all parameters but the position table (one row is looked up);
    the tied token embedding counts once, as the output head reads all of it."""
    n = sum(p.numel() * p.element_size() for p in model.parameters())
    if model.pos_emb is not None:
        n -= model.pos_emb.weight.numel() * model.pos_emb.weight.element_size()
    return n


def leangpt_run(engine: Engine, prompts: torch.Tensor, new: int) -> tuple[torch.Tensor, float, float]:
    """leangpt's greedy generation, step by step as `leangpt generate` runs it: (tokens, total s, first token s)."""
    ttft, decode, gen = timed_generation(engine, [Request(p, new, GREEDY) for p in prompts.tolist()])
    return torch.tensor([c.tokens for c in gen.completions]), ttft + decode, ttft


def hf_compile_arguments() -> dict[str, Any]:
    """A static cache and an automatically compiled forward, which transformers enables by itself on GPUs only."""
    config = transformers.CompileConfig()
    config._compile_all_devices = True  # transformers' switch for compiling on other devices (CPU here)
    return {"cache_implementation": "static", "compile_config": config}


def hf_run(model, prompts: torch.Tensor, new: int, extra: dict[str, Any]) -> tuple[torch.Tensor, float]:
    """transformers' greedy generate(), with `extra` arguments (hf_compile_arguments() or none)."""
    t0 = time.perf_counter()
    out = model.generate(prompts, attention_mask=torch.ones_like(prompts), do_sample=False, max_new_tokens=new,
                         min_new_tokens=new, pad_token_id=0, **extra)
    return out[:, prompts.size(1):], time.perf_counter() - t0


def bench_batch(ours: Engine, ref, hf_extra: dict[str, Any], batch: int, prompt_len: int, new: int,
                repeats: int, same_weights: bool = True) -> dict[str, Any]:
    vocab = ours.model.config.vocab_size
    prompts = torch.randint(0, vocab, (batch, prompt_len), generator=torch.Generator().manual_seed(batch))
    last: dict[str, torch.Tensor] = {}

    def run_ours() -> dict[str, float]:
        last["tokens"], total, ttft = leangpt_run(ours, prompts, new)
        return {"total": total, "ttft": ttft}

    def run_theirs() -> dict[str, float]:
        ref_tokens, total = hf_run(ref, prompts, new, hf_extra)
        _, first = hf_run(ref, prompts, 1, hf_extra)  # transformers' time to first token, for its decode rate
        if same_weights and not torch.equal(last["tokens"], ref_tokens):
            rows = (last["tokens"] != ref_tokens).any(1).nonzero().flatten().tolist()
            raise AssertionError(f"batch {batch}: greedy tokens differ from transformers in rows {rows}")
        return {"total": total, "first": first}

    with torch.inference_mode():  # the warm-up round also compiles, when enabled
        t = paired_medians({"leangpt": run_ours, "transformers": run_theirs}, repeats)
    ours_t, hf_t = t["leangpt"], t["transformers"]
    ours_total, hf_total = ours_t["total"], hf_t["total"]
    return {
        "batch": batch, "prompt_tokens": prompt_len, "new_tokens": new, "identical_greedy_tokens": same_weights,
        "leangpt_tokens_per_s": batch * new / ours_total,
        "transformers_tokens_per_s": batch * new / hf_total,
        "ratio": hf_total / ours_total,
        "leangpt_decode_tokens_per_s": batch * (new - 1) / (ours_total - ours_t["ttft"]),
        "transformers_decode_tokens_per_s": batch * (new - 1) / max(hf_total - hf_t["first"], 1e-9),
        "leangpt_ttft_s": ours_t["ttft"], "transformers_ttft_s": hf_t["first"],
    }


def speculative_timing(engine: Engine, draft: Engine, prompt: list[int], sampling: SamplingConfig, k: int, new: int,
                       repeats: int) -> dict[str, float]:
    """Seconds per token of the target alone and with the draft, the same request (a new seed each round)."""
    seeds, last = itertools.count(), {}

    def run_plain() -> float:
        last["request"] = req = Request(prompt, new, sampling, seed=next(seeds))
        ttft, decode, gen = timed_generation(engine, [req])
        last["tokens"] = gen.completions[0].tokens
        return (ttft + decode) / len(last["tokens"])

    def run_speculative() -> dict[str, float]:
        t0 = time.perf_counter()
        spec = SpeculativeGeneration(engine, draft, last["request"], k)
        for _ in spec:
            pass
        seconds = time.perf_counter() - t0
        if sampling.greedy and spec.completion.tokens != last["tokens"]:
            raise AssertionError("speculative greedy tokens differ from the target alone")
        return {"seconds": seconds / len(spec.completion.tokens), "acceptance": spec.stats.acceptance_rate}

    with torch.inference_mode():
        t = paired_medians({"plain": run_plain, "speculative": run_speculative}, repeats)
    return {"plain": t["plain"], "speculative": t["speculative"]["seconds"], "acceptance": t["speculative"]["acceptance"]}


def bench_speculative(target_dir: Path, draft_dir: Path, k: int, new: int, repeats: int) -> list[dict[str, Any]]:
    engine, draft = Engine(load_model(target_dir)), Engine(load_model(draft_dir))
    prompt = TextTokenizer.load(target_dir).encode("First Citizen:\nBefore we proceed any further, hear me speak.\n")
    rows = []
    for name, sampling in (("greedy", GREEDY), ("temperature 0.8", SamplingConfig(temperature=0.8))):
        t = speculative_timing(engine, draft, prompt, sampling, k, new, repeats)
        rows.append({"sampling": name, "draft_tokens": k, "plain_tokens_per_s": 1 / t["plain"],
                     "speculative_tokens_per_s": 1 / t["speculative"], "speedup": t["plain"] / t["speculative"],
                     "acceptance_rate": t["acceptance"]})
    return rows


def print_rows(rows: list[dict[str, Any]]) -> None:
    print(f"{'variant':<24} {'batch':>5} {'leangpt tok/s':>14} {'transformers tok/s':>19} {'ratio':>6} "
          f"{'leangpt decode':>15} {'hf decode':>10} {'leangpt TTFT s':>15} {'hf TTFT s':>10}")
    for r in rows:
        print(f"{r['variant'][-24:]:<24} {r['batch']:>5} {r['leangpt_tokens_per_s']:>14.1f} "
              f"{r['transformers_tokens_per_s']:>19.1f} {r['ratio']:>5.2f}x {r['leangpt_decode_tokens_per_s']:>15.1f} "
              f"{r['transformers_decode_tokens_per_s']:>10.1f} {r['leangpt_ttft_s']:>15.4f} "
              f"{r['transformers_ttft_s']:>10.4f}")
    print("greedy tokens of the float model identical to transformers: yes (asserted); variants: not compared "
          "(transformers runs the float weights)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, help="float checkpoint dir that transformers loads too (default: a random "
                                              "GPT-2 of 6×384, vocab 8192)")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8], help="batch sizes")
    ap.add_argument("--prompt-tokens", type=int, default=32, help="prompt length")
    ap.add_argument("--new-tokens", type=int, default=128, help="tokens generated per row")
    ap.add_argument("--repeats", type=int, default=5, help="timed rounds after one warm-up")
    ap.add_argument("--compile", action="store_true", help="torch.compile leangpt's decode step")
    ap.add_argument("--hf-compile", action="store_true",
                    help="transformers with a static cache and its compiled forward too (default: plain generate())")
    ap.add_argument("--variant", type=Path, action="append", default=[],
                    help="a quantized or pruned checkpoint of --model, timed against transformers on --model")
    ap.add_argument("--threads", type=int, help="torch threads for both (default: torch's choice)")
    ap.add_argument("--spec-target", type=Path, help="target checkpoint for the speculative decoding figures")
    ap.add_argument("--spec-draft", type=Path, help="draft checkpoint (same tokenizer) for them")
    ap.add_argument("--draft-tokens", type=int, default=4, help="draft tokens per speculative round")
    ap.add_argument("--json-out", type=Path, help="write the results here")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        directory = args.model or Path(tmp)
        if args.model is None:
            write_random_checkpoint(directory)
        model = load_model(directory)
        ref = transformers.AutoModelForCausalLM.from_pretrained(directory).eval()
    engine = Engine(model, compile=args.compile)
    bandwidth = copy_bandwidth()
    wbytes = weight_bytes_per_token(model)
    hf_extra = hf_compile_arguments() if args.hf_compile else {}
    rows = [{"variant": "float", **bench_batch(engine, ref, hf_extra, b, args.prompt_tokens, args.new_tokens,
                                               args.repeats)} for b in args.batch]
    for variant in args.variant:
        variant_engine = Engine(load_model(variant), compile=args.compile)
        rows += [{"variant": str(variant), **bench_batch(variant_engine, ref, hf_extra, b, args.prompt_tokens,
                                                         args.new_tokens, args.repeats, same_weights=False)}
                 for b in args.batch]
    bandwidth = max(bandwidth, copy_bandwidth())  # measured before and after: the less disturbed figure
    result = {
        "machine": describe(), "torch": torch.__version__,
        "transformers": transformers.__version__, "threads": torch.get_num_threads(),
        "params": model.num_params(), "compile": args.compile and engine.compile_error is None,
        "transformers_compile": args.hf_compile,
        "compile_error": engine.compile_error,
        "weight_bytes_per_token": wbytes, "copy_bandwidth_gb_s": bandwidth / 1e9,
        "batch1_bandwidth_bound_tokens_per_s": bandwidth / wbytes, "rows": rows,
    }
    print(f"threads {result['threads']}, params {result['params']:,}, compile {result['compile']}, "
          f"transformers compiled {args.hf_compile}, "
          f"weights/token {wbytes / 2**20:.1f} MiB, copy bandwidth {bandwidth / 1e9:.1f} GB/s "
          f"-> batch-1 bound {bandwidth / wbytes:.0f} tokens/s")
    print_rows(rows)
    if args.spec_target and args.spec_draft:
        result["speculative"] = bench_speculative(args.spec_target, args.spec_draft, args.draft_tokens,
                                                  args.new_tokens, args.repeats)
        print(f"speculative decoding, batch 1, {args.spec_target} with draft {args.spec_draft}:")
        for r in result["speculative"]:
            print(f"  {r['sampling']:<16} plain {r['plain_tokens_per_s']:.1f} tok/s, speculative "
                  f"{r['speculative_tokens_per_s']:.1f} tok/s ({r['speedup']:.2f}x), acceptance "
                  f"{r['acceptance_rate']:.2f}")
    if args.json_out:
        args.json_out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
