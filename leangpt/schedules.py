"""Learning-rate and batch-size schedules: plain functions of the step, plus the gradient-noise-scale estimator."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

LR_SCHEDULES = ("cosine", "wsd", "constant")
BATCH_SCHEDULES = ("constant", "ramp", "noise_scale")


def cosine_with_warmup(step: int, max_steps: int, warmup_steps: int, lr: float, min_lr: float) -> float:
    """Linear warmup from 0 to lr over warmup_steps, then cosine decay to min_lr at max_steps."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if step >= max_steps:
        return min_lr
    progress = (step - warmup_steps) / max(1, max_steps - warmup_steps)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (lr - min_lr)


def warmup_stable_decay(step: int, max_steps: int, warmup_steps: int, decay_steps: int, lr: float, min_lr: float) -> float:
    """WSD (MiniCPM, Hu et al. 2024): linear warmup, constant lr, then a linear decay to min_lr over the last decay_steps."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    decay_start = max_steps - decay_steps
    if step < decay_start:
        return lr
    progress = min(1.0, (step - decay_start + 1) / max(1, decay_steps))
    return lr + progress * (min_lr - lr)


def learning_rate(kind: str, step: int, max_steps: int, warmup_steps: int, decay_steps: int, lr: float, min_lr: float) -> float:
    if kind == "cosine":
        return cosine_with_warmup(step, max_steps, warmup_steps, lr, min_lr)
    if kind == "wsd":
        return warmup_stable_decay(step, max_steps, warmup_steps, decay_steps, lr, min_lr)
    if kind == "constant":
        return lr * (step + 1) / warmup_steps if step < warmup_steps else lr
    raise ValueError(f"unknown lr schedule {kind!r}")


def ramp_accum(tokens_seen: int, ramp_tokens: int, start_accum: int, end_accum: int) -> int:
    """Micro-batches per step grow linearly with tokens seen, from start_accum to end_accum over ramp_tokens."""
    if ramp_tokens <= 0 or tokens_seen >= ramp_tokens:
        return end_accum
    return start_accum + int((end_accum - start_accum) * tokens_seen / ramp_tokens)


def noise_scale_accum(estimate: float | None, accum: int, seqs_per_micro_batch: int, max_accum: int) -> int:
    """Grow accumulation (never shrink it) until a step's sequences reach the noise scale B_simple.

    seqs_per_micro_batch counts every process's micro-batch: a step holds accum times as many sequences.
    """
    if estimate is None or estimate <= accum * seqs_per_micro_batch:
        return accum
    return min(max_accum, max(accum + 1, math.ceil(estimate / seqs_per_micro_batch)))


@dataclass
class NoiseScale:
    """The simple gradient noise scale B_simple = tr(Σ) / |G|² (McCandlish et al. 2018, appendix A.1).

    From one step's micro-batch gradients: with B_small sequences per micro-batch, B_big = k · B_small per step,
    |G_small|² the mean squared norm of the k micro-batch gradients and |G_big|² that of their mean,
        |G|²  ≈ (B_big |G_big|² - B_small |G_small|²) / (B_big - B_small)
        tr(Σ) ≈ (|G_small|² - |G_big|²) / (1/B_small - 1/B_big)
    Both are noisy; the paper's exponential moving averages of each (not of the ratio) make the estimate usable.
    """

    ema: float = 0.95
    g2: float = 0.0  # EMA of |G|²
    trace: float = 0.0  # EMA of tr(Σ)
    updates: int = 0

    def update(self, small_sq: float, big_sq: float, b_small: int, b_big: int) -> None:
        g2 = (b_big * big_sq - b_small * small_sq) / (b_big - b_small)
        trace = (small_sq - big_sq) / (1.0 / b_small - 1.0 / b_big)
        self.updates += 1
        self.g2 = self.ema * self.g2 + (1 - self.ema) * g2
        self.trace = self.ema * self.trace + (1 - self.ema) * trace

    @property
    def estimate(self) -> float | None:
        """B_simple in sequences, corrected for the EMA's start-up bias; None until it means something."""
        if self.updates == 0:
            return None
        correction = 1 - self.ema ** self.updates
        g2, trace = self.g2 / correction, self.trace / correction
        return trace / g2 if g2 > 0 and trace > 0 else None

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for k, v in state.items():
            setattr(self, k, v)
