"""Merging weight vectors and merged expert weights: W = Σ_k x_k · W_k, exactly, per MoE layer.

Static merges from the literature produce merged weights (not an x): simple average, Fisher-weighted
averaging (Matena & Raffel), RegMean (Jin et al.) — the simulator evaluates them as merged states.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch

from tanbr_ray.simplex import check_x

FFN_KEYS = ("w1", "b1", "w2", "b2", "ln_w", "ln_b")


def validate_x(x, num_experts: int, budget: int | None = None, tol: float = 1e-6) -> np.ndarray:
    """Check a merging weight vector (the shared feasibility check of `tanbr_ray.simplex`)."""
    return check_x(x, num_experts, budget, tol)


def merge_experts(experts: Mapping[str, torch.Tensor], x: Sequence[float]) -> dict[str, torch.Tensor]:
    """Σ_k x_k · expert_k for stacked tensors shaped [layers, K, ...] → [layers, ...].

    Only the experts with non-zero weight are read (at most B of K): a merge is memory-bound, and
    the router merges once per distinct x every slot."""
    x = np.asarray(x, dtype=np.float64)
    nz = np.flatnonzero(x)
    if len(nz) == 0:
        raise ValueError("merge: x has no non-zero weight")
    out = {}
    for k, t in experts.items():
        acc = t[:, nz[0]] * float(x[nz[0]])
        for e in nz[1:]:
            acc.add_(t[:, e], alpha=float(x[e]))
        out[k] = acc
    return out


def uniform_merge(experts: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    K = next(iter(experts.values())).shape[1]
    return merge_experts(experts, [1.0 / K] * K)


def fisher_merge(
    experts: Mapping[str, torch.Tensor], fisher: Mapping[str, torch.Tensor], eps: float = 1e-8
) -> dict[str, torch.Tensor]:
    """Per-parameter Fisher-weighted average: Σ_k F_k W_k / Σ_k F_k (falls back to the mean where F≈0)."""
    out = {}
    for k, t in experts.items():
        f = fisher[k].to(t.dtype) + eps
        out[k] = (f * t).sum(1) / f.sum(1)
    return out


def regmean_merge(
    experts: Mapping[str, torch.Tensor],
    grams: Mapping[str, torch.Tensor],
    alpha: float = 0.9,
) -> dict[str, torch.Tensor]:
    """RegMean for the two FFN linears: W* = (Σ_k G_k)^-1 Σ_k G_k W_kᵀ with G_k = X_kᵀX_k (off-diagonals
    scaled by alpha); biases and LayerNorms are averaged, as in the paper."""
    out = uniform_merge(experts)
    for wk, gk in (("w1", "g1"), ("w2", "g2")):
        W = experts[wk].double()  # [M, K, out, in]
        G = grams[gk].double()  # [M, K, in, in]
        diag = torch.diag_embed(torch.diagonal(G, dim1=-2, dim2=-1))
        G = alpha * G + (1 - alpha) * diag
        lhs = G.sum(1)  # [M, in, in]
        rhs = torch.einsum("mkij,mkoj->mio", G, W)  # Σ G_k W_kᵀ : [M, in, out]
        eye = torch.eye(lhs.shape[-1], dtype=lhs.dtype, device=lhs.device) * 1e-6 * lhs.diagonal(dim1=-2, dim2=-1).mean()
        sol = torch.linalg.solve(lhs + eye, rhs)  # [M, in, out]
        out[wk] = sol.transpose(-1, -2).to(experts[wk].dtype)
    return out
