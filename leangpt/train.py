"""`leangpt train`: pretrain a GPT from scratch or fine-tune a checkpoint. The loop is written out below.

What decides correctness exists once and is shared by distill and prune, which pass a loss, a model and hooks
into `train`: the loss over target tokens and gradient accumulation (train_step.py), the data and its val loss
(train_data.py), checkpoint I/O (checkpointing.py, train_state.py) and the checks that a resumed run still
has its data and its model.
"""

from __future__ import annotations

import dataclasses
import functools
import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

import numpy as np
import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict
from tqdm import tqdm

from leangpt import cli, distributed, train_state
from leangpt.checkpoint import load_checkpoint
from leangpt.checkpointing import Checkpointer
from leangpt.cli import setting
from leangpt.config import ModelConfig
from leangpt.data.batches import IGNORE_INDEX, micro_batches
from leangpt.data.tokenizer import TextTokenizer
from leangpt.device import pick_device
from leangpt.errors import UserError
from leangpt.fsutil import check_output_dir
from leangpt.hf import hf_model_type
from leangpt.interrupt import StopRequest
from leangpt.model import GPT
from leangpt.perf import matmul_peak_flops, train_flops_per_token
from leangpt.schedules import BATCH_SCHEDULES, LR_SCHEDULES, NoiseScale, learning_rate, noise_scale_accum, ramp_accum
from leangpt.train_data import TrainData, data_fingerprint, load_data
from leangpt.train_speed import apply_activation_checkpointing, compile_model, pick_precision
from leangpt.train_step import (OPTIMIZERS, LossFn, accumulate_gradients, clipped_step, configure_optimizer, lm_loss,
                                schedule_optimizers)

PRECISIONS = ("auto", "fp32", "bf16")
Settings = TypeVar("Settings", bound="TrainConfig")


