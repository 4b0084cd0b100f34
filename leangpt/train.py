"""`leangpt train`: pretrain a GPT from scratch or fine-tune a checkpoint. The loop is written out below."""

from __future__ import annotations

import dataclasses
import json
import math
import random
import time
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from leangpt import cli
from leangpt.checkpoint import load_checkpoint, save_checkpoint
from leangpt.config import ModelConfig
from leangpt.data.shards import Dataset, random_batch
from leangpt.data.tokenizer import TextTokenizer
from leangpt.device import autocast, pick_device
from leangpt.errors import UserError
from leangpt.evaluate import evaluate_tokens
from leangpt.fsutil import atomic_dir, check_output_dir
from leangpt.hf import hf_model_type
from leangpt.model import GPT
from leangpt.perf import matmul_peak_flops, train_flops_per_token
from leangpt.schedules import cosine_with_warmup


@dataclass
class TrainConfig:
    preset: str = "small-cpu"  # model preset when training from scratch
    model: dict[str, Any] = field(default_factory=dict)  # model config overrides, e.g. model.n_layer=4
    batch_size: int = 16  # sequences per micro-batch
    block_size: int | None = None  # context length; None means the model's block_size
    grad_accum: int = 1  # micro-batches per optimizer step
    max_steps: int = 1000
    lr: float = 1e-3
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int | None = None  # None means 5% of max_steps
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # max global gradient norm; 0 disables clipping
    dropout: float = 0.0
    eval_every: int = 100  # steps between val evaluations; 0 evaluates only at the end
    eval_tokens: int = 65536  # val tokens scored at each periodic evaluation
    save_every: int = 0  # steps between checkpoints; 0 saves only at the end
    log_every: int = 10
    seed: int = 1337
    device: str = "auto"

    def validate(self) -> None:
        checks = [
            (self.batch_size >= 1, "batch_size must be >= 1"),
            (self.grad_accum >= 1, "grad_accum must be >= 1"),
            (self.max_steps >= 1, "max_steps must be >= 1"),
            (self.lr > 0, "lr must be > 0"),
            (0 <= self.min_lr_ratio <= 1, "min_lr_ratio must be in [0, 1]"),
            (self.warmup_steps is None or 0 <= self.warmup_steps <= self.max_steps, "warmup_steps must be in [0, max_steps]"),
            (self.weight_decay >= 0, "weight_decay must be >= 0"),
            (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1, "beta1 and beta2 must be in [0, 1)"),
            (self.grad_clip >= 0, "grad_clip must be >= 0"),
            (0 <= self.dropout < 1, "dropout must be in [0, 1)"),
            (self.eval_every >= 0 and self.save_every >= 0 and self.log_every >= 1, "eval_every, save_every >= 0 and log_every >= 1"),
            (self.eval_tokens >= 1, "eval_tokens must be >= 1"),
            (self.block_size is None or self.block_size >= 1, "block_size must be >= 1"),
        ]
        for ok, message in checks:
            if not ok:
                raise UserError(f"bad setting: {message}")

    @property
    def warmup(self) -> int:
        return self.warmup_steps if self.warmup_steps is not None else max(1, self.max_steps // 20)


def build_model_config(cfg: TrainConfig, vocab_size: int, eos_id: int) -> ModelConfig:
    hints = typing.get_type_hints(ModelConfig)
    overrides = {}
    for key, value in cfg.model.items():
        if key not in hints or key == "head_dim":
            raise UserError(f"unknown setting 'model.{key}'")
        overrides[key] = cli._convert(value, hints[key], f"model.{key}")
    overrides.setdefault("dropout", cfg.dropout)
    return ModelConfig.from_preset(cfg.preset, vocab_size=vocab_size, eos_token_id=eos_id, bos_token_id=eos_id, **overrides)


def configure_optimizer(model: GPT, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (not on biases, norms or positions' scale)."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    decay = [p for n, p in params.items() if p.dim() >= 2]
    no_decay = [p for n, p in params.items() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    fused = device.type == "cuda"
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=fused, foreach=not fused)


def lm_loss(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over the micro-batch's targets."""
    logits = model(x)
    return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), y.reshape(-1))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def train(cfg: TrainConfig, data_dir: Path, out: Path, init: Path | None = None, overwrite: bool = False,
          loss_fn: Callable[[torch.nn.Module, torch.Tensor, torch.Tensor], torch.Tensor] = lm_loss,
          extra_meta: dict[str, Any] | None = None, progress: bool = True) -> dict[str, Any]:
    """Train and write the checkpoint to out. Returns the final metrics."""
    cfg.validate()
    check_output_dir(out, overwrite)
    device = pick_device(cfg.device)
    seed_everything(cfg.seed)
    dataset = Dataset(data_dir)
    tokenizer = TextTokenizer.load(data_dir)

    if init is not None:
        model, init_tokenizer, _ = load_checkpoint(init, device)
        if init_tokenizer.sha256() != dataset.manifest.get("tokenizer_sha256"):
            raise UserError(f"{data_dir} was not tokenized with {init}'s tokenizer; run `leangpt prepare --tokenizer {init}`")
        tokenizer = init_tokenizer
        for m in model.modules():  # fine-tuning uses this run's dropout
            if isinstance(m, torch.nn.Dropout):
                m.p = cfg.dropout
        model.config.dropout = cfg.dropout
        for block in model.blocks:
            block.attn.dropout = cfg.dropout
    else:
        model_config = build_model_config(cfg, tokenizer.vocab_size, tokenizer.eos_id)
        hf_model_type(model_config)  # fail now, not at the first save, if the options have no HF format
        model = GPT(model_config).to(device)
    model.train()
    mc = model.config
    block_size = cfg.block_size or mc.block_size
    if block_size > mc.block_size:
        raise UserError(f"block_size {block_size} exceeds the model's {mc.block_size}")
    train_tokens, val_tokens = dataset.tokens("train"), dataset.tokens("val")
    for split, toks in (("train", train_tokens), ("val", val_tokens)):
        if len(toks) < block_size + 1:
            raise UserError(f"{split} split has {len(toks)} tokens, fewer than one training window of {block_size + 1}; "
                            f"use more text or a smaller block_size")

    optimizer = configure_optimizer(model, cfg, device)
    gen = torch.Generator().manual_seed(cfg.seed)
    tokens_per_step = cfg.batch_size * block_size * cfg.grad_accum
    flops_per_token = train_flops_per_token(model, block_size)
    peak = matmul_peak_flops(device)
    meta = {"kind": "train", "parent": str(init) if init else None, "data": str(data_dir),
            "train_config": dataclasses.asdict(cfg), **(extra_meta or {})}
    history: list[dict[str, Any]] = []

    def evaluate(max_tokens: int | None) -> dict[str, Any]:
        return evaluate_tokens(model, val_tokens, tokenizer.token_bytes, block_size, cfg.batch_size, max_tokens)

    def save(step: int, metrics: dict[str, Any]) -> None:
        with atomic_dir(out) as tmp:
            save_checkpoint(tmp, model, tokenizer, {**meta, "step": step, "metrics": metrics})
            (tmp / "metrics.jsonl").write_text("".join(json.dumps(h) + "\n" for h in history))

    bar = tqdm(total=cfg.max_steps, desc="train", disable=not progress, dynamic_ncols=True)
    train_time, last = 0.0, {}
    for step in range(cfg.max_steps):
        lr = cosine_with_warmup(step, cfg.max_steps, cfg.warmup, cfg.lr, cfg.lr * cfg.min_lr_ratio)
        for group in optimizer.param_groups:
            group["lr"] = lr
        t0 = time.perf_counter()
        loss_sum = torch.zeros((), device=device)
        for _ in range(cfg.grad_accum):
            x, y = random_batch(train_tokens, cfg.batch_size, block_size, gen, device)
            with autocast(device):
                loss = loss_fn(model, x, y)
            # Equal-sized micro-batches: averaging their means equals the mean over the whole batch.
            (loss / cfg.grad_accum).backward()
            loss_sum += loss.detach()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else math.inf)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        done = step + 1
        if done % cfg.log_every == 0 or done == cfg.max_steps:
            train_loss = (loss_sum / cfg.grad_accum).item()  # host sync only when logging
            if device.type == "cuda":
                torch.cuda.synchronize()
        train_time += time.perf_counter() - t0
        if done % cfg.log_every == 0 or done == cfg.max_steps:
            tps = tokens_per_step * done / train_time
            last = {"step": done, "train_loss": train_loss, "lr": lr, "grad_norm": float(grad_norm),
                    "tokens": tokens_per_step * done, "tokens_per_s": tps, "mfu": tps * flops_per_token / peak}
            history.append(last)
            bar.set_postfix(loss=f"{train_loss:.3f}", tok_s=f"{tps:,.0f}", mfu=f"{last['mfu']:.0%}")
        if cfg.eval_every and done % cfg.eval_every == 0 and done != cfg.max_steps:
            ev = evaluate(cfg.eval_tokens)
            history.append({"step": done, "val_loss": ev["loss"], "val_bits_per_byte": ev["bits_per_byte"]})
            bar.write(f"step {done}: val loss {ev['loss']:.4f}, bits/byte {ev['bits_per_byte']:.4f}")
        if cfg.save_every and done % cfg.save_every == 0 and done != cfg.max_steps:
            save(done, last)
        bar.update(1)
    bar.close()

    ev = evaluate(cfg.eval_tokens)
    final = {**last, "val_loss": ev["loss"], "val_perplexity": ev["perplexity"],
             "val_bits_per_byte": ev["bits_per_byte"], "val_tokens_scored": ev["tokens"],
             "train_time_s": train_time, "params": model.num_params(), "peak_flops": peak}
    history.append({"step": cfg.max_steps, "val_loss": ev["loss"], "val_bits_per_byte": ev["bits_per_byte"]})
    save(cfg.max_steps, final)
    return final


def build_parser() -> cli.ArgumentParser:
    p = cli.parser("train", "Pretrain a GPT on a prepared dataset, or fine-tune a checkpoint (--init). "
                            "Settings come from --preset, then --config, then --set.")
    p.add_argument("--data", type=Path, required=True, help="dataset directory made by `leangpt prepare`")
    p.add_argument("--out", type=Path, required=True, help="checkpoint directory to write (a Hugging Face model dir)")
    p.add_argument("--preset", help="model preset: tiny, small-cpu, gpt2, gpt2-medium, gpt2-large, gpt2-xl")
    p.add_argument("--init", type=Path, help="start from this checkpoint (any HF GPT-2 / llama dir) instead of random weights")
    cli.add_overrides(p)
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    p.add_argument("--json", action="store_true", help="print final metrics as one JSON object on stdout")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cfg = TrainConfig()
    if args.preset:
        cfg.preset = args.preset
    cli.apply_overrides(cfg, args.config, args.overrides)
    if args.init and (args.preset or cfg.model):
        raise UserError("--init takes the architecture from the checkpoint; drop --preset / model.* settings")
    if not args.init:
        ModelConfig.from_preset(cfg.preset)  # unknown preset fails before any work
    final = train(cfg, args.data, args.out, init=args.init, overwrite=args.overwrite)
    result = {"checkpoint": str(args.out), **final}
    if args.json:
        cli.print_json(result)
    else:
        cli.log(f"saved {args.out}: val loss {final['val_loss']:.4f}, bits/byte {final['val_bits_per_byte']:.4f}, "
                f"{final['tokens_per_s']:,.0f} tokens/s, MFU {final['mfu']:.1%}")
    return 0
