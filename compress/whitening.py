"""Whitening: the activation-aware SVD shared by `svd`, `svd-llm`, `asvd`'s shrink and ACIP's whitened basis.

For a layer W [out, in] with calibration inputs X, let G = XᵀX = S·Sᵀ (Cholesky). Truncating the
SVD of W·S minimises ‖(W − W')·Xᵀ‖, the error on the layer's actual outputs, rather than ‖W − W'‖.

Pure tensor math: errors are plain `ValueError`s naming the layer; the methods that call these
functions decide what a user is told.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lowrank.linear import balanced_factors

__all__ = ["cholesky_with_damping", "shrink_gram", "whitened_svd_factors"]


def shrink_gram(gram: Tensor, alpha: float) -> Tensor:
    """(1 − α)·G + α·mean(diag G)·I, in G's dtype: a Gram regularized toward isotropic inputs.

    α = 0 returns G itself (the whitening fits the calibration inputs exactly); α = 1 gives
    mean(diag G)·I, whose whitened SVD is the plain SVD of W. In between, directions the
    calibration text barely excites keep part of their weight, so the truncation does not
    discard what another domain's inputs use.
    """
    if alpha == 0.0:
        return gram
    eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    return (1.0 - alpha) * gram + alpha * gram.diagonal().mean() * eye


def cholesky_with_damping(gram: Tensor, name: str = "layer", max_damping: float = 1e-1) -> tuple[Tensor, float]:
    """Lower Cholesky factor of `gram` (float64), damped only if needed. Returns (L, δ used)."""
    g = gram.to(torch.float64)
    if not torch.isfinite(g).all():
        raise ValueError(f"{name}: calibration Gram has non-finite entries (NaN/Inf activations?)")
    g = 0.5 * (g + g.T)
    mean_diag = g.diagonal().mean().clamp_min(torch.finfo(torch.float64).tiny)
    eye = torch.eye(g.shape[0], dtype=g.dtype, device=g.device)
    damping = 0.0
    while True:
        chol, info = torch.linalg.cholesky_ex(g + damping * mean_diag * eye)
        if int(info) == 0:
            return chol, damping
        damping = 1e-6 if damping == 0.0 else damping * 10
        if damping > max_damping:
            raise ValueError(f"{name}: calibration Gram is not positive definite even with damping {max_damping}")


def whitened_svd_factors(weight: Tensor, gram: Tensor, name: str = "layer",
                         shrink: float = 0.0) -> tuple[Tensor, Tensor, Tensor, float]:
    """Balanced full-rank factors (U, V) of W in the whitened basis, sorted by Σ. Returns (U, V, Σ, δ).

    `shrink` > 0 whitens by `shrink_gram(gram, shrink)` instead of the Gram itself.
    """
    if shrink:
        gram = shrink_gram(gram.to(torch.float64), shrink)
    chol, damping = cholesky_with_damping(gram, name)
    w = weight.detach().to(device=chol.device, dtype=torch.float64)
    u, s, qh = torch.linalg.svd(w @ chol, full_matrices=False)
    # Rows of Q̂ᵀ·S⁻¹: solve Sᵀ·Z = Q̂ (Sᵀ upper triangular) rather than inverting S.
    v = torch.linalg.solve_triangular(chol.T, qh.T, upper=True).T
    U, V = balanced_factors(u, s, v)
    return U, V, s.to(torch.float32), damping
