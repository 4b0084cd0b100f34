"""Device and precision choices, detected rather than assumed."""

from __future__ import annotations

import contextlib

import torch

from leangpt.errors import UserError


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown device {name!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("device cuda requested but no CUDA GPU is available")
    return device


def autocast(device: torch.device):
    """bf16 autocast on GPUs that support it; plain fp32 elsewhere (bf16 matmul is slow on CPUs without AMX/AVX512-BF16)."""
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()
