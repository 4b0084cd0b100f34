"""Token log-probabilities of a whole sequence from one forward pass: what the completions API's `echo` and
`logprobs: N` report (each token's log-probability given the tokens before it, and the N likeliest tokens at
each position).

Scoring runs at `leangpt eval`'s precision (fp32 on CPUs, bf16 autocast on GPUs), so the server's echoed
log-probabilities match in-process lm-eval scoring.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from leangpt.device import autocast
from leangpt.model import GPT


@dataclass
class TokenScores:
    """Per position of a scored sequence: the token's log-probability (None for the first: nothing predicts it)
    and the `top` likeliest (token id, log-probability) pairs predicted there (empty for the first)."""
    token_logprobs: list[float | None]
    top: list[list[tuple[int, float]]]


@torch.no_grad()
def score_tokens(model: GPT, ids: list[int], top: int = 0) -> TokenScores:
    """Each token's log-probability under `model` given the tokens before it, and the `top` likeliest
    alternatives at each position, from one forward pass (len(ids) must be within the model's context)."""
    if len(ids) > model.config.block_size:
        raise ValueError(f"{len(ids)} tokens exceed the model's context of {model.config.block_size}")
    device = next(model.parameters()).device
    if len(ids) < 2:
        return TokenScores([None] * len(ids), [[] for _ in ids])
    x = torch.tensor([ids[:-1]], device=device)
    with autocast(device, torch.float32 if device.type == "cpu" else None):
        logits = model(x)[0]
    logp = F.log_softmax(logits.float(), dim=-1)  # (T-1, vocab): position i predicts ids[i + 1]
    targets = torch.tensor(ids[1:], device=device)
    token_logp = logp.gather(1, targets[:, None])[:, 0].tolist()
    alternatives: list[list[tuple[int, float]]] = [[]]
    if top:
        values, indices = logp.topk(top, dim=-1)
        alternatives += [list(zip(i, v)) for i, v in zip(indices.tolist(), values.tolist())]
    else:
        alternatives += [[] for _ in token_logp]
    return TokenScores([None, *token_logp], alternatives)
