"""Learning-rate schedules, as plain functions of the step."""

from __future__ import annotations

import math


def cosine_with_warmup(step: int, max_steps: int, warmup_steps: int, lr: float, min_lr: float) -> float:
    """Linear warmup from 0 to lr over warmup_steps, then cosine decay to min_lr at max_steps."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if step >= max_steps:
        return min_lr
    progress = (step - warmup_steps) / max(1, max_steps - warmup_steps)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (lr - min_lr)
