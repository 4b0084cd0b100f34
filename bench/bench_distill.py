"""Distilled student vs the same student trained from scratch, on the embedded corpus.

A teacher (small-cpu preset, 4 blocks) is trained (or reused with --teacher). Three students with half the
teacher's blocks then see the same number of training tokens, the same batches and the same schedule:

  scratch      random init, cross-entropy on the data alone (the twin)
  distilled    teacher blocks 0,2 (+ embeddings, norm, head) as init, alpha * T^2 * KL + (1 - alpha) * CE
  layers-ce    teacher blocks 0,2 as init, cross-entropy alone: separates the init's share from the soft targets'

Val perplexity is measured on the same val tokens for every model (the first --eval-tokens of the val split).
The distilled student's step time minus layers-ce's is the teacher's forward pass: the most a cache of the
teacher's logits could save per step. Each student then drafts for the teacher in speculative decoding
(`leangpt generate --draft`) on prompts from the val split; the acceptance rate is reported.

    flock /tmp/leangpt-bench.lock python bench/bench_distill.py --json-out bench/distill.json
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from leangpt.checkpoint import load_checkpoint, read_meta
from leangpt.data.prepare import PrepareSettings, prepare
from leangpt.data.shards import Dataset
from leangpt.distill import DistillTrainConfig, distill
from leangpt.evaluate import evaluate_tokens
from leangpt.fsutil import read_json
from leangpt.machine import describe
from leangpt.train import TrainConfig, train


def curve(ckpt: Path) -> list[tuple[int, float]]:
    """(step, val perplexity) points from the checkpoint's metrics.jsonl."""
    rows = [json.loads(line) for line in (ckpt / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], math.exp(r["val_loss"])) for r in rows if "val_loss" in r]


