"""Fine-tuning pairs: JSONL of {"prompt": ..., "completion": ...}, with the loss on completion tokens only."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from leangpt.data.batches import IGNORE_INDEX
from leangpt.data.tokenizer import TextTokenizer
from leangpt.errors import UserError


def read_pairs(path: Path) -> list[tuple[str, str]]:
    if not path.is_file():
        raise UserError(f"{path}: file not found")
    pairs = []
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{n}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict) or not isinstance(row.get("prompt"), str) or not isinstance(row.get("completion"), str):
                raise UserError(f"{path}:{n}: expected an object with string fields 'prompt' and 'completion'")
            if not row["completion"]:
                raise UserError(f"{path}:{n}: empty completion (nothing to learn from)")
            pairs.append((row["prompt"], row["completion"]))
    if not pairs:
        raise UserError(f"{path}: no prompt/completion pairs")
    return pairs


def file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def encode_pair(tokenizer: TextTokenizer, prompt: str, completion: str, block_size: int) -> tuple[list[int], list[int]]:
    """Inputs and targets of one example; targets are IGNORE_INDEX where the next token is part of the prompt.

    The completion ends with the end-of-document token so that the model learns to stop. Longer examples keep
    their first block_size + 1 tokens.
    """
    p, c = tokenizer.encode(prompt), tokenizer.encode(completion) + [tokenizer.eos_id]
    ids = (p + c)[:block_size + 1]
    labels = ([IGNORE_INDEX] * len(p) + c)[:block_size + 1]
    return ids[:-1], labels[1:]


class PairSampler:
    """Examples in a seeded shuffled order, epoch after epoch; padded to the longest in the batch.

    The data position is (epoch, cursor): the order of epoch e is a permutation seeded by (seed, e).
    """

    def __init__(self, examples: list[tuple[list[int], list[int]]], seed: int, pad_id: int) -> None:
        self.examples, self.seed, self.pad_id = examples, seed, pad_id
        self.epoch, self.cursor = 0, 0
        self._order = self._permutation()

    def _permutation(self) -> list[int]:
        return np.random.default_rng([self.seed, self.epoch]).permutation(len(self.examples)).tolist()

    def _next(self) -> int:
        if self.cursor == len(self._order):
            self.epoch, self.cursor = self.epoch + 1, 0
            self._order = self._permutation()
        self.cursor += 1
        return self._order[self.cursor - 1]

    def draw(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        rows = [self.examples[self._next()] for _ in range(n)]
        return pad_examples(rows, self.pad_id)

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "cursor": self.cursor}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.cursor = state["epoch"], state["cursor"]
        self._order = self._permutation()


def pad_examples(rows: list[tuple[list[int], list[int]]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, T) inputs padded with pad_id and (n, T) targets padded with IGNORE_INDEX, T the longest row."""
    t = max(len(ids) for ids, _ in rows)
    x = torch.full((len(rows), t), pad_id, dtype=torch.int64)
    y = torch.full((len(rows), t), IGNORE_INDEX, dtype=torch.int64)
    for i, (ids, labels) in enumerate(rows):
        x[i, :len(ids)] = torch.tensor(ids)
        y[i, :len(labels)] = torch.tensor(labels)
    return x, y


def load_pairs(path: Path, tokenizer: TextTokenizer, block_size: int, val_fraction: float, seed: int):
    """Tokenized train and val examples; val is a seeded hold-out of whole pairs (at least one when there are two)."""
    pairs = read_pairs(path)
    examples = [encode_pair(tokenizer, p, c, block_size) for p, c in pairs]
    examples = [e for e in examples if any(t != IGNORE_INDEX for t in e[1])]
    if not examples:
        raise UserError(f"{path}: every prompt fills the context of {block_size} tokens; no completion token is left")
    order = np.random.default_rng(seed).permutation(len(examples)).tolist()
    n_val = min(len(examples) - 1, max(1 if len(examples) > 1 else 0, round(val_fraction * len(examples))))
    val = [examples[i] for i in order[:n_val]]
    train = [examples[i] for i in order[n_val:]]
    return train, val or train