@dataclass
class TrainConfig:
    preset: str = setting("cpu-5min", "model preset when training from scratch: cpu-5min (the main job's), "
                                      "tiny, tiny-qwen3, small-cpu, small-cpu-qwen3, gpt2, gpt2-medium, gpt2-large, "
                                      "gpt2-xl")
    model: dict[str, Any] = setting({}, "model config overrides over the preset, e.g. model.n_layer=4",
                                    schema=ModelConfig)
    batch_size: int = setting(16, "sequences per micro-batch (per process)")
    block_size: int | None = setting(None, "context length (default: the model's)")
    grad_accum: int = setting(1, "micro-batches per optimizer step (per process)")
    max_steps: int = setting(1000, "optimizer steps")
    lr: float = setting(3e-3, "peak learning rate (AdamW's; with optimizer=muon, of what Muon does not take)")
    lr_schedule: str = setting("cosine", "learning-rate schedule after the warmup", choices=LR_SCHEDULES)
    min_lr_ratio: float = setting(0.1, "cosine / wsd decay to lr * min_lr_ratio")
    warmup_steps: int | None = setting(None, "linear warmup steps (default: max_steps / 20, at least 1)")
    decay_fraction: float = setting(0.2, "wsd: share of max_steps spent in the final decay")
    batch_schedule: str = setting("constant", "batch size over the run, through grad_accum: ramp grows it with the "
                                              "tokens seen, noise_scale with the gradient noise scale",
                                  choices=BATCH_SCHEDULES)
    ramp_tokens: int = setting(0, "ramp: tokens over which grad_accum grows from 1 to grad_accum")
    max_grad_accum: int = setting(64, "noise_scale: upper bound on grad_accum")
    optimizer: str = setting("muon", "muon: Muon for the blocks' matrices and AdamW for the rest; or adamw",
                             choices=OPTIMIZERS)
    weight_decay: float = setting(0.1, "AdamW weight decay (on matrices only)")
    beta1: float = setting(0.9, "AdamW beta1")
    beta2: float = setting(0.95, "AdamW beta2")
    muon_lr: float = setting(0.02, "Muon's peak learning rate (the schedule scales it as it scales lr)")
    muon_momentum: float = setting(0.95, "Muon's (Nesterov) momentum after its warmup")
    muon_momentum_warmup: int = setting(300, "steps over which Muon's momentum rises from 0.85 to muon_momentum")
    muon_weight_decay: float = setting(0.0, "Muon's decoupled weight decay (times its lr)")
    grad_clip: float = setting(1.0, "max global gradient norm; 0 disables clipping")
    dropout: float = setting(0.0, "dropout probability")
    label_smoothing: float = setting(0.0, "label smoothing of the cross-entropy")
    z_loss: float = setting(0.0, "weight of PaLM's z-loss, mean of log(Z)^2 over targets")
    eval_every: int = setting(100, "steps between val evaluations; 0 evaluates only at the end")
    eval_tokens: int = setting(65536, "val tokens scored at each evaluation, periodic and final")
    save_every: int = setting(0, "steps between checkpoints; 0 saves only at the end (and on SIGINT / SIGTERM)")
    keep_last: int = setting(2, "train_state/ step directories kept")
    log_every: int = setting(10, "steps between records in metrics.jsonl")
    max_bad_steps: int = setting(5, "stop after this many non-finite steps in a row (each is skipped)")
    seed: int = setting(1337, "seed of the initial weights, the data order and dropout")
    device: str = setting("auto", "auto, cpu, cuda, cuda:1, ...")
    parallel: str = setting("ddp", "data parallelism under torchrun; ignored in a single process",
                            choices=distributed.PARALLEL_MODES)
    precision: str = setting("auto", "auto: bf16 where measured faster than fp32", choices=PRECISIONS)
    compile: bool = setting(False, "torch.compile the model (falls back to eager with a warning)")
    activation_checkpointing: bool = setting(False, "recompute each block in the backward pass: less memory, more time")
    deterministic: bool = setting(False, "torch.use_deterministic_algorithms: bitwise-reproducible runs and resumes")
    sft_val_fraction: float = setting(0.1, "JSONL pairs held out for validation")

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
            (self.optimizer in OPTIMIZERS, f"optimizer must be one of {', '.join(OPTIMIZERS)}"),
            (self.muon_lr > 0 and self.muon_weight_decay >= 0, "muon_lr must be > 0 and muon_weight_decay >= 0"),
            (0 <= self.muon_momentum < 1, "muon_momentum must be in [0, 1)"),
            (self.muon_momentum_warmup >= 0, "muon_momentum_warmup must be >= 0"),
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
            (self.precision in PRECISIONS, f"precision must be one of {', '.join(PRECISIONS)}"),
            (0 <= self.sft_val_fraction < 1, "sft_val_fraction must be in [0, 1)"),
        ]
        for ok, message in checks:
            if not ok:
                raise UserError(f"bad setting: {message}")
        if self.batch_schedule == "noise_scale" and self.parallel == "fsdp":
            raise UserError("bad setting: batch_schedule=noise_scale needs per-micro-batch gradients; use parallel=ddp")
        if self.optimizer == "muon" and self.parallel == "fsdp":
            raise UserError("bad setting: optimizer=muon orthogonalises whole matrices, which FSDP shards; "
                            "use parallel=ddp, or optimizer=adamw with FSDP")

    @classmethod
    def from_settings(cls: type[Settings], settings: Any) -> Settings:
        """The training settings held in a command's larger settings (what train() takes and train_state/ records)."""
        return cls(**{f.name: getattr(settings, f.name) for f in dataclasses.fields(cls)})

    @property
    def warmup(self) -> int:
        return self.warmup_steps if self.warmup_steps is not None else max(1, self.max_steps // 20)

    def lr_at(self, step: int, peak: float | None = None) -> float:
        """The scheduled learning rate at step, for a peak of lr (or of another group's, e.g. muon_lr)."""
        peak = self.lr if peak is None else peak
        decay = round(self.decay_fraction * self.max_steps)
        return learning_rate(self.lr_schedule, step, self.max_steps, self.warmup, decay, peak, peak * self.min_lr_ratio)


def build_model_config(cfg: TrainConfig, vocab_size: int, eos_id: int) -> ModelConfig:
    """The preset with cfg.model's overrides, the tokenizer's vocabulary and cfg.dropout."""
    return ModelConfig.from_preset(cfg.preset, vocab_size=vocab_size, eos_token_id=eos_id, bos_token_id=eos_id,
                                   **{"dropout": cfg.dropout, **cfg.model})


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# ---------------------------------------------------------------- the run: what the loop reads and updates

@dataclass
class Run:
    """The model, its optimizer and data, and the counters a save records and a resume restores."""

    cfg: TrainConfig
    world: distributed.World
    device: torch.device
    dtype: torch.dtype
    block_size: int
    model: GPT  # unwrapped: what is saved, evaluated and handed to on_step_end
    wrapped: torch.nn.Module  # what loss_fn calls (the DDP wrapper, or the model)
    holder: torch.nn.ModuleDict  # every trained module: "model", and "aux" when given
    params: list[torch.nn.Parameter]  # the trainable ones
    optimizers: list[torch.optim.Optimizer]  # AdamW, and Muon with optimizer=muon
    data: TrainData
    checkpointer: Checkpointer
    peak_flops: float  # the measured matmul peak that MFU is reported against
    step: int = 0
    tokens_seen: int = 0
    train_time_s: float = 0.0
    grad_accum: int = 1
    noise: NoiseScale = field(default_factory=NoiseScale)
    history: list[dict[str, Any]] = field(default_factory=list)

    def state(self) -> dict[str, Any]:
        return {"step": self.step, "tokens_seen": self.tokens_seen, "train_time_s": self.train_time_s,
                "grad_accum": self.grad_accum, "noise_scale": self.noise.state_dict(),
                "data_position": self.data.sampler.state_dict(), "world_size": self.world.size}

    def restore(self, tensors: dict[str, torch.Tensor], optim_state: dict[str, Any], state: dict[str, Any],
                history: list[dict[str, Any]]) -> None:
        set_state_dict(self.holder, self.optimizers, model_state_dict=tensors, optim_state_dict=optim_state,
                       options=StateDictOptions(full_state_dict=True))
        self.step, self.tokens_seen, self.train_time_s = state["step"], state["tokens_seen"], state["train_time_s"]
        if self.cfg.batch_schedule == "noise_scale":  # adapted so far; the other schedules follow cfg
            self.grad_accum = max(state["grad_accum"], self.cfg.grad_accum)
        self.noise.load_state_dict(state["noise_scale"])
        self.data.sampler.load_state_dict(state["data_position"])
        self.history = history
        rngs = state["rng"]
        train_state.restore_rng(rngs[self.world.rank % len(rngs)])

    def save(self, metrics: dict[str, Any]) -> None:
        self.checkpointer.save(self.holder, self.optimizers, self.model, self.state(), self.history, metrics)

    def evaluate(self) -> dict[str, Any]:
        return self.data.score(self.model, self.cfg.eval_tokens)


class RunLog:
    """The records of metrics.jsonl (saved with every checkpoint), TensorBoard scalars and the progress bar."""

    def __init__(self, run: Run, tensorboard: Path | None, progress: bool) -> None:
        self.history = run.history
        self.writer = None
        if tensorboard is not None and run.world.is_main:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise UserError("--tensorboard needs the tensorboard package: pip install 'leangpt[tensorboard]'") from None
            self.writer = SummaryWriter(str(tensorboard))
        self.bar = tqdm(total=run.cfg.max_steps, initial=run.step, desc="train", dynamic_ncols=True,
                        disable=not progress or not run.world.is_main)

    def record(self, record: dict[str, Any]) -> None:
        self.history.append(record)
        if self.writer is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.writer.add_scalar(k, v, record["step"])

    def step(self, record: dict[str, Any]) -> None:
        self.record(record)
        self.bar.set_postfix(loss=f"{record['train_loss']:.3f}", lr=f"{record['lr']:.2e}",
                             tok_s=f"{record['tokens_per_s']:,.0f}", mfu=f"{record['mfu']:.0%}")

    def evaluation(self, step: int, ev: dict[str, Any], show: bool = True) -> None:
        self.record({"step": step, "val_loss": ev["loss"], "val_bits_per_byte": ev["bits_per_byte"]})
        if show:
            self.bar.write(f"step {step}: val loss {ev['loss']:.4f}, bits/byte {ev['bits_per_byte']:.4f}")

    def close(self) -> None:
        """Flush the TensorBoard files (the bar is closed when the loop ends)."""
        if self.writer is not None:
            self.writer.close()


class BadSteps:
    """Steps whose gradient was not finite (each one skipped), counted on the device: no host sync per step."""

    def __init__(self, device: torch.device) -> None:
        self.in_a_row = torch.zeros((), device=device)
        self.worst = torch.zeros((), device=device)
        self.skipped = torch.zeros((), device=device)

    def add(self, bad: torch.Tensor) -> None:
        self.in_a_row = (self.in_a_row + 1) * bad
        self.worst = torch.maximum(self.worst, self.in_a_row)
        self.skipped += bad

    def check(self, limit: int, step: int) -> None:
        if int(self.worst) >= limit:
            raise UserError(f"{int(self.worst)} steps in a row had a non-finite loss or gradient (skipped); "
                            f"stopping at step {step}: lower lr, raise warmup_steps or set grad_clip")


# ---------------------------------------------------------------- train: set up, then the loop

def train(cfg: TrainConfig, data: Path, out: Path, init: Path | None = None, overwrite: bool = False,
          loss_fn: LossFn = lm_loss, extra_meta: dict[str, Any] | None = None, progress: bool = True,
          model: GPT | None = None, aux_module: torch.nn.Module | None = None,
          on_step_end: Callable[[GPT], None] | None = None, resume: bool = False,
          tensorboard: Path | None = None) -> dict[str, Any]:
    """Train and write the checkpoint dir `out` (HF model + train_state/). Returns the final metrics.

    data: a dataset dir from `leangpt prepare`, or a JSONL file of {"prompt", "completion"} pairs (the loss is
      then on completion tokens only; needs `init`, whose tokenizer encodes them).
    model: train this model (e.g. a prepared student or a pruned model) instead of building or loading one.
    loss_fn(model, x, y) -> scalar: the MEAN loss over the micro-batch's target tokens, i.e. positions where
      y != IGNORE_INDEX (-100; prompt and padding tokens). The loop weighs each micro-batch by its share of the
      step's target tokens (over all micro-batches and processes), so the accumulated gradient is the gradient
      of the mean over the whole step's targets, with or without padding. `model` is the wrapped model: call it
      as `model(x)` (a DDP wrapper only syncs gradients through its forward).
    aux_module: extra trainable parameters used by loss_fn (e.g. a hidden-state projection): optimized with
      the model and saved in train_state/, not in the HF checkpoint.
    on_step_end(model): called after each optimizer step with the (unwrapped) model, e.g. to re-apply masks.
    resume: continue from the latest train_state/ in out. cfg may change training settings (max_steps, lr,
      ...); a different dataset, model or tokenizer is refused with one line naming the difference.
    """
    cfg.validate()
    data, out = Path(data), Path(out)
    if loss_fn is lm_loss:
        loss_fn = functools.partial(lm_loss, label_smoothing=cfg.label_smoothing, z_loss=cfg.z_loss)
    device = pick_device(cfg.device)
    world = distributed.init(device)
    device = distributed.local_device(device, world)
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True)
    try:
        run = _start(cfg, data, out, init, overwrite, resume, model, aux_module, extra_meta or {}, world, device)
        return _loop(run, loss_fn, on_step_end, RunLog(run, tensorboard, progress))
    finally:
        if cfg.deterministic:
            torch.use_deterministic_algorithms(False)


