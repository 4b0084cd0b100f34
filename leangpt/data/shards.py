"""Token shards on disk (flat arrays of ids, documents separated by the end-of-document token) and windows over them.

No torch here: `prepare` imports this module and should start fast."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from leangpt.fsutil import read_json
from leangpt.errors import UserError


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


class Dataset:
    """A prepared dataset directory: manifest, tokenizer and memory-mapped train/val tokens."""

    def __init__(self, directory: str | Path) -> None:
        self.dir = Path(directory)
        if not self.dir.is_dir():
            raise UserError(f"{self.dir}: dataset directory not found")
        self.manifest = read_json(self.dir / "manifest.json")
        self.dtype = np.dtype(self.manifest.get("dtype", "uint16"))

    def tokens(self, split: str) -> np.ndarray:
        path = self.dir / f"{split}.bin"
        if not path.is_file():
            raise UserError(f"{path}: file not found")
        if path.stat().st_size % self.dtype.itemsize:
            raise UserError(f"{path}: size is not a whole number of {self.dtype} tokens (corrupt?)")
        return np.memmap(path, dtype=self.dtype, mode="r")


def sequential_windows(tokens: np.ndarray, block_size: int, batch_size: int, max_tokens: int | None = None):
    """Consecutive windows covering the split once: every token after the first is a target exactly once."""
    total = len(tokens) - 1 if max_tokens is None else min(len(tokens) - 1, max_tokens)
    starts = list(range(0, total, block_size))
    for i in range(0, len(starts), batch_size):
        rows = []
        for s in starts[i:i + batch_size]:
            end = min(s + block_size, total)
            rows.append(np.asarray(tokens[s:end + 1], dtype=np.int64))
        yield rows
