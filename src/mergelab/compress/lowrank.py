"""Truncated SVD of task-vector matrices: rank by count or by spectral energy, and its error.

The SVD always runs in float32 (or float64 when asked) on the chosen device, reduced
(``full_matrices=False``): a full SVD of an embedding delta would be vocab x vocab. Eckart-Young: the
rank-k truncation ``U_k diag(S_k) Vh_k`` is the best rank-k approximation in Frobenius norm, with error
``sqrt(sum_{i>k} S_i^2)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from mergelab.errors import MergeLabError


@dataclass
class Factors:
    """``delta ~= U diag(S) Vh`` truncated to ``rank`` columns (U: out x k, S: k, Vh: k x in)."""

    U: torch.Tensor
    S: torch.Tensor
    Vh: torch.Tensor
    full_rank: int  # min(out, in)

    @property
    def rank(self) -> int:
        return int(self.S.shape[0])

    def dense(self) -> torch.Tensor:
        return (self.U * self.S) @ self.Vh


def check_rank_choice(rank: Optional[int], energy: Optional[float], what: str = "rank") -> None:
    """Exactly one of ``rank`` (an integer >= 1) and ``energy`` (in (0, 1]) is given; else a clear error."""
    if (rank is None) == (energy is None):
        raise MergeLabError(f"give exactly one of --rank R (an integer >= 1) and --energy E (in (0, 1]) for the {what}")
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0):
        raise MergeLabError(f"--rank must be an integer >= 1, got {rank!r}")
    if energy is not None and not (isinstance(energy, (int, float)) and 0.0 < float(energy) <= 1.0):
        raise MergeLabError(f"--energy must be in (0, 1] (the fraction of sum(sigma^2) kept), got {energy!r}")


def numerical_rank(S: torch.Tensor, max_dim: Optional[int] = None) -> int:
    """Singular values above ``S_max * max(out, in) * eps(dtype)`` (numpy's ``matrix_rank`` rule)."""
    if S.numel() == 0 or float(S.max()) == 0.0:
        return 0
    tol = float(S.max()) * (max_dim or S.shape[0]) * torch.finfo(S.dtype).eps
    return int((S > tol).sum())


def energy_rank(S: torch.Tensor, energy: float, max_dim: Optional[int] = None) -> int:
    """The smallest k with ``sum_{i<=k} S_i^2 >= energy * sum_i S_i^2`` (GraftLLM's attention rule,
    arXiv 2505.18502), never above the :func:`numerical_rank`; 0 for an all-zero spectrum. So
    ``energy = 1`` gives the numerical rank (singular values at rounding level are not kept)."""
    nonzero = numerical_rank(S, max_dim)
    if nonzero == 0:
        return 0
    s2 = S.detach().to(torch.float64).pow(2)
    total = float(s2.sum())
    if total == 0.0:
        return 0
    cum = torch.cumsum(s2, 0)
    k = int(torch.searchsorted(cum, torch.tensor(energy * total, dtype=torch.float64)).item()) + 1
    return max(1, min(k, nonzero))


def truncated_svd(delta: torch.Tensor, rank: Optional[int] = None, energy: Optional[float] = None,
                  device: str = "cpu", dtype: torch.dtype = torch.float32) -> Factors:
    """Reduced SVD of the 2-D ``delta`` in ``dtype`` on ``device``, truncated to ``rank`` columns (capped
    at min(out, in)) or to :func:`energy_rank` of ``energy``. Factors come back in ``dtype`` on ``device``."""
    if delta.dim() != 2:
        raise MergeLabError(f"truncated_svd: expected a 2-D matrix, got shape {tuple(delta.shape)}")
    d = delta.to(device=device, dtype=dtype)
    U, S, Vh = torch.linalg.svd(d, full_matrices=False)
    k = min(rank, S.shape[0]) if rank is not None else \
        energy_rank(S, energy if energy is not None else 1.0, max(d.shape))
    return Factors(U[:, :k].contiguous(), S[:k].contiguous(), Vh[:k].contiguous(), int(S.shape[0]))


def relative_error(delta: torch.Tensor, approx: torch.Tensor) -> float:
    """``||delta - approx||_F / ||delta||_F`` in float64 (0 when both are zero, 1 when only delta is)."""
    d = delta.to(torch.float64)
    a = approx.to(device=d.device, dtype=torch.float64)
    norm = float(torch.linalg.vector_norm(d))
    diff = float(torch.linalg.vector_norm(d - a))
    if norm == 0.0:
        return 0.0 if diff == 0.0 else float("inf")
    return diff / norm
