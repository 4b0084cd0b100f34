"""`leangpt train`: pretrain a GPT from scratch or fine-tune a checkpoint. The loop is written out below.

What decides correctness lives here once and is shared by distill and prune (they pass a loss, a model and
hooks into `train`): the loss normalisation over target tokens, token counting and checkpoint I/O.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import random
import signal
import statistics
import sys
import threading
import time
import typing
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict
from torch.distributed.tensor import DTensor
from tqdm import tqdm

from leangpt import cli, distributed, train_state
from leangpt.checkpoint import load_checkpoint, save_checkpoint
from leangpt.config import ModelConfig
from leangpt.data.batches import IGNORE_INDEX, WindowSampler, micro_batches
from leangpt.data.shards import Dataset
from leangpt.data.sft import PairSampler, file_sha256, load_pairs, pad_examples
from leangpt.data.tokenizer import TextTokenizer
from leangpt.device import autocast, pick_device, resolve_precision
from leangpt.errors import UserError
from leangpt.evaluate import evaluate_tokens
from leangpt.fsutil import atomic_dir, check_output_dir
from leangpt.hf import hf_model_type
from leangpt.model import GPT
from leangpt.perf import cached, machine_key, matmul_peak_flops, train_flops_per_token
from leangpt.schedules import BATCH_SCHEDULES, LR_SCHEDULES, NoiseScale, learning_rate, noise_scale_accum, ramp_accum

LossFn = Callable[[torch.nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class TrainConfig:
    preset: str = "small-cpu"  # model preset when training from scratch
    model: dict[str, Any] = field(default_factory=dict, metadata={"schema": ModelConfig})  # model config overrides, e.g. model.n_layer=4
    batch_size: int = 16  # sequences per micro-batch (per process)
    block_size: int | None = None  # context length; None means the model's block_size
    grad_accum: int = 1  # micro-batches per optimizer step (per process)
    max_steps: int = 1000
    lr: float = 1e-3
    lr_schedule: str = "cosine"  # cosine | wsd | constant
    min_lr_ratio: float = 0.1  # cosine / wsd decay to lr * min_lr_ratio
    warmup_steps: int | None = None  # None means 5% of max_steps
    decay_fraction: float = 0.2  # wsd: share of max_steps spent in the final decay
    batch_schedule: str = "constant"  # constant | ramp | noise_scale (all through grad_accum)
    ramp_tokens: int = 0  # ramp: tokens over which grad_accum grows from 1 to grad_accum
    max_grad_accum: int = 64  # noise_scale: upper bound on grad_accum
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # max global gradient norm; 0 disables clipping
    dropout: float = 0.0
    label_smoothing: float = 0.0
    z_loss: float = 0.0  # weight of PaLM's z-loss, mean of log(Z)^2 over targets
    eval_every: int = 100  # steps between val evaluations; 0 evaluates only at the end
    eval_tokens: int = 65536  # val tokens scored at each periodic evaluation
    save_every: int = 0  # steps between checkpoints; 0 saves only at the end (and on SIGINT / SIGTERM)
    keep_last: int = 2  # train_state/ step directories kept
    log_every: int = 10
    max_bad_steps: int = 5  # stop after this many non-finite steps in a row (each is skipped)
    seed: int = 1337
    device: str = "auto"
    parallel: str = "ddp"  # ddp | fsdp under torchrun; ignored in a single process
    precision: str = "auto"  # auto (bf16 where measured faster than fp32) | fp32 | bf16
    compile: bool = False  # torch.compile the model (falls back to eager with a warning)
    activation_checkpointing: bool = False  # recompute each block in the backward pass: less memory, more time
    deterministic: bool = False  # torch.use_deterministic_algorithms: bitwise-reproducible runs and resumes
    sft_val_fraction: float = 0.1  # JSONL pairs held out for validation

    def validate(self) -> None:
        checks = [
            (self.batch_size >= 1, "batch_size must be >= 1"),
            (self.grad_accum >= 1, "grad_accum must be >= 1"),
            (self.max_steps >= 1, "max_steps must be >= 1"),
            (self.lr > 0, "lr must be > 0"),
            (self.lr_schedule in LR_SCHEDULES, f"lr_schedule must be one of {', '.join(LR_SCHEDULES)}"),
            (0 <= self.min_lr_ratio <= 1, "min_lr_ratio must be in [0, 1]"),
            (self.warmup_steps is None or 0 <= self.warmup_steps <= self.max_steps, "warmup_steps must be in [0, max_steps]"),
            (0 <= self.decay_fraction <= 1, "decay_fraction must be in [0, 1]"),
            (self.batch_schedule in BATCH_SCHEDULES, f"batch_schedule must be one of {', '.join(BATCH_SCHEDULES)}"),
            (self.ramp_tokens >= 0, "ramp_tokens must be >= 0"),
            (self.max_grad_accum >= self.grad_accum, "max_grad_accum must be >= grad_accum"),
            (self.weight_decay >= 0, "weight_decay must be >= 0"),
            (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1, "beta1 and beta2 must be in [0, 1)"),
            (self.grad_clip >= 0, "grad_clip must be >= 0"),
            (0 <= self.dropout < 1, "dropout must be in [0, 1)"),
            (0 <= self.label_smoothing < 1, "label_smoothing must be in [0, 1)"),
            (self.z_loss >= 0, "z_loss must be >= 0"),
            (self.eval_every >= 0 and self.save_every >= 0 and self.log_every >= 1, "eval_every, save_every >= 0 and log_every >= 1"),
            (self.eval_tokens >= 1, "eval_tokens must be >= 1"),
            (self.keep_last >= 1, "keep_last must be >= 1"),
            (self.max_bad_steps >= 1, "max_bad_steps must be >= 1"),
            (self.block_size is None or self.block_size >= 1, "block_size must be >= 1"),
            (self.parallel in distributed.PARALLEL_MODES, f"parallel must be one of {', '.join(distributed.PARALLEL_MODES)}"),
            (0 <= self.sft_val_fraction < 1, "sft_val_fraction must be in [0, 1)"),
        ]
        for ok, message in checks:
            if not ok:
                raise UserError(f"bad setting: {message}")
        if self.precision not in ("auto", "fp32", "bf16"):
            raise UserError("bad setting: precision must be auto, fp32 or bf16")
        if self.batch_schedule == "noise_scale" and self.parallel == "fsdp":
            raise UserError("bad setting: batch_schedule=noise_scale needs per-micro-batch gradients; use parallel=ddp")

    @property
    def warmup(self) -> int:
        return self.warmup_steps if self.warmup_steps is not None else max(1, self.max_steps // 20)

    def lr_at(self, step: int) -> float:
        decay = round(self.decay_fraction * self.max_steps)
        return learning_rate(self.lr_schedule, step, self.max_steps, self.warmup, decay, self.lr, self.lr * self.min_lr_ratio)


def build_model_config(cfg: TrainConfig, vocab_size: int, eos_id: int) -> ModelConfig:
    hints = typing.get_type_hints(ModelConfig)
    overrides = {}
    for key, value in cfg.model.items():
        if key not in hints or key == "head_dim":
            raise UserError(f"unknown setting 'model.{key}'")
        overrides[key] = cli._convert(value, hints[key], f"model.{key}")
    overrides.setdefault("dropout", cfg.dropout)
    return ModelConfig.from_preset(cfg.preset, vocab_size=vocab_size, eos_token_id=eos_id, bos_token_id=eos_id, **overrides)


def configure_optimizer(params: dict[str, torch.nn.Parameter], cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (not on biases or norm scales).

    The fused kernel (CPU and CUDA) skips a step itself when `found_inf` is set, with no host sync.
    """
    decay = [p for p in params.values() if p.dim() >= 2]
    no_decay = [p for p in params.values() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=device.type in ("cpu", "cuda"))


