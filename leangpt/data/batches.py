"""Training batches that remember where they are: the sampler's state is the data position saved for exact resume.

Every rank draws the same global batch and keeps its own slice, so the data order depends on the global batch
only, never on the number of processes.
"""

from __future__ import annotations

import base64
from typing import Any, Protocol

import numpy as np
import torch

IGNORE_INDEX = -100  # a target that carries no loss (prompt and padding tokens)


class Sampler(Protocol):
    def draw(self, n: int) -> tuple[torch.Tensor, torch.Tensor]: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def generator_state(gen: torch.Generator) -> str:
    return base64.b64encode(gen.get_state().numpy().tobytes()).decode()


def set_generator_state(gen: torch.Generator, state: str) -> None:
    gen.set_state(torch.frombuffer(bytearray(base64.b64decode(state)), dtype=torch.uint8))


class WindowSampler:
    """Windows of block_size + 1 tokens at random offsets of a token stream."""

    def __init__(self, tokens: np.ndarray, block_size: int, seed: int) -> None:
        self.tokens, self.block_size = tokens, block_size
        self.gen = torch.Generator().manual_seed(seed)

    def draw(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs (n, T) and next-token targets (n, T)."""
        starts = torch.randint(len(self.tokens) - self.block_size, (n,), generator=self.gen).tolist()
        w = torch.from_numpy(np.stack([np.asarray(self.tokens[s:s + self.block_size + 1], dtype=np.int64) for s in starts]))
        return w[:, :-1], w[:, 1:]

    def state_dict(self) -> dict[str, Any]:
        return {"generator": generator_state(self.gen)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        set_generator_state(self.gen, state["generator"])


def micro_batches(x: torch.Tensor, y: torch.Tensor, batch_size: int, rank: int, accum: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """This rank's accum micro-batches of a global batch of world · accum · batch_size rows."""
    rows = slice(rank * accum * batch_size, (rank + 1) * accum * batch_size)
    xs, ys = x[rows].split(batch_size), y[rows].split(batch_size)
    return list(zip(xs, ys))
