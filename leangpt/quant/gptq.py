"""GPTQ (Frantar et al., 2022): quantize a linear layer column by column, pushing each column's rounding
error onto the columns not yet quantized through the inverse Hessian of the layer's inputs.

Lazy block updates: within a block of columns the error is propagated column by column; the columns after
the block get one matrix update per block. Act-order processes columns by decreasing H[j, j] (the inputs
that matter most first); the int4 groups stay contiguous in the original column order ("static groups",
their scales and zeros fixed from the unupdated weights), so the stored format does not change.
"""

from __future__ import annotations

import torch

from leangpt.hessian import dead_inputs, inverse_cholesky
from leangpt.quant.formats import QuantizedWeight, Scheme, from_integers, group_params, quantize_column


@torch.no_grad()
def gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor, scheme: Scheme, damp: float = 0.01,
                  block_size: int = 128, act_order: bool = False) -> QuantizedWeight:
    """weight (out, in), hessian (in, in) = 2/n Σ x xᵀ over calibration inputs -> the quantized weight."""
    W = weight.detach().float().clone()
    H = hessian.to(W.device).float()
    out, n = W.shape
    W[:, dead_inputs(H)] = 0
    g = scheme.group_size or n  # int8: one "group" per row spanning all columns
    n_groups = -(-n // g)
    scales = torch.zeros(out, n_groups, device=W.device)
    zeros = torch.zeros(out, n_groups, device=W.device) if scheme.bits == 4 else None

    def set_group(gi: int, cols: torch.Tensor) -> None:
        s, z = group_params(cols, scheme.bits)
        scales[:, gi] = s
        if zeros is not None:
            zeros[:, gi] = z

    perm = torch.arange(n, device=W.device)
    if act_order:
        perm = torch.argsort(torch.diagonal(H), descending=True)
        for gi in range(n_groups):  # static groups from the original weights
            set_group(gi, W[:, gi * g:(gi + 1) * g])
    elif scheme.bits == 8:
        set_group(0, W)
    W, H = W[:, perm], H[perm][:, perm]
    U = inverse_cholesky(H, damp)  # (in, in) upper: UᵀU = H⁻¹
    Q = torch.zeros_like(W)
    for i1 in range(0, n, block_size):
        i2 = min(i1 + block_size, n)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        U1 = U[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = int(perm[i1 + i])
            gi = col // g
            if not act_order and scheme.bits == 4 and col % g == 0:
                # The group's grid comes from its columns as updated so far (this block's in W1, later ones in W).
                set_group(gi, torch.cat((W1[:, i:], W[:, i2:]), 1)[:, :g])
            w = W1[:, i]
            zero = zeros[:, gi] if zeros is not None else None
            q = quantize_column(w, scales[:, gi], zero, scheme.bits)
            Q[:, i1 + i] = q
            deq = (q - zero) * scales[:, gi] if zero is not None else q * scales[:, gi]
            err = (w - deq) / U1[i, i]
            W1[:, i:] -= err[:, None] * U1[i, i:][None, :]
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ U[i1:i2, i2:]
    Q = Q[:, torch.argsort(perm)]
    return from_integers(scheme, Q, scales[:, 0] if scheme.bits == 8 else scales, zeros)