def token_loss(logits: torch.Tensor, y: torch.Tensor, label_smoothing: float = 0.0, z_loss: float = 0.0) -> torch.Tensor:
    """Mean next-token cross-entropy over the target tokens (y != IGNORE_INDEX). logits (B, T, V), y (B, T).

    z_loss adds z_loss · mean(log Z)², which keeps the softmax normaliser near 1 (PaLM).
    """
    flat, targets = logits.float().flatten(0, 1), y.flatten()
    loss = F.cross_entropy(flat, targets, ignore_index=IGNORE_INDEX, label_smoothing=label_smoothing)
    if z_loss:
        mask = targets != IGNORE_INDEX
        loss = loss + z_loss * (torch.logsumexp(flat, dim=-1)[mask] ** 2).mean()
    return loss


def lm_loss(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, label_smoothing: float = 0.0,
            z_loss: float = 0.0) -> torch.Tensor:
    """The default loss_fn: mean next-token cross-entropy over the micro-batch's target tokens."""
    return token_loss(model(x), y, label_smoothing, z_loss)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class StopRequest:
    """SIGINT / SIGTERM set a flag; the loop finishes its step, saves and returns."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.signal = signum

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def data_fingerprint(data: Path) -> dict[str, Any]:
    """What a resume must find unchanged about the data."""
    if data.is_file():
        return {"pairs_sha256": file_sha256(data)}
    ds = Dataset(data)
    return {"tokenizer_sha256": ds.manifest.get("tokenizer_sha256"),
            "train_tokens": len(ds.tokens("train")), "val_tokens": len(ds.tokens("val"))}


@torch.no_grad()
def evaluate_pairs(model: torch.nn.Module, examples: list[tuple[list[int], list[int]]], token_bytes: np.ndarray,
                   batch_size: int, pad_id: int, dtype: torch.dtype) -> dict[str, Any]:
    """Loss over the completion tokens of held-out pairs (the tokens fine-tuning is scored on)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    nats, tokens, nbytes = 0.0, 0, 0
    for i in range(0, len(examples), batch_size):
        x, y = pad_examples(examples[i:i + batch_size], pad_id)
        with autocast(device, dtype):
            logits = model(x.to(device))
        nats += F.cross_entropy(logits.float().flatten(0, 1), y.flatten().to(device), ignore_index=IGNORE_INDEX,
                                reduction="sum").item()
        kept = y[y != IGNORE_INDEX].numpy()
        tokens += kept.size
        nbytes += int(token_bytes[kept].sum())
    model.train(was_training)
    loss = nats / tokens
    return {"loss": loss, "perplexity": math.exp(loss), "bits_per_byte": nats / (max(nbytes, 1) * math.log(2)),
            "tokens": tokens, "bytes": nbytes}