class SavedRun(NamedTuple):
    step_dir: Path
    tensors: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    state: dict[str, Any]
    history: list[dict[str, Any]]


def _start(cfg: TrainConfig, data: Path, out: Path, init: Path | None, overwrite: bool, resume: bool,
           model: GPT | None, aux_module: torch.nn.Module | None, extra_meta: dict[str, Any],
           world: distributed.World, device: torch.device) -> Run:
    """The run ready for its first step: fresh, or restored from out's train_state/ after the resume checks."""
    saved = _read_saved_run(out, resume, overwrite, init)
    fingerprint = data_fingerprint(data)
    parent = init
    if saved is not None:
        train_state.check_resumable(saved.state, data, fingerprint, dataclasses.asdict(cfg),
                                    None if model is None else model.config.to_dict())
        parent = Path(saved.state["init"]) if saved.state.get("init") else None  # provenance of the resumed run
    seed_everything(cfg.seed)  # same initial weights on every rank
    model, tokenizer, tokenizer_source = _model_and_tokenizer(cfg, data, out, init, model, saved, device)
    block_size = cfg.block_size or model.config.block_size
    if block_size > model.config.block_size:
        raise UserError(f"block_size {block_size} exceeds the model's {model.config.block_size}")
    dtype = pick_precision(model, cfg.precision, cfg.batch_size, block_size, device)
    train_data = load_data(data, tokenizer, tokenizer_source, block_size, cfg.batch_size, cfg.seed,
                           cfg.sft_val_fraction)
    wrapped, holder = _prepare_model(model, aux_module, cfg, world, device, block_size, dtype)
    params = {n: p for n, p in holder.named_parameters() if p.requires_grad}
    optimizers = configure_optimizer(params, cfg, device, dtype)
    meta = {"kind": "train", "parent": str(parent) if parent else None, "data": str(data),
            "train_config": dataclasses.asdict(cfg), **extra_meta}
    run_state = {"model_config": model.config.to_dict(), "data": fingerprint,
                 "train_config": dataclasses.asdict(cfg), "init": str(parent) if parent else None}
    checkpointer = Checkpointer(out, tokenizer, cfg.keep_last, world, world.distributed and cfg.parallel == "fsdp",
                                meta, run_state, resumed=saved is not None)
    peak = matmul_peak_flops(device, dtype)  # measured before the seed below, so that it never moves the RNG
    run = Run(cfg, world, device, dtype, block_size, model, wrapped, holder, list(params.values()), optimizers,
              train_data, checkpointer, peak, grad_accum=1 if cfg.batch_schedule == "ramp" else cfg.grad_accum)
    torch.manual_seed(cfg.seed + world.rank)  # dropout differs across ranks
    if saved is not None:
        run.restore(saved.tensors, saved.optimizer, saved.state, saved.history)
        if world.is_main:
            print(f"resuming from {saved.step_dir} (step {run.step}, {run.tokens_seen:,} tokens)", file=sys.stderr)
    return run


