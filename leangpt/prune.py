"""`leangpt prune`: unstructured, N:M and structured pruning of a checkpoint, with optional recovery fine-tuning.

Unstructured and N:M sparsity is stored dense with zeros: on this project's CPUs a sparse format is slower
than the dense matmul at these sparsities (bench/bench_prune.py measures it; see BENCHMARKS.md). Structured
pruning removes heads and neurons, so the saved model is really smaller and faster.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from pathlib import Path
from typing import Any

import torch

from leangpt import cli
from leangpt.calibration import calibration_tokens
from leangpt.checkpoint import load_checkpoint, save_checkpoint
from leangpt.data.shards import Dataset
from leangpt.device import pick_device
from leangpt.errors import UserError
from leangpt.fsutil import atomic_dir, check_output_dir
from leangpt.model import GPT
from leangpt.pruning import structured, unstructured
from leangpt.pruning.masks import parse_pattern
from leangpt.train import TrainConfig, lm_loss, train

METHODS = ("magnitude", "wanda", "sparsegpt", "structured")


def recovery_defaults() -> TrainConfig:
    """Fine-tuning settings for recovery: a smaller learning rate than pretraining, no periodic evals."""
    return TrainConfig(lr=3e-4, warmup_steps=None, eval_every=0, eval_tokens=65536, log_every=10)


def validate(args: Any) -> tuple[float | None, tuple[int, int] | None]:
    """Check the option combination before any work; returns (sparsity, pattern)."""
    pattern = parse_pattern(args.pattern) if args.pattern else None
    sparsity = args.sparsity
    if args.method == "structured":
        if sparsity is not None or pattern is not None:
            raise UserError("--method structured takes --heads and --neurons, not --sparsity / --pattern")
        if args.heads is None and args.neurons is None:
            raise UserError("--method structured needs --heads and/or --neurons (fractions to remove)")
        for name in ("heads", "neurons"):
            value = getattr(args, name)
            if value is not None and not 0 <= value < 1:
                raise UserError(f"--{name} must be in [0, 1), got {value}")
    else:
        if args.heads is not None or args.neurons is not None:
            raise UserError("--heads / --neurons need --method structured")
        if pattern is not None:
            implied = 1 - pattern[0] / pattern[1]
            if sparsity is not None and abs(sparsity - implied) > 1e-9:
                raise UserError(f"--pattern {args.pattern} means sparsity {implied:g}; drop --sparsity or make it match")
            sparsity = implied
            if args.scope == "global":
                raise UserError("--scope global is for unstructured magnitude and structured pruning, not N:M")
        if sparsity is None:
            raise UserError(f"--method {args.method} needs --sparsity (or --pattern N:M)")
        if not 0 <= sparsity < 1:
            raise UserError(f"--sparsity must be in [0, 1), got {sparsity}")
        if args.scope == "global" and args.method != "magnitude":
            raise UserError(f"--scope global applies to magnitude and structured; {args.method} prunes per layer")
    needs_data = args.method != "magnitude" or args.recover_steps > 0
    if needs_data and args.calib_data is None:
        raise UserError(f"--method {args.method}{' with --recover-steps' if args.recover_steps else ''} needs --calib-data DIR")
    if args.recover_steps < 0 or args.calib_samples < 1:
        raise UserError("--recover-steps must be >= 0 and --calib-samples >= 1")
    return sparsity, pattern


def prune_model(model: GPT, method: str, tokens: torch.Tensor | None, sparsity: float | None = None,
                pattern: tuple[int, int] | None = None, scope: str = "layer", heads: float = 0.0,
                neurons: float = 0.0) -> tuple[GPT, unstructured.Masks, dict[str, Any]]:
    """Prune in memory. Returns (model, keep-masks to hold fixed during recovery, a summary)."""
    if method == "structured":
        plan = structured.plan_structured(model, tokens, heads, neurons, scope)
        small = structured.shrink(model, plan)
        c = small.config
        summary = {"heads": [c.layer_heads(i)[0] for i in range(c.n_layer)],
                   "neurons": [c.layer_mlp_width(i) for i in range(c.n_layer)],
                   "heads_before": [model.config.layer_heads(i)[0] for i in range(c.n_layer)],
                   "neurons_before": [model.config.layer_mlp_width(i) for i in range(c.n_layer)]}
        return small, {}, summary
    if method == "magnitude":
        masks = unstructured.magnitude(model, sparsity, pattern, scope)
    elif method == "wanda":
        masks = unstructured.wanda(model, tokens, sparsity, pattern)
    else:
        masks = unstructured.sparsegpt(model, tokens, sparsity, pattern)
    per_layer = unstructured.sparsity_report(model, masks)
    total = sum(m.numel() for m in masks.values())
    pruned = sum(int((~m).sum()) for m in masks.values())
    return model, masks, {"sparsity": pruned / total, "layer_sparsity": per_layer}


def recovery_loss(kind: str, teacher: GPT | None, student: GPT):
    """LM loss, or distillation from the unpruned model (leangpt.distill's loss)."""
    if kind == "lm":
        return lm_loss
    from leangpt.distill import DistillConfig, DistillLoss

    return DistillLoss(teacher, DistillConfig(), student.config)


def build_parser() -> cli.ArgumentParser:
    p = cli.parser("prune", "Prune a checkpoint: unstructured (magnitude, Wanda, SparseGPT), N:M (--pattern), or "
                            "structured head/neuron removal that gives a smaller dense model; optionally fine-tune "
                            "to recover (--recover-steps; recovery settings as for `leangpt train` via --set).")
    p.add_argument("--model", type=Path, required=True, help="checkpoint directory to prune")
    p.add_argument("--method", required=True, choices=METHODS, help="how to choose what to remove")
    p.add_argument("--sparsity", type=float, help="fraction of each block linear layer's weights to zero (unstructured)")
    p.add_argument("--pattern", help="N:M semi-structured sparsity, e.g. 2:4 keeps 2 of every 4 consecutive inputs")
    p.add_argument("--scope", default="layer", choices=["layer", "global"],
                   help="layer: the same fraction in every layer; global: rank across layers (magnitude, structured)")
    p.add_argument("--heads", type=float, help="structured: fraction of attention heads to remove (whole KV groups)")
    p.add_argument("--neurons", type=float, help="structured: fraction of MLP neurons to remove")
    p.add_argument("--calib-data", type=Path, help="dataset dir (from `leangpt prepare`) for calibration and recovery")
    p.add_argument("--calib-samples", type=int, default=128, help="calibration windows drawn from the train split")
    p.add_argument("--calib-seq-len", type=int, help="tokens per calibration window (default: the model's block_size)")
    p.add_argument("--recover-steps", type=int, default=0, help="fine-tuning steps after pruning; 0 skips recovery")
    p.add_argument("--recover-loss", default="lm", choices=["lm", "distill"],
                   help="recovery objective: LM loss, or distillation from the unpruned model")
    cli.add_overrides(p)
    p.add_argument("--seed", type=int, default=0, help="seed for drawing calibration windows")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, ...")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    p.add_argument("--out", type=Path, required=True, help="checkpoint directory to write")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object on stdout")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    sparsity, pattern = validate(args)
    rcfg = cli.apply_overrides(recovery_defaults(), args.config, args.overrides)
    if args.recover_steps:
        rcfg.max_steps, rcfg.device = args.recover_steps, args.device
        rcfg.validate()
    check_output_dir(args.out, args.overwrite)
    device = pick_device(args.device)
    model, tokenizer, parent_meta = load_checkpoint(args.model, device)
    tokens = None
    if args.calib_data is not None:
        if Dataset(args.calib_data).manifest.get("tokenizer_sha256") != tokenizer.sha256():
            raise UserError(f"{args.calib_data} was not tokenized with {args.model}'s tokenizer; "
                            f"run `leangpt prepare --tokenizer {args.model}`")
        seq_len = args.calib_seq_len or model.config.block_size
        if not 0 < seq_len <= model.config.block_size:
            raise UserError(f"--calib-seq-len must be in 1..{model.config.block_size}")
        tokens = calibration_tokens(args.calib_data, args.calib_samples, seq_len, seed=args.seed)
    params_before = model.num_params()
    teacher = copy.deepcopy(model) if args.recover_steps and args.recover_loss == "distill" else None

    t0 = time.perf_counter()
    model, masks, summary = prune_model(model, args.method, tokens, sparsity, pattern, args.scope,
                                        args.heads or 0.0, args.neurons or 0.0)
    prune_s = time.perf_counter() - t0
    cli.log(f"pruned with {args.method} in {prune_s:.1f}s: {model.num_params():,} parameters "
            f"(was {params_before:,})" + (f", sparsity {summary['sparsity']:.1%}" if masks else ""))
    meta = {"kind": "prune", "parent": str(args.model), "parent_kind": parent_meta.get("kind"),
            "method": args.method, "pattern": args.pattern, "scope": args.scope, "calib_data": str(args.calib_data),
            "calib_samples": args.calib_samples if tokens is not None else 0,
            "params_before": params_before, "params": model.num_params(), "prune_seconds": prune_s,
            **({"target_sparsity": sparsity} if masks else {"heads_fraction": args.heads, "neurons_fraction": args.neurons}),
            **summary}
    result: dict[str, Any] = {"checkpoint": str(args.out), **meta}
    if args.recover_steps:
        meta["recovery"] = {"steps": args.recover_steps, "loss": args.recover_loss,
                            "train_config": dataclasses.asdict(rcfg)}
        final = train(rcfg, args.calib_data, args.out, overwrite=args.overwrite,
                      loss_fn=recovery_loss(args.recover_loss, teacher, model), extra_meta=meta,
                      model=model, on_step_end=(lambda m: unstructured.apply_masks(m, masks)) if masks else None)
        if masks:  # the masks held through training: report the sparsity of the saved weights
            result["layer_sparsity"] = unstructured.sparsity_report(model, masks)
        result["recovery"] = {**meta["recovery"], **{k: final[k] for k in ("val_loss", "val_perplexity",
                                                                           "val_bits_per_byte") if k in final}}
    else:
        with atomic_dir(args.out) as tmp:
            save_checkpoint(tmp, model, tokenizer, meta)
    if args.json:
        cli.print_json(result)
    else:
        cli.log(f"saved {args.out}")
    return 0