def _set_dropout(model: GPT, p: float) -> None:
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = p
    model.config.dropout = p
    for block in model.blocks:
        block.attn.dropout = p


def _apply_activation_checkpointing(model: GPT) -> None:
    """Wrap each block so its activations are recomputed in the backward pass (state-dict keys stay the same)."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import apply_activation_checkpointing
    from leangpt.model import Block
    apply_activation_checkpointing(model, check_fn=lambda m: isinstance(m, Block))


def accumulate_gradients(wrapped: torch.nn.Module, loss_fn: LossFn, batches: list[tuple[torch.Tensor, torch.Tensor]],
                         n_targets: int, world: distributed.World, device: torch.device, dtype: torch.dtype,
                         noise_params: list[torch.nn.Parameter] | None = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Forward and backward over this rank's micro-batches; the gradient left in .grad is that of the mean loss
    over all n_targets target tokens of the step (every micro-batch of every rank), whatever the padding.

    Returns this rank's share of that mean loss and, with noise_params, the squared norms of the micro-batches'
    own mean gradients (for the gradient noise scale; rank-local ones only, before any all-reduce).
    """
    loss_sum = torch.zeros((), device=device)
    small_sq: list[torch.Tensor] = []
    prev = None
    for i, (xb, yb) in enumerate(batches):
        n_mb = int((yb != IGNORE_INDEX).sum())
        xb, yb = xb.to(device, non_blocking=True), yb.to(device, non_blocking=True)
        # loss_fn gives the mean over this micro-batch's targets; its weight is its share of the step's targets.
        # Gradient averaging over ranks divides by world.size, which the factor undoes.
        weight = n_mb * world.size / n_targets
        with distributed.gradient_sync(wrapped, i == len(batches) - 1):
            with autocast(device, dtype):
                loss = loss_fn(wrapped, xb, yb)
            (loss * weight).backward()
        loss_sum += loss.detach() * weight
        if noise_params is not None and n_mb and (i < len(batches) - 1 or not world.distributed):
            now = torch.cat([p.grad.flatten() for p in noise_params if p.grad is not None])
            diff = now if prev is None else now - prev
            small_sq.append((diff / weight).square().sum())  # the micro-batch's own mean gradient
            prev = now
    return loss_sum, small_sq


