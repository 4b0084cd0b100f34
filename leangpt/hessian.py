"""The Hessian machinery that GPTQ and SparseGPT share.

Both compress a linear layer W (out, in) column by column while updating the not-yet-processed columns to
absorb each column's error, which needs the layer-wise Hessian H = 2/n · XᵀX (from leangpt.calibration)
as the upper Cholesky factor U of its inverse: H⁻¹ = UᵀU. Row i of U gives, for column i, both the
error scale U[i, i] and the update direction U[i, i:] over the remaining columns (GPTQ paper, Sec. 3;
SparseGPT, Alg. 1).
"""

from __future__ import annotations

import torch


def dead_inputs(hessian: torch.Tensor) -> torch.Tensor:
    """Input features that were exactly zero on every calibration row (H[j, j] == 0): bool (in,)."""
    return torch.diagonal(hessian) == 0


def inverse_cholesky(hessian: torch.Tensor, damp: float = 0.01, max_tries: int = 6) -> torch.Tensor:
    """Upper-triangular U with UᵀU = (H + λI)⁻¹, in float32 on H's device.

    λ = damp · mean(diag H) keeps the factorisation stable when calibration rows are few or features are
    correlated. Dead inputs (H[j, j] == 0) get H[j, j] = 1 first, so they do not make H singular; callers
    zero those columns of W (they never reach the output on the calibration data). If the damped H is still
    not positive definite in float32, λ grows tenfold, up to max_tries times.
    """
    h = hessian.detach().float().clone()
    diag = torch.diagonal(h)
    diag[diag == 0] = 1.0
    base = diag.mean()
    for attempt in range(max_tries):
        lam = damp * (10 ** attempt) * base
        chol, info = torch.linalg.cholesky_ex(h + lam * torch.eye(h.shape[0], device=h.device))
        if info == 0:
            inv = torch.cholesky_inverse(chol)
            return torch.linalg.cholesky(inv, upper=True)
    raise RuntimeError(f"Hessian is not positive definite even with damping {damp * 10 ** (max_tries - 1)}")
