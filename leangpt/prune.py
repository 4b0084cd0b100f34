"""`leangpt prune`: unstructured, N:M and structured pruning of a checkpoint, with optional recovery fine-tuning.

Unstructured and N:M sparsity is stored dense with zeros: on this project's CPUs a sparse format is slower
than the dense matmul at these sparsities (bench/bench_prune.py measures it; see BENCHMARKS.md). Structured
pruning removes heads and neurons, so the saved model is really smaller and faster.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from leangpt import cli
from leangpt.calibration import calibration_tokens
from leangpt.checkpoint import load_checkpoint, save_checkpoint
from leangpt.cli import setting
from leangpt.data.shards import Dataset
from leangpt.data.tokenizer import TextTokenizer
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


@dataclass
class PruneSettings:
    model: Path | None = setting(None, "checkpoint directory to prune", required=True)
    method: str | None = setting(None, "how to choose what to remove", choices=METHODS, required=True)
    sparsity: float | None = setting(None, "fraction of each block linear layer's weights to zero (unstructured)")
    pattern: str | None = setting(None, "N:M semi-structured sparsity, e.g. 2:4 keeps 2 of every 4 consecutive inputs")
    scope: str = setting("layer", "layer: the same fraction in every layer; global: rank across layers "
                                  "(magnitude, structured)", choices=["layer", "global"])
    heads: float | None = setting(None, "structured: fraction of attention heads to remove (whole KV groups)")
    neurons: float | None = setting(None, "structured: fraction of MLP neurons to remove")
    calib_data: Path | None = setting(None, "dataset dir (from `leangpt prepare`) for calibration and recovery")
    calib_samples: int = setting(128, "calibration windows drawn from the train split")
    calib_seq_len: int | None = setting(None, "tokens per calibration window (default: the model's block_size)")
    recover_steps: int = setting(0, "fine-tuning steps after pruning; 0 skips recovery")
    recover_loss: str = setting("lm", "recovery objective: LM loss, or distillation from the unpruned model",
                                choices=["lm", "distill"])
    seed: int = setting(0, "seed for drawing calibration windows")
    device: str = setting("auto", "auto, cpu, cuda, ...")
    overwrite: bool = setting(False, "replace an existing output directory")
    out: Path | None = setting(None, "checkpoint directory to write", required=True)
    recovery: TrainConfig = setting(recovery_defaults(), "recovery fine-tuning settings, as for `leangpt train` "
                                    "(--set lr=3e-4; recovery.KEY for the names prune has too)", flatten=True)

    def validate(self) -> tuple[float | None, tuple[int, int] | None]:
        """Check the option combination before any work; returns (sparsity, pattern), the sparsity implied by
        --pattern where only that was given."""
        pattern = parse_pattern(self.pattern) if self.pattern else None
        sparsity = self._check_structured() if self.method == "structured" else self._check_unstructured(pattern)
        needs_data = self.method != "magnitude" or self.recover_steps > 0
        if needs_data and self.calib_data is None:
            with_recovery = " with --recover-steps" if self.recover_steps else ""
            raise UserError(f"--method {self.method}{with_recovery} needs --calib-data DIR")
        if self.recover_steps < 0 or self.calib_samples < 1:
            raise UserError("--recover-steps must be >= 0 and --calib-samples >= 1")
        if self.recover_steps:
            self.recovery_config().validate()
        return sparsity, pattern

    def _check_structured(self) -> None:
        if self.sparsity is not None or self.pattern:
            raise UserError("--method structured takes --heads and --neurons, not --sparsity / --pattern")
        if self.heads is None and self.neurons is None:
            raise UserError("--method structured needs --heads and/or --neurons (fractions to remove)")
        for name in ("heads", "neurons"):
            value = getattr(self, name)
            if value is not None and not 0 <= value < 1:
                raise UserError(f"--{name} must be in [0, 1), got {value}")

    def _check_unstructured(self, pattern: tuple[int, int] | None) -> float:
        if self.heads is not None or self.neurons is not None:
            raise UserError("--heads / --neurons need --method structured")
        sparsity = self.sparsity
        if pattern is not None:
            implied = 1 - pattern[0] / pattern[1]
            if sparsity is not None and abs(sparsity - implied) > 1e-9:
                raise UserError(f"--pattern {self.pattern} means sparsity {implied:g}; "
                                "drop --sparsity or make it match")
            sparsity = implied
            if self.scope == "global":
                raise UserError("--scope global is for unstructured magnitude and structured pruning, not N:M")
        if sparsity is None:
            raise UserError(f"--method {self.method} needs --sparsity (or --pattern N:M)")
        if not 0 <= sparsity < 1:
            raise UserError(f"--sparsity must be in [0, 1), got {sparsity}")
        if self.scope == "global" and self.method != "magnitude":
            raise UserError(f"--scope global applies to magnitude and structured; {self.method} prunes per layer")
        return sparsity

    def recovery_config(self) -> TrainConfig:
        """The recovery training settings with prune's step count and device."""
        return dataclasses.replace(self.recovery, max_steps=self.recover_steps, device=self.device)


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