def pick_precision(model: GPT, cfg: TrainConfig, block_size: int, device: torch.device) -> torch.dtype:
    """cfg.precision; "auto" on a CPU whose bf16 matmuls are fast times a training micro-batch both ways.

    bf16 matmul kernels can be 2x faster than fp32 on AVX512-BF16 CPUs while a small model still trains 4x
    slower under bf16 autocast (casts and bf16 element-wise ops dominate), so the whole step is measured once
    per machine and model shape, and cached.
    """
    dtype = resolve_precision(device, cfg.precision)
    if cfg.precision != "auto" or device.type != "cpu" or dtype == torch.float32:
        return dtype
    c = model.config
    key = (machine_key(device, torch.bfloat16) + f"|train-step bf16/fp32|L{c.n_layer} C{c.n_embd} V{c.vocab_size} "
           f"I{c.intermediate_size} B{cfg.batch_size} T{block_size}")

    def measure() -> float:
        x = torch.zeros(cfg.batch_size, block_size, dtype=torch.long, device=device)
        times: dict[torch.dtype, list[float]] = {torch.float32: [], torch.bfloat16: []}
        with torch.random.fork_rng(devices=[]):
            for rep in range(6):
                for dt in times:  # alternate, so that load from other processes hits both alike
                    t0 = time.perf_counter()
                    with autocast(device, dt):
                        logits = model(x)
                    logits.float().mean().backward()
                    if rep:
                        times[dt].append(time.perf_counter() - t0)
        model.zero_grad(set_to_none=True)
        return statistics.median(times[torch.float32]) / statistics.median(times[torch.bfloat16])
    # bf16 also costs precision: take it only when it is clearly faster.
    return torch.bfloat16 if cached(key, measure) > 1.25 else torch.float32


def _compile(model: GPT, per_block: bool, block_size: int, device: torch.device, dtype: torch.dtype) -> None:
    """Compile in place (parameter names unchanged); FSDP-sharded models compile block by block.

    A forward and backward on a dummy batch compile now, so a failure falls back to eager before training.
    """
    modules = list(model.blocks) if per_block else [model]
    for m in modules:
        m.compile()
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), autocast(device, dtype):
            x = torch.zeros(1, block_size, dtype=torch.long, device=device)
            model(x).float().mean().backward()
    except Exception as e:  # inductor raises many kinds (no compiler, unsupported op, ...)
        warnings.warn(f"torch.compile failed, training eagerly instead: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
        for m in modules:
            m._compiled_call_impl = None
    model.zero_grad(set_to_none=True)


def train(cfg: TrainConfig, data_dir: Path, out: Path, init: Path | None = None, overwrite: bool = False,
          loss_fn: LossFn = lm_loss, extra_meta: dict[str, Any] | None = None, progress: bool = True,
          model: GPT | None = None, aux_module: torch.nn.Module | None = None,
          on_step_end: Callable[[GPT], None] | None = None, resume: bool = False,
          tensorboard: Path | None = None) -> dict[str, Any]:
    """Train and write the checkpoint dir `out` (HF model + train_state/). Returns the final metrics.

    data_dir: a dataset dir from `leangpt prepare`, or a JSONL file of {"prompt", "completion"} pairs (the
      loss is then on completion tokens only; needs `init` or `model` for the tokenizer... `init` gives it).
    model: train this model (e.g. a prepared student or a pruned model) instead of building or loading one.
    loss_fn(model, x, y) -> scalar: the MEAN loss over the micro-batch's target tokens, i.e. positions where
      y != IGNORE_INDEX (-100; prompt and padding tokens). The loop weighs each micro-batch by its share of the
      step's target tokens (over all micro-batches and processes), so the accumulated gradient is the gradient
      of the mean over the whole step's targets, with or without padding. `model` is the wrapped model: call it
      as `model(x)` (a DDP wrapper only syncs gradients through its forward).
    aux_module: extra trainable parameters used by loss_fn (e.g. a hidden-state projection): optimized with
      the model and saved in train_state/, not in the HF checkpoint.
    on_step_end(model): called after each optimizer step with the (unwrapped) model, e.g. to re-apply masks.
    resume: continue from the latest train_state/ in out (cfg must come from that state; see main()).
    """
    cfg.validate()
    device = pick_device(cfg.device)
    world = distributed.init(device)
    device = distributed.local_device(device, world)
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True)
    try:
        return _train(cfg, Path(data_dir), Path(out), init, overwrite, loss_fn, extra_meta or {}, progress,
                      model, aux_module, on_step_end, resume, tensorboard, world, device)
    finally:
        if cfg.deterministic:
            torch.use_deterministic_algorithms(False)