def _read_saved_run(out: Path, resume: bool, overwrite: bool, init: Path | None) -> SavedRun | None:
    """With resume, the latest train_state/ step of out; otherwise None, once out is known to be writable."""
    if not resume:
        check_output_dir(out, overwrite)
        return None
    if init is not None:
        raise UserError("--resume continues the saved run's model; drop --init")
    step_dir = train_state.latest(out)
    return SavedRun(step_dir, *train_state.read(step_dir))


def _model_and_tokenizer(cfg: TrainConfig, data: Path, out: Path, init: Path | None, model: GPT | None,
                         saved: SavedRun | None, device: torch.device) -> tuple[GPT, TextTokenizer, Path]:
    """The model to train (given, loaded from init, or built; its weights come from train_state/ on resume) and
    the run's tokenizer, with the directory it came from (named when the data does not match it)."""
    if init is not None and model is None:
        model, tokenizer, _ = load_checkpoint(init, device)
        _set_dropout(model, cfg.dropout)
        return model.to(device).train(), tokenizer, init
    if saved is not None:
        tokenizer, source = TextTokenizer.load(out), out
    elif init is not None:
        tokenizer, source = TextTokenizer.load(init), init
    elif data.is_file():
        raise UserError("JSONL prompt/completion data needs --init: the pairs are tokenized with its tokenizer")
    else:
        tokenizer, source = TextTokenizer.load(data), out
    if model is None:
        if saved is not None:
            mc = ModelConfig.from_dict(saved.state["model_config"])
        else:
            mc = build_model_config(cfg, tokenizer.vocab_size, tokenizer.eos_id)
            hf_model_type(mc)  # fail now, not at the first save, if the options have no HF format
        model = GPT(mc)
    return model.to(device).train(), tokenizer, source


