"""Keep-masks from importance scores: per tensor, per output row, across tensors (global), and N:M.

Every selector prunes an exact count (ties are broken by index, never by a threshold that could take more),
so the sparsity asked for is the sparsity delivered. Masks are bool tensors, True where a weight is kept.
"""

from __future__ import annotations

import torch

from leangpt.errors import UserError


def parse_pattern(text: str) -> tuple[int, int]:
    """'2:4' -> (2, 4): keep N weights in every group of M consecutive inputs of a row."""
    try:
        n, m = (int(s) for s in text.split(":"))
    except ValueError:
        raise UserError(f"--pattern must look like N:M (e.g. 2:4), got {text!r}") from None
    if not 0 < n < m:
        raise UserError(f"--pattern N:M needs 0 < N < M, got {text!r}")
    return n, m


def n_pruned(count: int, sparsity: float) -> int:
    return int(round(sparsity * count))


def drop_lowest(scores: torch.Tensor, k: int, dim: int = -1) -> torch.Tensor:
    """Keep-mask that drops the k lowest scores along dim."""
    keep = torch.ones_like(scores, dtype=torch.bool)
    if k > 0:
        keep.scatter_(dim, torch.topk(scores, k, dim=dim, largest=False).indices, False)
    return keep


def tensor_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Drop the round(sparsity · numel) lowest scores of the whole tensor."""
    return drop_lowest(scores.flatten(), n_pruned(scores.numel(), sparsity)).view_as(scores)


def row_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Drop the round(sparsity · in) lowest scores of each output row (Wanda's comparison group). scores: (out, in)."""
    return drop_lowest(scores, n_pruned(scores.shape[1], sparsity), dim=1)


def global_masks(scores: dict[str, torch.Tensor], sparsity: float) -> dict[str, torch.Tensor]:
    """Drop the round(sparsity · total) lowest scores across all tensors together."""
    flat = torch.cat([s.flatten() for s in scores.values()])
    keep = drop_lowest(flat, n_pruned(flat.numel(), sparsity))
    out, start = {}, 0
    for name, s in scores.items():
        out[name] = keep[start:start + s.numel()].view_as(s)
        start += s.numel()
    return out


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep the n highest scores in every group of m consecutive inputs of each row. scores: (out, in)."""
    rows, cols = scores.shape
    if cols % m:
        raise UserError(f"N:M pattern {n}:{m}: a layer has {cols} inputs, not a multiple of {m}")
    groups = scores.reshape(rows, cols // m, m)  # (out, in/m, m)
    return drop_lowest(groups, m - n, dim=-1).reshape(rows, cols)