def _train(cfg: TrainConfig, data: Path, out: Path, init: Path | None, overwrite: bool, loss_fn: LossFn,
           extra_meta: dict[str, Any], progress: bool, model: GPT | None, aux_module: torch.nn.Module | None,
           on_step_end: Callable[[GPT], None] | None, resume: bool, tensorboard: Path | None,
           world: distributed.World, device: torch.device) -> dict[str, Any]:
    if loss_fn is lm_loss:
        loss_fn = functools.partial(lm_loss, label_smoothing=cfg.label_smoothing, z_loss=cfg.z_loss)
    saved = None
    if resume:
        step_dir = train_state.latest(out)
        saved = train_state.read(step_dir)
    else:
        check_output_dir(out, overwrite)
    seed_everything(cfg.seed)  # same initial weights on every rank
    sft = data.is_file()

    # ---------------------------------------------------------------- tokenizer, model
    if init is not None and model is None:
        model, tokenizer, _ = load_checkpoint(init, device)
        _set_dropout(model, cfg.dropout)
    elif resume:
        tokenizer = TextTokenizer.load(out)
    elif init is not None:
        tokenizer = TextTokenizer.load(init)
    elif sft:
        raise UserError("JSONL prompt/completion data needs --init: the pairs are tokenized with its tokenizer")
    else:
        tokenizer = TextTokenizer.load(data)
    if model is None:
        if saved is not None:
            mc = ModelConfig.from_dict(saved[2]["model_config"])
        else:
            mc = build_model_config(cfg, tokenizer.vocab_size, tokenizer.eos_id)
            hf_model_type(mc)  # fail now, not at the first save, if the options have no HF format
        model = GPT(mc)
    model.to(device).train()
    mc = model.config
    block_size = cfg.block_size or mc.block_size
    if block_size > mc.block_size:
        raise UserError(f"block_size {block_size} exceeds the model's {mc.block_size}")

    dtype = pick_precision(model, cfg, block_size, device)

    # ---------------------------------------------------------------- data
    if sft:
        train_ex, val_ex = load_pairs(data, tokenizer, block_size, cfg.sft_val_fraction, cfg.seed)
        sampler: Any = PairSampler(train_ex, cfg.seed, tokenizer.eos_id)

        def evaluate(max_tokens: int | None) -> dict[str, Any]:
            return evaluate_pairs(model, val_ex, tokenizer.token_bytes, cfg.batch_size, tokenizer.eos_id, dtype)
    else:
        dataset = Dataset(data)
        if dataset.manifest.get("tokenizer_sha256") != tokenizer.sha256():
            source = init or out
            raise UserError(f"{data} was not tokenized with {source}'s tokenizer; run `leangpt prepare --tokenizer {source}`")
        train_tokens, val_tokens = dataset.tokens("train"), dataset.tokens("val")
        for split, toks in (("train", train_tokens), ("val", val_tokens)):
            if len(toks) < block_size + 1:
                raise UserError(f"{split} split has {len(toks)} tokens, fewer than one training window of {block_size + 1}; "
                                f"use more text or a smaller block_size")
        sampler = WindowSampler(train_tokens, block_size, cfg.seed)

        def evaluate(max_tokens: int | None) -> dict[str, Any]:
            return evaluate_tokens(model, val_tokens, tokenizer.token_bytes, block_size, cfg.batch_size, max_tokens)
    fingerprint = data_fingerprint(data)

    # ---------------------------------------------------------------- speed options, parallelism, optimizer
    if cfg.activation_checkpointing:
        _apply_activation_checkpointing(model)
    if cfg.compile:
        _compile(model, world.distributed and cfg.parallel == "fsdp", block_size, device, dtype)
    wrapped = distributed.parallelize(model, cfg.parallel if world.distributed else "none", world, device)
    holder = torch.nn.ModuleDict({"model": model} | ({"aux": aux_module.to(device)} if aux_module is not None else {}))
    params = {n: p for n, p in holder.named_parameters() if p.requires_grad}
    optimizer = configure_optimizer(params, cfg, device)
    full_sd = StateDictOptions(full_state_dict=True, cpu_offload=True)

    # ---------------------------------------------------------------- state (fresh or resumed)
    step, tokens_seen, train_time, history = 0, 0, 0.0, []
    accum = 1 if cfg.batch_schedule == "ramp" else cfg.grad_accum
    noise = NoiseScale()
    torch.manual_seed(cfg.seed + world.rank)  # dropout differs across ranks
    if saved is not None:
        tensors, optim_sd, state, history = saved
        set_state_dict(holder, optimizer, model_state_dict=tensors, optim_state_dict=optim_sd,
                       options=StateDictOptions(full_state_dict=True))
        step, tokens_seen, train_time = state["step"], state["tokens_seen"], state["train_time_s"]
        init = Path(state["init"]) if state.get("init") else None  # provenance of the resumed run
        if cfg.batch_schedule == "noise_scale":  # adapted so far; the other schedules follow cfg
            accum = max(state["grad_accum"], cfg.grad_accum)
        noise.load_state_dict(state["noise_scale"])
        sampler.load_state_dict(state["data_position"])
        rngs = state["rng"]
        train_state.restore_rng(rngs[world.rank % len(rngs)])
        if world.is_main:
            print(f"resuming from {step_dir} (step {step}, {tokens_seen:,} tokens)", file=sys.stderr)

    flops_per_token = train_flops_per_token(model, block_size)
    peak = matmul_peak_flops(device, dtype)
    meta = {"kind": "train", "parent": str(init) if init else None, "data": str(data),
            "train_config": dataclasses.asdict(cfg), **extra_meta}
    written: list[int] = [step] if resume else []  # steps saved by this run into out
    writer = None
    if tensorboard is not None and world.is_main:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise UserError("--tensorboard needs the tensorboard package: pip install 'leangpt[tensorboard]'") from None
        writer = SummaryWriter(str(tensorboard))

    def save(metrics: dict[str, Any]) -> None:
        """Every rank takes part (FSDP gathers shards); rank 0 writes train_state/ then the HF files."""
        sd, osd = get_state_dict(holder, optimizer, options=full_sd)
        rngs = [train_state.capture_rng()]
        if world.distributed:
            rngs = [None] * world.size
            torch.distributed.all_gather_object(rngs, train_state.capture_rng())
        if world.is_main:
            state = {"step": step, "tokens_seen": tokens_seen, "train_time_s": train_time, "grad_accum": accum,
                     "noise_scale": noise.state_dict(), "data_position": sampler.state_dict(), "rng": rngs,
                     "world_size": world.size, "model_config": mc.to_dict(), "data": fingerprint,
                     "train_config": dataclasses.asdict(cfg), "init": str(init) if init else None}
            export = model
            if world.distributed and cfg.parallel == "fsdp":
                export = GPT(mc)
                export.load_state_dict({k[len("model."):]: v for k, v in sd.items() if k.startswith("model.")})
            meta_now = {**meta, "step": step, "metrics": metrics}
            if not written:  # a fresh run's first save replaces out whole (--overwrite)
                with atomic_dir(out) as tmp:
                    train_state.write(tmp, step, sd, osd, state, history, cfg.keep_last)
                    save_checkpoint(tmp, export, tokenizer, meta_now)
                    (tmp / "metrics.jsonl").write_text("".join(json.dumps(h) + "\n" for h in history))
            else:
                train_state.write(out, step, sd, osd, state, history, cfg.keep_last)
                with atomic_dir(out / ".export") as tmp:
                    save_checkpoint(tmp, export, tokenizer, meta_now)
                    (tmp / "metrics.jsonl").write_text("".join(json.dumps(h) + "\n" for h in history))
                for f in (out / ".export").iterdir():  # file by file: train_state/ stays in place
                    os.replace(f, out / f.name)
                (out / ".export").rmdir()
            written.append(step)
        distributed.barrier(world)

    def log(record: dict[str, Any]) -> None:
        history.append(record)
        if writer is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)) and v is not None:
                    writer.add_scalar(k, v, record["step"])

    # ---------------------------------------------------------------- the loop
    bar = tqdm(total=cfg.max_steps, initial=step, desc="train", disable=not progress or not world.is_main,
               dynamic_ncols=True)
    fused = optimizer.defaults.get("fused", False)
    bad_run = torch.zeros((), device=device)  # non-finite steps in a row, kept on the device (no host sync)
    worst_run = torch.zeros((), device=device)
    skipped = torch.zeros((), device=device)
    last: dict[str, Any] = {}
    interrupted = None
    start_time, start_tokens = train_time, tokens_seen  # throughput counts this session only
    with StopRequest() as stop:
        while step < cfg.max_steps:
            lr = cfg.lr_at(step)
            for group in optimizer.param_groups:
                group["lr"] = lr
            if cfg.batch_schedule == "ramp":
                accum = ramp_accum(tokens_seen, cfg.ramp_tokens, 1, cfg.grad_accum)
            t0 = time.perf_counter()
            x, y = sampler.draw(world.size * accum * cfg.batch_size)  # the global batch, same on every rank
            n_targets = int((y != IGNORE_INDEX).sum())  # over all micro-batches and ranks: CPU data, no sync
            measure_noise = cfg.batch_schedule == "noise_scale" and accum > 1
            batches = micro_batches(x, y, cfg.batch_size, world.rank, accum)
            loss_sum, small_sq = accumulate_gradients(wrapped, loss_fn, batches, n_targets, world, device, dtype,
                                                      list(params.values()) if measure_noise else None)
            if aux_module is not None:
                distributed.average_grads(aux_module, world)
            grad_norm = torch.nn.utils.clip_grad_norm_(list(params.values()), cfg.grad_clip if cfg.grad_clip > 0 else math.inf)
            if isinstance(grad_norm, DTensor):
                grad_norm = grad_norm.full_tensor()
            bad = (~torch.isfinite(grad_norm)).float()
            if fused:
                optimizer.found_inf = bad  # the fused step skips itself when the gradient is not finite
                optimizer.step()
            elif not bad.item():  # foreach fallback: one host sync per step
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if on_step_end is not None:
                on_step_end(model)
            bad_run = (bad_run + 1) * bad
            worst_run = torch.maximum(worst_run, bad_run)
            skipped += bad
            if measure_noise and small_sq:
                big_sq = float(grad_norm) ** 2  # norm before clipping, of the mean gradient over the step
                noise.update(float(torch.stack(small_sq).mean()), big_sq, cfg.batch_size, cfg.batch_size * accum * world.size)
                if noise.updates >= 10:  # the EMA needs a few steps before it means anything
                    accum = noise_scale_accum(noise.estimate, accum, cfg.batch_size * world.size, cfg.max_grad_accum)
            step += 1
            tokens_seen += n_targets
            logging_now = step % cfg.log_every == 0 or step == cfg.max_steps
            if logging_now:
                if world.distributed:
                    torch.distributed.all_reduce(loss_sum)  # each rank holds its share of the step's mean
                train_loss = float(loss_sum) / world.size  # host sync only when logging
                if int(worst_run) >= cfg.max_bad_steps:
                    raise UserError(f"{int(worst_run)} steps in a row had a non-finite loss or gradient (skipped); "
                                    f"stopping at step {step}: lower lr, raise warmup_steps or set grad_clip")
            train_time += time.perf_counter() - t0
            if logging_now:
                tps = (tokens_seen - start_tokens) / max(train_time - start_time, 1e-9)
                last = {"step": step, "train_loss": train_loss, "lr": lr, "grad_norm": float(grad_norm),
                        "tokens": tokens_seen, "tokens_per_s": tps, "mfu": tps * flops_per_token / peak,
                        "grad_accum": accum, "skipped_steps": int(skipped)}
                if noise.estimate is not None:
                    last["noise_scale"] = noise.estimate
                log(last)
                bar.set_postfix(loss=f"{train_loss:.3f}", lr=f"{lr:.2e}", tok_s=f"{tps:,.0f}", mfu=f"{last['mfu']:.0%}")
            if cfg.eval_every and step % cfg.eval_every == 0 and step != cfg.max_steps:
                ev = evaluate(cfg.eval_tokens)
                log({"step": step, "val_loss": ev["loss"], "val_bits_per_byte": ev["bits_per_byte"]})
                bar.write(f"step {step}: val loss {ev['loss']:.4f}, bits/byte {ev['bits_per_byte']:.4f}")
            bar.update(1)
            if distributed.any_rank(stop.signal is not None, world, device) and step != cfg.max_steps:
                interrupted = signal.Signals(stop.signal).name if stop.signal else "signal on another rank"
                break
            if cfg.save_every and step % cfg.save_every == 0 and step != cfg.max_steps:
                save(last)
    bar.close()

    if interrupted:
        save({**last, "interrupted": interrupted})
        if writer is not None:
            writer.close()
        print(f"{interrupted}: saved step {step} to {out}; continue with --resume", file=sys.stderr)
        return {**last, "step": step, "interrupted": interrupted}
    ev = evaluate(cfg.eval_tokens)
    final = {**last, "val_loss": ev["loss"], "val_perplexity": ev["perplexity"],
             "val_bits_per_byte": ev["bits_per_byte"], "val_tokens_scored": ev["tokens"],
             "train_time_s": train_time, "params": model.num_params(), "peak_flops": peak,
             "compute_dtype": str(dtype).removeprefix("torch."), "world_size": world.size}
    log({"step": step, "val_loss": ev["loss"], "val_bits_per_byte": ev["bits_per_byte"]})
    save(final)
    if writer is not None:
        writer.close()
    return final