def _set_dropout(model: GPT, p: float) -> None:
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = p
    model.config.dropout = p
    for block in model.blocks:
        block.attn.dropout = p


def _prepare_model(model: GPT, aux_module: torch.nn.Module | None, cfg: TrainConfig, world: distributed.World,
                   device: torch.device, block_size: int,
                   dtype: torch.dtype) -> tuple[torch.nn.Module, torch.nn.ModuleDict]:
    """Speed options, then data parallelism. Returns what the loss calls and every module to train and save."""
    if cfg.activation_checkpointing:
        apply_activation_checkpointing(model)
    if cfg.compile:
        compile_model(model, world.distributed and cfg.parallel == "fsdp", block_size, device, dtype)
    wrapped = distributed.parallelize(model, cfg.parallel if world.distributed else "none", world, device)
    modules = {"model": model} | ({"aux": aux_module.to(device)} if aux_module is not None else {})
    return wrapped, torch.nn.ModuleDict(modules)


def _loop(run: Run, loss_fn: LossFn, on_step_end: Callable[[GPT], None] | None, log: RunLog) -> dict[str, Any]:
    """Step until max_steps (or a signal), logging, evaluating and saving on the way; returns the final metrics."""
    cfg, world = run.cfg, run.world
    flops_per_token = train_flops_per_token(run.model, run.block_size)
    bad_steps = BadSteps(run.device)
    last: dict[str, Any] = {}
    start_time, start_tokens = run.train_time_s, run.tokens_seen  # throughput counts this session only
    interrupted = None
    with StopRequest() as stop:
        while run.step < cfg.max_steps:
            lr = schedule_optimizers(run.optimizers, cfg, run.step)
            if cfg.batch_schedule == "ramp":
                run.grad_accum = ramp_accum(run.tokens_seen, cfg.ramp_tokens, 1, cfg.grad_accum)
            t0 = time.perf_counter()
            loss_sum, grad_norm = _step(run, loss_fn, on_step_end, bad_steps)
            logging_now = run.step % cfg.log_every == 0 or run.step == cfg.max_steps
            if logging_now:
                if world.distributed:
                    torch.distributed.all_reduce(loss_sum)  # each rank holds its share of the step's mean
                train_loss = float(loss_sum) / world.size  # host sync only when logging
                bad_steps.check(cfg.max_bad_steps, run.step)
            run.train_time_s += time.perf_counter() - t0
            if logging_now:
                tps = (run.tokens_seen - start_tokens) / max(run.train_time_s - start_time, 1e-9)
                last = {"step": run.step, "train_loss": train_loss, "lr": lr, "grad_norm": float(grad_norm),
                        "tokens": run.tokens_seen, "tokens_per_s": tps, "mfu": tps * flops_per_token / run.peak_flops,
                        "grad_accum": run.grad_accum, "skipped_steps": int(bad_steps.skipped)}
                if run.noise.estimate is not None:
                    last["noise_scale"] = run.noise.estimate
                log.step(last)
            if cfg.eval_every and run.step % cfg.eval_every == 0 and run.step != cfg.max_steps:
                log.evaluation(run.step, run.evaluate())
            log.bar.update(1)
            if distributed.any_rank(stop.signal is not None, world, run.device) and run.step != cfg.max_steps:
                interrupted = stop.name
                break
            if cfg.save_every and run.step % cfg.save_every == 0 and run.step != cfg.max_steps:
                run.save(last)
    log.bar.close()
    return _finish(run, log, last, interrupted)


