"""Calibration for GPTQ, SparseGPT and Wanda: statistics of each linear layer's inputs, block by block.

Blocks are processed in order, and each block's inputs come from the blocks before it *after* they were
compressed, so errors are corrected downstream rather than compounded (GPTQ/SparseGPT's sequential
scheme). Within a block, all linear layers see inputs computed with the block's original weights.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from leangpt.data.shards import Dataset
from leangpt.errors import UserError
from leangpt.model import GPT


def calibration_tokens(data_dir: str | Path, n_samples: int, seq_len: int, seed: int = 0,
                       split: str = "train") -> torch.Tensor:
    """n_samples random windows of seq_len tokens from a dataset split: (N, T) int64."""
    tokens = Dataset(data_dir).tokens(split)
    if len(tokens) < seq_len + 1:
        raise UserError(f"{data_dir}: {split} split has {len(tokens)} tokens, fewer than one calibration window of {seq_len}")
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(len(tokens) - seq_len, (n_samples,), generator=gen).tolist()
    return torch.stack([torch.from_numpy(tokens[s:s + seq_len].astype("int64")) for s in starts])


@dataclass
class InputStats:
    """Running statistics of one linear layer's input rows x (in_features,)."""

    in_features: int
    device: torch.device
    want_hessian: bool = True
    rows: int = 0
    hessian: torch.Tensor | None = None  # 2/n · Σ x xᵀ (GPTQ, SparseGPT)
    sq_norm: torch.Tensor = field(init=False)  # Σ x_j² per input feature (Wanda: ‖X_j‖₂²)

    def __post_init__(self) -> None:
        self.sq_norm = torch.zeros(self.in_features, device=self.device)
        if self.want_hessian:
            self.hessian = torch.zeros(self.in_features, self.in_features, device=self.device)

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        n = x.shape[0]
        self.sq_norm += x.pow(2).sum(0)
        if self.hessian is not None:
            # Keep H = 2/N Σ x xᵀ as a running mean so large N stays well scaled.
            self.hessian *= self.rows / (self.rows + n)
            self.hessian += (2.0 / (self.rows + n)) * (x.t() @ x)
        self.rows += n

    @property
    def input_norm(self) -> torch.Tensor:
        return self.sq_norm.sqrt()


BlockFn = Callable[[int, nn.Module, dict[str, nn.Linear], dict[str, InputStats]], None]


@torch.no_grad()
def process_blocks(model: GPT, tokens: torch.Tensor, fn: BlockFn, batch_size: int = 8,
                   want_hessian: bool = True) -> None:
    """For each block in order: collect input stats of its linear layers, call fn(i, block, linears, stats)
    (which may change the block's weights), then recompute the block's outputs as the next block's inputs."""
    model.eval()
    device = next(model.parameters()).device
    tokens = tokens.to(device)
    batches = list(tokens.split(batch_size))
    pos = torch.arange(tokens.shape[1], device=device)
    hidden = [model.embed(idx, pos) for idx in batches]  # the first block's inputs, as in GPT.forward_hidden
    rope = model.rope_at(pos)
    for i, block in enumerate(model.blocks):
        linears = {name: m for name, m in block.named_modules() if isinstance(m, nn.Linear)}
        stats = {name: InputStats(m.in_features, device, want_hessian) for name, m in linears.items()}
        hooks = [m.register_forward_hook(lambda mod, inp, out, s=stats[name]: s.add(inp[0]))
                 for name, m in linears.items()]
        for x in hidden:
            block(x, rope, None, None)
        for h in hooks:
            h.remove()
        fn(i, block, linears, stats)
        hidden = [block(x, rope, None, None) for x in hidden]