def build_parser() -> cli.ArgumentParser:
    p = cli.parser("train", "Pretrain a GPT on a prepared dataset, or fine-tune a checkpoint (--init). "
                            "Settings come from --preset, then --config, then --set.")
    p.add_argument("--data", type=Path, required=True,
                   help="dataset directory made by `leangpt prepare`, or a JSONL file of prompt/completion pairs "
                        "(fine-tuning with the loss on completion tokens; needs --init)")
    p.add_argument("--out", type=Path, required=True, help="checkpoint directory to write (a Hugging Face model dir)")
    p.add_argument("--preset", help="model preset: tiny, small-cpu, gpt2, gpt2-medium, gpt2-large, gpt2-xl")
    p.add_argument("--init", type=Path, help="start from this checkpoint (any HF GPT-2 / llama dir) instead of random weights")
    p.add_argument("--resume", action="store_true",
                   help="continue the run saved in --out (its train_state/) with its settings; --set may change "
                        "training settings such as max_steps, not the model or the data")
    p.add_argument("--nproc", type=int, help="launch N processes on this machine with torchrun (data parallel)")
    p.add_argument("--tensorboard", type=Path, metavar="DIR", help="also write TensorBoard event files to DIR")
    cli.add_overrides(p)
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    p.add_argument("--json", action="store_true", help="print final metrics as one JSON object on stdout")
    return p