def _step(run: Run, loss_fn: LossFn, on_step_end: Callable[[GPT], None] | None,
          bad_steps: BadSteps) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step on the next global batch; returns this rank's share of its mean loss, and the
    gradient norm before clipping (both still on the device)."""
    cfg, world = run.cfg, run.world
    x, y = run.data.sampler.draw(world.size * run.grad_accum * cfg.batch_size)  # the global batch, on every rank
    n_targets = int((y != IGNORE_INDEX).sum())  # over all micro-batches and ranks: CPU data, no sync
    measure_noise = cfg.batch_schedule == "noise_scale" and run.grad_accum > 1
    batches = micro_batches(x, y, cfg.batch_size, world.rank, run.grad_accum)
    loss_sum, small_sq = accumulate_gradients(run.wrapped, loss_fn, batches, n_targets, world, run.device, run.dtype,
                                              run.params if measure_noise else None)
    if "aux" in run.holder:
        distributed.average_grads(run.holder["aux"], world)
    grad_norm, bad = clipped_step(run.optimizers, run.params, cfg.grad_clip)
    if on_step_end is not None:
        on_step_end(run.model)
    bad_steps.add(bad)
    if measure_noise and small_sq:
        big_sq = float(grad_norm) ** 2  # norm before clipping, of the mean gradient over the step
        seqs = cfg.batch_size * world.size
        run.noise.update(float(torch.stack(small_sq).mean()), big_sq, cfg.batch_size, seqs * run.grad_accum)
        if run.noise.updates >= 10:  # the EMA needs a few steps before it means anything
            run.grad_accum = noise_scale_accum(run.noise.estimate, run.grad_accum, seqs, cfg.max_grad_accum)
    run.step += 1
    run.tokens_seen += n_targets
    return loss_sum, grad_norm


def _finish(run: Run, log: RunLog, last: dict[str, Any], interrupted: str | None) -> dict[str, Any]:
    """Save the interrupted run as it is, or evaluate and save the finished one; returns the final metrics."""
    if interrupted:
        run.save({**last, "interrupted": interrupted})
        log.close()
        print(f"{interrupted}: saved step {run.step} to {run.checkpointer.out}; continue with --resume", file=sys.stderr)
        return {**last, "step": run.step, "interrupted": interrupted}
    ev = run.evaluate()
    final = {**last, "val_loss": ev["loss"], "val_perplexity": ev["perplexity"],
             "val_bits_per_byte": ev["bits_per_byte"], "val_tokens_scored": ev["tokens"],
             "train_time_s": run.train_time_s, "params": run.model.num_params(), "peak_flops": run.peak_flops,
             "compute_dtype": str(run.dtype).removeprefix("torch."), "world_size": run.world.size}
    log.evaluation(run.step, ev, show=False)
    run.save(final)
    log.close()
    return final


# ---------------------------------------------------------------- the command

@dataclass
class _CommandFields:
    """What to train on, where to write and how to start (a base of TrainCommand: first in --help)."""

    data: Path | None = setting(None, "dataset directory made by `leangpt prepare`, or a JSONL file of "
                                      "prompt/completion pairs (fine-tuning with the loss on completion tokens; "
                                      "needs --init)", required=True)
    out: Path | None = setting(None, "checkpoint directory to write (a Hugging Face model dir)", required=True)
    init: Path | None = setting(None, "start from this checkpoint (any HF GPT-2 / llama dir) instead of random weights")
    resume: bool = setting(False, "continue the run saved in --out (its train_state/) with its settings; --set may "
                                  "change training settings such as max_steps, not the model or the data")
    nproc: int | None = setting(None, "launch N processes on this machine with torchrun (data parallel)", metavar="N")
    tensorboard: Path | None = setting(None, "also write TensorBoard event files to DIR", metavar="DIR")
    overwrite: bool = setting(False, "replace an existing output directory")
    progress: bool = setting(True, "show a progress bar on stderr", cli=False)


@dataclass
class TrainCommand(TrainConfig, _CommandFields):
    """`leangpt train`: the training settings plus what to train on, where to write and how to start."""

    def validate(self) -> None:
        super().validate()
        if self.nproc is not None and self.nproc < 1:
            raise UserError("--nproc must be >= 1")
        if self.init is not None and not self.resume and (self.preset != TrainConfig.preset or self.model):
            raise UserError("--init takes the architecture from the checkpoint; drop --preset / model.* settings")
        if self.init is None:
            ModelConfig.from_preset(self.preset)  # an unknown preset fails before any work


def parse_training_command(p: cli.ArgumentParser, argv: list[str] | None) -> tuple[Any, cli.Output]:
    """A training command's settings: the command line over the defaults or, with --resume, over the settings
    the run in --out was saved with (so that --set changes only what it names)."""
    given = vars(p.parse_args(argv))
    probe = cli.apply_overrides(p.settings_cls(), given.get("config"), given.get("overrides", []))
    out = given.get("out") or probe.out
    base = None
    if (given.get("resume") or probe.resume) and out is not None and train_state.step_dirs(Path(out)):
        base = train_state.saved_settings(Path(out), p.settings_cls)
    return cli.parse(p, argv, settings=base)


def build_parser() -> cli.ArgumentParser:
    return cli.build_parser(TrainCommand, "train", "Pretrain a GPT on a prepared dataset, or fine-tune a checkpoint "
                                                   "(--init). Settings come from --preset, then --config, then --set.")


def main(argv: list[str] | None = None) -> int:
    s, output = parse_training_command(build_parser(), argv)
    if s.nproc is not None and not distributed.under_torchrun():
        return distributed.launch("train", s.nproc, argv)
    try:
        final = train(TrainConfig.from_settings(s), s.data, s.out, init=s.init, overwrite=s.overwrite,
                      resume=s.resume, tensorboard=s.tensorboard, progress=s.progress)
    finally:
        distributed.shutdown()
    if not distributed.is_main_process():
        return 0
    result = {"checkpoint": str(s.out), **final}
    if output.json:
        cli.print_json(result)
    elif "interrupted" not in final:
        cli.log(f"saved {s.out}: val loss {final['val_loss']:.4f}, bits/byte {final['val_bits_per_byte']:.4f}, "
                f"{final['tokens_per_s']:,.0f} tokens/s, MFU {final['mfu']:.1%}")
    return 0