def draft_acceptance(teacher: Path, draft: Path, prompts: Path, new_tokens: int) -> float:
    """Share of drafted tokens the teacher accepts, `leangpt generate --draft` over every prompt (same seeds)."""
    cmd = [sys.executable, "-m", "leangpt", "generate", "--model", str(teacher), "--draft", str(draft),
           "--prompts", str(prompts), "--max-new-tokens", str(new_tokens), "--ignore-eos", "--seed", "0", "--json"]
    rows = [json.loads(line) for line in subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()]
    return sum(r["draft_tokens_accepted"] for r in rows) / sum(r["draft_tokens_proposed"] for r in rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, default=Path("/tmp/leangpt-bench-distill"), help="scratch directory")
    p.add_argument("--data", type=Path, help="dataset dir (default: prepare --source shakespeare into WORK/data)")
    p.add_argument("--teacher", type=Path, help="reuse this teacher checkpoint instead of training one")
    p.add_argument("--teacher-steps", type=int, default=300, help="steps when training the teacher")
    p.add_argument("--student-steps", type=int, default=150, help="steps for every student")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per step (teacher and students)")
    p.add_argument("--block-size", type=int, default=256, help="context length")
    p.add_argument("--eval-every", type=int, default=50, help="steps between val evaluations of the students")
    p.add_argument("--eval-tokens", type=int, default=32768, help="val tokens scored at each evaluation")
    p.add_argument("--reuse", action="store_true", help="reuse students already in WORK (only re-measure)")
    p.add_argument("--draft-prompts", type=int, default=8, help="val-split prompts for the speculative-decoding check")
    p.add_argument("--draft-new-tokens", type=int, default=96, help="tokens generated per prompt in that check")
    p.add_argument("--json-out", type=Path, help="write the results here")
    args = p.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()

    data = args.data or args.work / "data"
    if not data.exists():
        prepare(PrepareSettings(source=["shakespeare"], out=data, filters_enabled=False))
    # the recipe these figures were measured with (before optimizer=muon and the cpu-5min preset became defaults)
    common = dict(batch_size=args.batch_size, block_size=args.block_size, eval_tokens=args.eval_tokens, seed=1337,
                  optimizer="adamw", lr=1e-3)

    teacher = args.teacher or args.work / "teacher"
    if not teacher.exists():
        print(f"training the teacher ({args.teacher_steps} steps) ...", flush=True)
        train(TrainConfig(preset="small-cpu", max_steps=args.teacher_steps, eval_every=0, **common), data, teacher)
    tmodel, tok, _ = load_checkpoint(teacher)
    if Dataset(data).manifest.get("tokenizer_sha256") != tok.sha256():
        raise SystemExit(f"{data} was not tokenized with {teacher}'s tokenizer")
    val = Dataset(data).tokens("val")
    teacher_eval = evaluate_tokens(tmodel, val, tok.token_bytes, args.block_size, 8, args.eval_tokens)
    half = tmodel.config.n_layer // 2
    layers = ",".join(str(i) for i in range(0, tmodel.config.n_layer, 2))
    del tmodel

    student_cfg = dict(max_steps=args.student_steps, eval_every=args.eval_every, **common)
    runs: dict[str, dict[str, Any]] = {}
    prompts = args.work / "prompts.txt"
    windows = [val[i * 1000:i * 1000 + 24] for i in range(args.draft_prompts)]
    prompts.write_text("".join(tok.decode(w.tolist()).replace("\n", " ").strip() + "\n" for w in windows))
    spec = args.work / "student.yaml"
    spec.write_text(json.dumps({"n_layer": half}))
    for name in ("scratch", "distilled", "layers-ce"):
        out = args.work / name
        cfg = DistillTrainConfig(**student_cfg)
        cfg.distill.alpha = 0.5 if name == "distilled" else 0.0
        if args.reuse and (out / "leangpt.json").is_file():
            final = read_meta(out)["metrics"]
        elif name == "scratch":
            print(f"student {name} ({args.student_steps} steps) ...", flush=True)
            # alpha = 0 with a random init is plain `leangpt train` (tests/test_distill.py checks the weights match)
            final = distill(cfg, teacher, data, out, config_file=spec, init="random", overwrite=True)
        else:
            print(f"student {name} ({args.student_steps} steps) ...", flush=True)
            final = distill(cfg, teacher, data, out, layers=layers, overwrite=True)
        runs[name] = {"val_perplexity": final["val_perplexity"], "val_bits_per_byte": final["val_bits_per_byte"],
                      "train_time_s": final["train_time_s"], "tokens": final["tokens"],
                      "s_per_step": final["train_time_s"] / args.student_steps, "curve": curve(out),
                      "draft_acceptance": draft_acceptance(teacher, out, prompts, args.draft_new_tokens)}

    scratch, dist, lce = runs["scratch"], runs["distilled"], runs["layers-ce"]
    teacher_forward_share = 1 - lce["train_time_s"] / dist["train_time_s"]
    result = {
        "machine": describe(),
        "data": str(data), "teacher": str(teacher), "teacher_meta_steps": read_json(teacher / "leangpt.json").get("step"),
        "student_layers": layers, "settings": {**vars(args), "work": str(args.work), "data": str(data),
                                               "teacher": str(teacher), "json_out": str(args.json_out)},
        "teacher_val_perplexity": teacher_eval["perplexity"], "teacher_val_bits_per_byte": teacher_eval["bits_per_byte"],
        "students": runs,
        "distilled_vs_scratch_ppl_reduction": 1 - dist["val_perplexity"] / scratch["val_perplexity"],
        "distilled_vs_layers_ce_ppl_reduction": 1 - dist["val_perplexity"] / lce["val_perplexity"],
        "teacher_forward_share_of_distill_step": teacher_forward_share,
        "wall_s": time.perf_counter() - t_start, "reused_students": args.reuse,
    }
    print(f"\nteacher ({teacher}): val perplexity {teacher_eval['perplexity']:.2f}, "
          f"bits/byte {teacher_eval['bits_per_byte']:.4f}")
    print(f"{'student':<10} {'val ppl':>8} {'bits/B':>7} {'s/step':>7} {'accept':>7}  curve (step: ppl)")
    for name, r in runs.items():
        pts = "  ".join(f"{s}: {v:.1f}" for s, v in r["curve"])
        print(f"{name:<10} {r['val_perplexity']:8.2f} {r['val_bits_per_byte']:7.4f} {r['s_per_step']:7.2f} "
              f"{r['draft_acceptance']:7.1%}  {pts}")
    print(f"distilled vs scratch: {result['distilled_vs_scratch_ppl_reduction']:.1%} lower perplexity "
          f"(target >= 3%); vs layers-ce: {result['distilled_vs_layers_ce_ppl_reduction']:.1%}")
    print(f"teacher forward: {teacher_forward_share:.0%} of a distillation step; wall {result['wall_s']:.0f} s")
    if args.json_out:
        args.json_out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