def _resume_config(args: Any) -> TrainConfig:
    """The saved run's settings plus --config / --set; the model and the data must not change."""
    state = train_state.read_state(train_state.latest(args.out))
    if args.init or args.preset:
        raise UserError("--resume continues the saved model; drop --init / --preset")
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    cfg = TrainConfig(**{k: v for k, v in state["train_config"].items() if k in known})
    before = dict(cfg.model)
    cli.apply_overrides(cfg, args.config, args.overrides)
    if cfg.model != before:
        changed = sorted(k for k in set(cfg.model) | set(before) if cfg.model.get(k) != before.get(k))
        raise UserError(f"--resume: model config differs from the saved run (model.{changed[0]}); "
                        f"the model cannot change in a resumed run")
    saved_data, now = state["data"], data_fingerprint(args.data)
    for key in saved_data:
        if saved_data[key] != now.get(key):
            raise UserError(f"--resume: dataset {args.data} differs from the saved run's ({key}: "
                            f"{now.get(key)} now, {saved_data[key]} saved)")
    return cfg


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.nproc is not None and "RANK" not in os.environ:
        if args.nproc < 1:
            raise UserError("--nproc must be >= 1")
        argv = list(sys.argv[2:] if argv is None else argv)
        i = next(i for i, a in enumerate(argv) if a.startswith("--nproc"))
        return distributed.launch(args.nproc, argv[:i] + argv[i + (1 if "=" in argv[i] else 2):])
    if args.resume:
        cfg = _resume_config(args)
    else:
        cfg = TrainConfig()
        if args.preset:
            cfg.preset = args.preset
        cli.apply_overrides(cfg, args.config, args.overrides)
        if args.init and (args.preset or cfg.model):
            raise UserError("--init takes the architecture from the checkpoint; drop --preset / model.* settings")
        if not args.init:
            ModelConfig.from_preset(cfg.preset)  # unknown preset fails before any work
    try:
        final = train(cfg, args.data, args.out, init=args.init, overwrite=args.overwrite, resume=args.resume,
                      tensorboard=args.tensorboard)
    finally:
        distributed.shutdown()
    if not distributed.is_main_process():
        return 0
    result = {"checkpoint": str(args.out), **final}
    if args.json:
        cli.print_json(result)
    elif "interrupted" not in final:
        cli.log(f"saved {args.out}: val loss {final['val_loss']:.4f}, bits/byte {final['val_bits_per_byte']:.4f}, "
                f"{final['tokens_per_s']:,.0f} tokens/s, MFU {final['mfu']:.1%}")
    return 0
