"""`leangpt export`'s peers: the same weights in llama.cpp (GGUF) and onnxruntime (ONNX) beside leangpt's engine.

For one checkpoint, in this one process:

  speed     prefill and decode tokens/s at each --batch, greedy, --prompt-tokens random ids, --new-tokens with
            no early stop, timed as `leangpt bench` times leangpt (time to the first token, then the rest): leangpt's
            default path (up to 64 rows: leangpt's C++ step; more: compiled) on the float model ("leangpt f32";
            --python-step adds its compiled Python step) and on each --quantized checkpoint beside llama.cpp on
            that checkpoint's own GGUF export (the same integers), llama.cpp on the GGUF exports (f32, q8_0, q4_0;
            --threads threads; batch > 1 as parallel sequences through llama.cpp's batch API), onnxruntime on the
            ONNX exports (f32, int8). Every round runs each runtime in turn (leangpt.machine.paired_medians), so
            load from other processes falls on all alike; medians of --repeats rounds after one warm-up.
  quality   with --data: bits per byte on the first --quality-tokens val tokens, computed from each runtime's own
            logits over the windows `leangpt eval` uses, beside leangpt's (and the relative difference).

    flock /tmp/leangpt-bench.lock python bench/bench_export.py --model CKPT --data DATA --json-out bench/export.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from leangpt.bench import timed_run
from leangpt.checkpoint import load_checkpoint, load_model
from leangpt.data.shards import Dataset
from leangpt.engine import Engine
from leangpt.evaluate import evaluate_tokens
from leangpt.export import ExportSettings, export
from leangpt.export.runtimes import LlamaCppModel, OnnxModel, greedy, llama_cpp_extra_buffers, llama_cpp_version
from leangpt.machine import describe, paired_medians

GGUF_TYPES = ("f32", "q8_0", "q4_0")
ONNX_TYPES = ("f32", "int8")


class RuntimeAsModel(torch.nn.Module):
    """A runner scored by leangpt.evaluate like a checkpoint: forward(idx) -> logits from an empty cache."""

    def __init__(self, runner: LlamaCppModel | OnnxModel) -> None:
        super().__init__()
        self.runner = runner
        self.anchor = torch.nn.Parameter(torch.zeros(0))  # evaluate_tokens reads the device from a parameter

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        self.runner.reset()
        return torch.from_numpy(self.runner.forward(idx.tolist(), 0, all_logits=True))


def exports(model: Path, quantized: list[Path], work: Path) -> dict[str, Path]:
    files = {}
    for ckpt in quantized:  # its own integers in llama.cpp's format (q8_0 / q4_1): the same weights
        files[f"gguf-{ckpt.name}"] = work / f"{ckpt.name}.gguf"
        export(ExportSettings(model=ckpt, format="gguf", out=files[f"gguf-{ckpt.name}"], progress=False))
    for t in GGUF_TYPES:
        files[f"gguf-{t}"] = work / f"model-{t}.gguf"
        export(ExportSettings(model=model, format="gguf", out=files[f"gguf-{t}"], type=t, progress=False))
    for t in ONNX_TYPES:
        files[f"onnx-{t}"] = work / f"onnx-{t}"
        export(ExportSettings(model=model, format="onnx", out=files[f"onnx-{t}"], type=t, progress=False))
    return files


def runner(key: str, path: Path, context: int, threads: int, batch: int) -> LlamaCppModel | OnnxModel:
    return LlamaCppModel(path, context, threads, n_seq=batch) if key.startswith("gguf") else OnnxModel(path, threads)


def speed_candidates(args: argparse.Namespace, files: dict[str, Path], batch: int) -> dict[str, Callable[[], dict]]:
    """One function per runtime that runs a greedy generation and returns its {ttft, decode} seconds."""
    model, _, _ = load_checkpoint(args.model)
    vocab, context = model.config.vocab_size, args.prompt_tokens + args.new_tokens
    prompts = np.random.default_rng(0).integers(0, vocab, (batch, args.prompt_tokens)).tolist()
    # leangpt's default path, as generate / serve / bench run it
    engines = {"leangpt f32": Engine(model, compile=True)}
    if args.python_step:
        engines["leangpt f32 python-step"] = Engine(model, compile=True, native=False)
    engines.update({f"leangpt {ckpt.name}": Engine(load_model(ckpt), compile=True) for ckpt in args.quantized})
    candidates: dict[str, Callable[[], dict]] = {}
    for name, engine in engines.items():
        timed_run(engine, batch, args.prompt_tokens, args.new_tokens, seed=0)  # compiles before timing
        candidates[name] = lambda e=engine: dict(zip(("ttft", "decode"), timed_run(
            e, batch, args.prompt_tokens, args.new_tokens, seed=1)))
    for key, path in files.items():
        r = runner(key, path, context, args.threads, batch)
        candidates[key] = lambda r=r: dict(zip(("ttft", "decode"), greedy(r, prompts, args.new_tokens)[1:]))
        if key.startswith("onnx"):
            candidates[key] = settled(candidates[key])
    return candidates


def settled(run: Callable[[], dict]) -> Callable[[], dict]:
    """run, then a pause: onnxruntime's threads spin-wait after a run (its default, for its own latency), which
    took ~40 % of the cores from whatever ran next (leangpt f32 right after onnx-int8: 1,185 tok/s, against
    2,006 after a 0.5 s pause)."""
    def timed() -> dict:
        result = run()
        time.sleep(0.5)
        return result
    return timed


def speed(args: argparse.Namespace, files: dict[str, Path]) -> list[dict[str, Any]]:
    rows = []
    for batch in args.batch:
        medians = paired_medians(speed_candidates(args, files, batch), args.repeats)
        for name, m in medians.items():
            rows.append({"runtime": name, "batch": batch,
                         "prefill_tokens_per_s": round(batch * args.prompt_tokens / m["ttft"], 1),
                         "decode_tokens_per_s": round(batch * (args.new_tokens - 1) / m["decode"], 1)})
    return rows


def same_weight_ratios(rows: list[dict[str, Any]]) -> list[tuple[str, str, int, float]]:
    """leangpt's decode speed over llama.cpp's on the same weights: the float model against gguf-f32, each
    quantized checkpoint against its own GGUF export."""
    speed = {(r["runtime"], r["batch"]): r["decode_tokens_per_s"] for r in rows}
    out = []
    for (name, batch), tok_s in speed.items():
        theirs = "gguf-f32" if name.startswith("leangpt f32") else name.replace("leangpt ", "gguf-", 1)
        if name.startswith("leangpt ") and (theirs, batch) in speed:
            out.append((name, theirs, batch, tok_s / speed[theirs, batch]))
    return out


def score(model: torch.nn.Module, args: argparse.Namespace, reference: torch.nn.Module | None = None) -> dict:
    """Bits per byte over the windows and tokens `leangpt eval --max-tokens` scores; with a reference, KL and
    top-1 agreement against it."""
    _, tokenizer, _ = load_checkpoint(args.model)
    tokens = Dataset(args.data).tokens("val")
    block = reference.config.block_size if reference is not None else model.config.block_size
    r = evaluate_tokens(model, tokens, tokenizer.token_bytes, block, batch_size=1, max_tokens=args.quality_tokens,
                        reference=reference)
    return {k: r[k] for k in ("bits_per_byte", "kl", "top1_agreement") if k in r}


def quality(args: argparse.Namespace, files: dict[str, Path], work: Path) -> list[dict[str, Any]]:
    """Each runtime's bits per byte from its own logits beside leangpt's, with KL against leangpt; for each
    --quantized checkpoint, its GGUF (integers kept) and a q4_0 requantization, against it and the float model."""
    dense, _, _ = load_checkpoint(args.model)
    block = dense.config.block_size
    ours = score(dense, args)["bits_per_byte"]
    rows = [{"model": "dense", "runtime": "leangpt", "bits_per_byte": ours}]
    for key, path in files.items():
        rows.append({"model": "dense", "runtime": key,
                     **score(RuntimeAsModel(runner(key, path, block, args.threads, 1)), args, dense)})
    for ckpt in args.quantized:
        quantized, _, _ = load_checkpoint(ckpt)
        rows.append({"model": ckpt.name, "runtime": "leangpt", **score(quantized, args, dense)})
        for type_name in ("auto", "q4_0"):
            path = work / f"{ckpt.name}-{type_name}.gguf"
            result = export(ExportSettings(model=ckpt, format="gguf", out=path, type=type_name, progress=False))
            llama = RuntimeAsModel(LlamaCppModel(path, block, args.threads))
            rows.append({"model": ckpt.name, "runtime": f"gguf-{result['type']} ({type_name})",
                         "kept_integers": result["kept_integers"], "requantized": len(result["requantized"]),
                         **score(llama, args, dense),
                         "kl_vs_leangpt_quantized": score(llama, args, quantized)["kl"]})
    for row in rows:
        row["relative_difference"] = row["bits_per_byte"] / ours - 1
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, required=True, help="float checkpoint (e.g. the pipeline's dense model)")
    p.add_argument("--data", type=Path, help="its dataset dir: adds bits per byte from each runtime's logits")
    p.add_argument("--quality-tokens", type=int, default=8192, help="val tokens scored for quality")
    p.add_argument("--quantized", type=Path, action="append", default=[],
                   help="a quantized checkpoint of --model (leangpt quantize): quality of its GGUF exports; repeatable")
    p.add_argument("--batch", type=int, action="append", help="batch size; repeatable (default: 1 and 8)")
    p.add_argument("--prompt-tokens", type=int, default=32, help="prompt length in tokens (random ids)")
    p.add_argument("--new-tokens", type=int, default=128, help="tokens generated per row")
    p.add_argument("--repeats", type=int, default=5, help="timed rounds (median) after one warm-up")
    p.add_argument("--threads", type=int, default=2, help="threads of every runtime (torch, llama.cpp, onnxruntime)")
    p.add_argument("--python-step", action="store_true",
                   help="also time the float model on the compiled Python decode step (without the C++ step)")
    p.add_argument("--json-out", type=Path, default=Path("bench/export.json"), help="where to write the results")
    args = p.parse_args()
    args.batch = args.batch or [1, 8]
    if llama_cpp_version() is None:
        sys.exit('llama-cpp-python is not installed: pip install -e ".[llamacpp]"')
    torch.set_num_threads(args.threads)
    load = os.getloadavg()
    with tempfile.TemporaryDirectory() as work:
        files = exports(args.model, args.quantized, Path(work))
        sizes = {k: sum(f.stat().st_size for f in ([v] if v.is_file() else v.glob("model.onnx*")))
                 for k, v in files.items()}
        results = {"command": " ".join(sys.argv), "model": str(args.model), "machine": describe(),
                   "load_average_before": load, "llama_cpp_python": llama_cpp_version(),
                   "llama_cpp_extra_buffers": llama_cpp_extra_buffers(),
                   "sizes_bytes": sizes, "speed": speed(args, files)}
        if args.data:
            results["quality"] = quality(args, files, Path(work))
    results["load_average_after"] = os.getloadavg()
    print(f"{'runtime':<24}{'batch':>6}{'prefill tok/s':>15}{'decode tok/s':>14}")
    for r in results["speed"]:
        print(f"{r['runtime']:<24}{r['batch']:>6}{r['prefill_tokens_per_s']:>15,.0f}{r['decode_tokens_per_s']:>14,.0f}")
    for ours, theirs, b, ratio in same_weight_ratios(results["speed"]):
        print(f"decode, batch {b}: {ours} / llama.cpp {theirs} = {ratio:.2f}x")
    for r in results.get("quality", []):
        kl = f", KL {r['kl']:.2e}, top-1 {r['top1_agreement']:.4f}" if "kl" in r else ""
        if "kl_vs_leangpt_quantized" in r:
            kl += f", KL vs leangpt's quantized model {r['kl_vs_leangpt_quantized']:.2e}"
        print(f"{r['model']:<12}{r['runtime']:<24} bits/byte {r['bits_per_byte']:.5f} "
              f"({r['relative_difference']:+.4%}){kl}")
    print(f"load average before {load[0]:.2f}, after {results['load_average_after'][0]:.2f}")
    args.json_out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