def _calibration(s: PruneSettings, model: GPT, tokenizer: TextTokenizer) -> torch.Tensor | None:
    """Calibration windows from s.calib_data's train split (None without --calib-data)."""
    if s.calib_data is None:
        return None
    if Dataset(s.calib_data).manifest.get("tokenizer_sha256") != tokenizer.sha256():
        raise UserError(f"{s.calib_data} was not tokenized with {s.model}'s tokenizer; "
                        f"run `leangpt prepare --tokenizer {s.model}`")
    seq_len = s.calib_seq_len or model.config.block_size
    if not 0 < seq_len <= model.config.block_size:
        raise UserError(f"--calib-seq-len must be in 1..{model.config.block_size}")
    return calibration_tokens(s.calib_data, s.calib_samples, seq_len, seed=s.seed)


def _prune(s: PruneSettings, model: GPT, tokens: torch.Tensor | None, sparsity: float | None,
           pattern: tuple[int, int] | None,
           parent_meta: dict[str, Any]) -> tuple[GPT, unstructured.Masks, dict[str, Any]]:
    """Prune and time it; returns (model, masks, leangpt.json's record of the prune)."""
    params_before = model.num_params()
    t0 = time.perf_counter()
    model, masks, summary = prune_model(model, s.method, tokens, sparsity, pattern, s.scope,
                                        s.heads or 0.0, s.neurons or 0.0)
    prune_s = time.perf_counter() - t0
    cli.log(f"pruned with {s.method} in {prune_s:.1f}s: {model.num_params():,} parameters "
            f"(was {params_before:,})" + (f", sparsity {summary['sparsity']:.1%}" if masks else ""))
    meta = {"kind": "prune", "parent": str(s.model), "parent_kind": parent_meta.get("kind"),
            "method": s.method, "pattern": s.pattern, "scope": s.scope, "calib_data": str(s.calib_data),
            "calib_samples": s.calib_samples if tokens is not None else 0,
            "params_before": params_before, "params": model.num_params(), "prune_seconds": prune_s,
            **({"target_sparsity": sparsity} if masks else {"heads_fraction": s.heads, "neurons_fraction": s.neurons}),
            **summary}
    return model, masks, meta


def _recover(s: PruneSettings, model: GPT, teacher: GPT | None, masks: unstructured.Masks,
             meta: dict[str, Any]) -> dict[str, Any]:
    """Fine-tune the pruned model into s.out, the masks held after every step; returns the recovery record."""
    rcfg = s.recovery_config()
    meta["recovery"] = {"steps": s.recover_steps, "loss": s.recover_loss, "train_config": dataclasses.asdict(rcfg)}
    final = train(rcfg, s.calib_data, s.out, overwrite=s.overwrite,
                  loss_fn=recovery_loss(s.recover_loss, teacher, model), extra_meta=meta, model=model,
                  on_step_end=(lambda m: unstructured.apply_masks(m, masks)) if masks else None)
    metrics = {k: final[k] for k in ("val_loss", "val_perplexity", "val_bits_per_byte") if k in final}
    return {**meta["recovery"], **metrics}


def prune(s: PruneSettings) -> dict[str, Any]:
    """Prune s.model into s.out (fine-tuned for s.recover_steps if > 0); returns the checkpoint path, what
    leangpt.json records of the prune, and the recovery run with its final val metrics."""
    sparsity, pattern = s.validate()
    check_output_dir(s.out, s.overwrite)
    model, tokenizer, parent_meta = load_checkpoint(s.model, pick_device(s.device))
    tokens = _calibration(s, model, tokenizer)
    teacher = copy.deepcopy(model) if s.recover_steps and s.recover_loss == "distill" else None
    model, masks, meta = _prune(s, model, tokens, sparsity, pattern, parent_meta)
    result: dict[str, Any] = {"checkpoint": str(s.out), **meta}
    if s.recover_steps:
        result["recovery"] = _recover(s, model, teacher, masks, meta)
        if masks:  # the masks held through training: report the sparsity of the saved weights
            result["layer_sparsity"] = unstructured.sparsity_report(model, masks)
    else:
        with atomic_dir(s.out) as tmp:
            save_checkpoint(tmp, model, tokenizer, meta)
    return result


def build_parser() -> cli.ArgumentParser:
    return cli.build_parser(PruneSettings, "prune", "Prune a checkpoint: unstructured (magnitude, Wanda, SparseGPT), "
                            "N:M (--pattern), or structured head/neuron removal that gives a smaller dense model; "
                            "optionally fine-tune to recover (--recover-steps; recovery settings as for `leangpt "
                            "train` via --set).")


def main(argv: list[str] | None = None) -> int:
    settings, output = cli.parse(build_parser(), argv)
    result = prune(settings)
    if output.json:
        cli.print_json(result)
    else:
        cli.log(f"saved {result['checkpoint']}")
    return 0
