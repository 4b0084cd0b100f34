"""Unstructured and N:M pruning of every linear layer inside the blocks: magnitude, Wanda and SparseGPT.

Embeddings and the output head are left dense, as in the Wanda and SparseGPT papers. Wanda and SparseGPT walk
the blocks in order (leangpt.calibration.process_blocks), so each block is calibrated on the outputs of the
blocks already pruned. The result is a keep-mask per weight (True = kept); pruned weights are exact zeros.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from leangpt.calibration import InputStats, process_blocks
from leangpt.hessian import dead_inputs, inverse_cholesky
from leangpt.model import GPT
from leangpt.pruning.masks import drop_lowest, global_masks, n_pruned, nm_mask, row_mask, tensor_mask

Masks = dict[str, torch.Tensor]  # parameter name -> bool keep-mask of the same shape
Pattern = tuple[int, int] | None  # N:M: keep N of every M consecutive inputs; None is unstructured


def block_linears(model: GPT) -> dict[str, nn.Linear]:
    """The prunable layers, by module name: every nn.Linear inside a block."""
    return {f"blocks.{i}.{name}": m for i, block in enumerate(model.blocks)
            for name, m in block.named_modules() if isinstance(m, nn.Linear)}


@torch.no_grad()
def apply_masks(model: nn.Module, masks: Masks) -> None:
    """Zero the pruned weights in place (also used after each recovery step so the sparsity stays fixed)."""
    params = dict(model.named_parameters())
    for name, keep in masks.items():
        params[name].mul_(keep)


@torch.no_grad()
def magnitude(model: GPT, sparsity: float, pattern: Pattern = None, scope: str = "layer") -> Masks:
    """Drop the smallest |W|: within each layer, or across all block layers at once (scope='global')."""
    weights = {f"{name}.weight": m.weight for name, m in block_linears(model).items()}
    scores = {name: w.abs().float() for name, w in weights.items()}
    if pattern is not None:
        masks = {name: nm_mask(s, *pattern) for name, s in scores.items()}
    elif scope == "global":
        masks = global_masks(scores, sparsity)
    else:
        masks = {name: tensor_mask(s, sparsity) for name, s in scores.items()}
    apply_masks(model, masks)
    return masks


def wanda_scores(weight: torch.Tensor, input_norm: torch.Tensor) -> torch.Tensor:
    """|W_ij| · ‖X_j‖₂ (Sun et al. 2023, eq. 1). weight: (out, in); input_norm: (in,)."""
    return weight.abs().float() * input_norm[None, :]


@torch.no_grad()
def wanda(model: GPT, tokens: torch.Tensor, sparsity: float, pattern: Pattern = None, batch_size: int = 8) -> Masks:
    """Wanda: drop the lowest |W|·‖X‖ within each output row (or each N:M group)."""
    masks: Masks = {}

    def prune_block(i: int, block: nn.Module, linears: dict[str, nn.Linear], stats: dict[str, InputStats]) -> None:
        for name, lin in linears.items():
            scores = wanda_scores(lin.weight, stats[name].input_norm)
            keep = nm_mask(scores, *pattern) if pattern is not None else row_mask(scores, sparsity)
            lin.weight.mul_(keep)
            masks[f"blocks.{i}.{name}.weight"] = keep

    process_blocks(model, tokens, prune_block, batch_size=batch_size, want_hessian=False)
    return masks


@torch.no_grad()
def sparsegpt_layer(weight: torch.Tensor, hessian: torch.Tensor, sparsity: float, pattern: Pattern = None,
                    blocksize: int = 128, damp: float = 0.01) -> torch.Tensor:
    """SparseGPT (Frantar & Alistarh 2023, Alg. 1) on one layer: choose the mask block by block of columns
    and update the remaining weights to absorb each pruned weight's error. Changes weight in place.

    weight: (out, in); hessian: (in, in) = 2/n · XᵀX. The mask score is w² / [H⁻¹]ᵢᵢ², chosen adaptively per
    block of `blocksize` columns (unstructured) or per group of M columns (N:M). Returns the keep-mask.
    """
    W = weight.detach().float().clone()  # (out, in)
    rows, cols = W.shape
    if pattern is not None and blocksize % pattern[1]:
        raise ValueError(f"blocksize {blocksize} is not a multiple of M={pattern[1]}")
    W[:, dead_inputs(hessian)] = 0
    U = inverse_cholesky(hessian, damp)  # UᵀU = H⁻¹, upper triangular
    keep = torch.ones_like(W, dtype=torch.bool)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1, U1 = W[:, i1:i2].clone(), U[i1:i2, i1:i2]
        Q1, Err1 = torch.zeros_like(W1), torch.zeros_like(W1)
        d = torch.diagonal(U1)
        keep1 = keep[:, i1:i2]
        if pattern is None:
            # Exact count: this block prunes its share so that the layer's total is round(sparsity · numel).
            k = n_pruned(rows * i2, sparsity) - n_pruned(rows * i1, sparsity)
            keep1.copy_(drop_lowest((W1.pow(2) / d.pow(2)[None, :]).flatten(), k).view_as(W1))
        for i in range(i2 - i1):
            if pattern is not None and i % pattern[1] == 0:
                j = i + pattern[1]
                keep1[:, i:j] = nm_mask(W1[:, i:j].pow(2) / d[i:j].pow(2)[None, :], *pattern)
            w = W1[:, i]
            q = w * keep1[:, i]
            err = (w - q) / d[i]  # (out,)
            W1[:, i:] -= err[:, None] * U1[i, i:][None, :]
            Q1[:, i], Err1[:, i] = q, err
        W[:, i1:i2] = Q1
        W[:, i2:] -= Err1 @ U[i1:i2, i2:]  # carry the block's error to the later columns at once
    weight.copy_(W.to(weight.dtype))
    return keep


@torch.no_grad()
def sparsegpt(model: GPT, tokens: torch.Tensor, sparsity: float, pattern: Pattern = None, batch_size: int = 8,
              blocksize: int = 128, damp: float = 0.01) -> Masks:
    masks: Masks = {}

    def prune_block(i: int, block: nn.Module, linears: dict[str, nn.Linear], stats: dict[str, InputStats]) -> None:
        for name, lin in linears.items():
            masks[f"blocks.{i}.{name}.weight"] = sparsegpt_layer(lin.weight, stats[name].hessian, sparsity, pattern,
                                                                  blocksize, damp)

    process_blocks(model, tokens, prune_block, batch_size=batch_size, want_hessian=True)
    return masks


def sparsity_report(model: nn.Module, masks: Masks) -> dict[str, float]:
    """Fraction of zero weights per pruned tensor, measured on the weights themselves."""
    params = dict(model.named_parameters())
    return {name: float((params[name] == 0).float().mean()) for name in masks}
