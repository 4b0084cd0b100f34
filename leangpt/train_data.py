"""What a run trains on and is scored on: a dataset directory from `leangpt prepare` (random windows; the val
loss is `leangpt eval`'s, leangpt.evaluate.evaluate_tokens) or a JSONL file of prompt/completion pairs
(shuffled pairs; the val loss is over the completion tokens of held-out pairs).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from leangpt.data.batches import IGNORE_INDEX, Sampler, WindowSampler
from leangpt.data.shards import Dataset
from leangpt.data.sft import PairSampler, file_sha256, load_pairs, pad_examples
from leangpt.data.tokenizer import TextTokenizer
from leangpt.device import autocast
from leangpt.errors import UserError
from leangpt.evaluate import evaluate_tokens

Example = tuple[list[int], list[int]]


@dataclass
class TrainData:
    """The training batches (their position is saved for an exact resume) and the val scorer:
    score(model, max_tokens) gives loss, perplexity and bits per byte over the first max_tokens val targets."""

    sampler: Sampler
    score: Callable[[torch.nn.Module, int], dict[str, Any]]


def data_fingerprint(data: Path) -> dict[str, Any]:
    """What a resume must find unchanged about the data."""
    if data.is_file():
        return {"pairs_sha256": file_sha256(data)}
    ds = Dataset(data)
    return {"tokenizer_sha256": ds.manifest.get("tokenizer_sha256"),
            "train_tokens": len(ds.tokens("train")), "val_tokens": len(ds.tokens("val"))}


def load_data(data: Path, tokenizer: TextTokenizer, tokenizer_source: Path, block_size: int, batch_size: int,
              seed: int, sft_val_fraction: float) -> TrainData:
    """The sampler and the val scorer of `data`, checked against the run's tokenizer (from tokenizer_source)."""
    if data.is_file():
        train_ex, val_ex = load_pairs(data, tokenizer, block_size, sft_val_fraction, seed)
        return TrainData(PairSampler(train_ex, seed, tokenizer.eos_id), lambda model, max_tokens: evaluate_pairs(
            model, val_ex, tokenizer.token_bytes, batch_size, tokenizer.eos_id, max_tokens))
    dataset = Dataset(data)
    if dataset.manifest.get("tokenizer_sha256") != tokenizer.sha256():
        raise UserError(f"{data} was not tokenized with {tokenizer_source}'s tokenizer; "
                        f"run `leangpt prepare --tokenizer {tokenizer_source}`")
    train_tokens, val_tokens = dataset.tokens("train"), dataset.tokens("val")
    for split, toks in (("train", train_tokens), ("val", val_tokens)):
        if len(toks) < block_size + 1:
            raise UserError(f"{split} split has {len(toks)} tokens, fewer than one training window of {block_size + 1}; "
                            f"use more text or a smaller block_size")
    return TrainData(WindowSampler(train_tokens, block_size, seed), lambda model, max_tokens: evaluate_tokens(
        model, val_tokens, tokenizer.token_bytes, block_size, batch_size, max_tokens))


def first_targets(examples: list[Example], max_tokens: int | None) -> list[Example]:
    """The examples in order until they hold max_tokens target tokens, the last one cut short (None: all)."""
    if max_tokens is None:
        return examples
    kept, left = [], max_tokens
    for ids, labels in examples:
        if left <= 0:
            break
        targets = [i for i, t in enumerate(labels) if t != IGNORE_INDEX]
        if len(targets) > left:  # a causal model scores a prefix the same without the rest
            ids, labels = ids[:targets[left]], labels[:targets[left]]
        kept.append((ids, labels))
        left -= min(len(targets), left)
    return kept


@torch.no_grad()
def evaluate_pairs(model: torch.nn.Module, examples: list[Example], token_bytes: np.ndarray, batch_size: int,
                   pad_id: int, max_tokens: int | None = None) -> dict[str, Any]:
    """Loss over the completion tokens of held-out pairs (the tokens fine-tuning is scored on), the first
    max_tokens of them; at leangpt.evaluate.evaluate_tokens' precision (fp32 on CPUs, the compute dtype on GPUs).
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    dtype = torch.float32 if device.type == "cpu" else None
    examples = first_targets(examples, max_tokens)
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
