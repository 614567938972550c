"""TIES' sign election and disjoint mean: the one home of the consensus step of the TIES family.

Yadav et al., "TIES-Merging", NeurIPS 2023 (arXiv:2306.01708), steps 2 and 3: the sign of each
coordinate is elected by the mass of the (trimmed, weighted) task vectors, ``sign(sum_i tau_i)``, and
only the entries that agree with it are merged: summed, or averaged ("disjoint mean").

Used by ``ties``, ``dare_ties``, ``breadcrumbs_ties``, ``della`` (through the composable transforms of
:mod:`mergelab.methods.transforms`) and ``sce`` (whose erase step is this election on unweighted task
vectors, then a weighted disjoint mean). The fused CPU kernels
(:func:`mergelab.methods._fused_kernels.consensus`) compute the same float32 operations in the same
order, compiled; ``tests/methods/test_fused.py`` checks they give the same bits.

Choices that differ between mergekit and the papers are arguments here:

- a zero sum elects ``tie_sign``: ``+1`` in mergekit; the TIES reference uses the sign of the total
  elected mass over the whole model (:func:`global_tie_sign`); ``0`` elects no sign;
- the divisor of the mean: ``"weight"``, the summed weights of the agreeing models with a zero
  divisor becoming 1 (mergekit); ``"count"``, the number of agreeing entries, at least 1 (the TIES
  reference); ``"weight_floor"``, the summed weights clamped below at 1e-6 (mergekit's ``sce``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from mergelab.methods.registry import ModelScope, TensorInputs
from mergelab.methods.select import as_cut, kept_vs_asked


@dataclass(frozen=True)
class TrimStats:
    """What a TIES-family merge computes ahead, for one tensor or the whole model: per-model trim cuts
    (:class:`~mergelab.methods.select.Cut`, or plain thresholds that keep every entry ``>=`` them),
    optional L1 rescale factors (:mod:`mergelab.methods.rescale`), and the zero-sum sign."""

    thresholds: list
    l1_scale: Optional[list] = None
    tie_sign: float = 1.0

    @property
    def cuts(self) -> list:
        return [as_cut(t) for t in self.thresholds]

    def manifest_report(self) -> Optional[dict]:
        """Kept vs asked entries per model where a trim kept more than 0.1% over what was asked
        (ties at a threshold that keeps every entry ``>=`` it: ``semantics: paper``), else None."""
        return kept_vs_asked("trim", self.cuts)


def elected_sign(total: torch.Tensor, tie_sign: float = 1.0) -> torch.Tensor:
    """``sign(total)`` (``total``: the summed task vectors), a zero sum becoming ``tie_sign`` unless it is 0."""
    sign = torch.sign(total)
    if tie_sign != 0:
        sign = torch.where(total == 0, torch.full_like(sign, float(tie_sign)), sign)
    return sign


def agreement_mask(deltas: torch.Tensor, sign: torch.Tensor) -> torch.Tensor:
    """1 where an entry of ``deltas`` ``[n, *chunk]`` is non-zero and has the elected sign, else 0."""
    return (torch.sign(deltas) == sign.unsqueeze(0)).to(deltas.dtype)


def disjoint_mean(deltas: torch.Tensor, sign: torch.Tensor, weights: torch.Tensor, normalize: bool = True,
                  divisor: str = "weight") -> torch.Tensor:
    """Sum of the (weighted) entries of ``deltas`` ``[n, *chunk]`` that agree with ``sign``, divided,
    when ``normalize``, by ``divisor`` (see the module docstring) over the agreeing models."""
    agree = agreement_mask(deltas, sign)
    div = None
    if normalize:
        expanded = weights.reshape((-1,) + (1,) * (deltas.dim() - 1))
        if divisor == "weight":
            div = (expanded * agree).sum(dim=0)
            div[div == 0] = 1
        elif divisor == "weight_floor":
            div = (expanded * agree).sum(dim=0).clamp(min=1e-6)
        elif divisor == "count":
            div = agree.sum(dim=0).clamp_min(1)
        else:
            raise ValueError(f"unknown divisor {divisor!r}")
    merged = agree.mul_(deltas).sum(dim=0)  # the agreement mask is ours: reuse its buffer
    return merged if div is None else merged.div_(div)


def weighted_consensus_mean(deltas: torch.Tensor, weights: torch.Tensor, divisor: str = "weight") -> torch.Tensor:
    """SCE's erase: the sign elected by the *unweighted* task vectors ``deltas`` ``[n, *chunk]`` (a zero
    sum elects +1), then the mean of the agreeing entries weighted by ``weights`` ``[n]`` (applied
    after the election), divided by their summed weights (``divisor`` as in :func:`disjoint_mean`).

    The same values as ``disjoint_mean(deltas * w, elected_sign(deltas.sum(0)), weights, True, divisor)``
    for finite inputs and non-negative weights (SCE's are), in fewer passes."""
    total = deltas.sum(dim=0)
    majority = (total >= 0).to(deltas.dtype) * 2 - 1
    erased = weights.reshape((-1,) + (1,) * (deltas.dim() - 1)) * (deltas.sign() == majority)
    merged = (deltas * erased).sum(dim=0)
    div = torch.sum(erased, dim=0)
    if divisor == "weight":
        div = torch.where(div == 0, torch.ones_like(div), div)
    elif divisor == "weight_floor":
        div = div.clamp(min=1e-6)
    else:
        raise ValueError(f"unknown divisor {divisor!r}")
    return merged / div


def sum_models(deltas: torch.Tensor) -> torch.Tensor:
    """``deltas.sum(dim=0)`` into a new buffer, adding the models in order (the same values, fewer passes)."""
    total = deltas[0].clone()
    for i in range(1, deltas.shape[0]):
        total.add_(deltas[i])
    return total


def consensus_merge(deltas: torch.Tensor, weights: torch.Tensor, tie_sign: float, normalize: bool,
                    divisor: str) -> torch.Tensor:
    """Sign election and disjoint merge of weighted task vectors ``deltas`` ``[n, *chunk]``.

    The same values as ``disjoint_mean(deltas, elected_sign(deltas.sum(0), tie_sign), weights, ...)``,
    bit for bit, computed in place in ``deltas`` (which the caller gives up). With an elected sign
    ``s`` of +1 or -1, an entry agrees exactly when ``s * tau > 0``, so the agreeing entries are
    ``s * relu(s * tau)``: negation is exact and rounding is symmetric, so ``s * sum_i relu(s * tau_i)``
    equals the masked sum, without boolean masks or multiplies by them (which cost more than the
    arithmetic on a CPU).
    """
    if tie_sign == 0:  # a zero sum elects no sign; rare, so the plain form does it
        return disjoint_mean(deltas, elected_sign(deltas.sum(dim=0), 0.0), weights, normalize, divisor)
    n = deltas.shape[0]
    sign = sum_models(deltas)
    if tie_sign > 0:
        sign = torch.where(sign >= 0, 1.0, -1.0)
    else:
        sign = torch.where(sign > 0, 1.0, -1.0)
    for i in range(n):
        deltas[i].mul_(sign).relu_()
    merged = sum_models(deltas)
    merged.mul_(sign)
    if not normalize:
        return merged
    # The divisor: sum_i w_i [agree_i] ("weight") or sum_i [agree_i] ("count"), in model order.
    div = sign  # reuse the buffer
    agree = torch.empty_like(merged)
    for i in range(n):
        torch.sign(deltas[i], out=agree)
        if i == 0:
            torch.mul(agree, float(weights[0]) if divisor == "weight" else 1.0, out=div)
        else:
            div.add_(agree, alpha=float(weights[i]) if divisor == "weight" else 1.0)
    if divisor == "weight":
        div.masked_fill_(div == 0, 1)
    elif divisor == "count":
        div.clamp_min_(1)
    else:
        raise ValueError(f"unknown divisor {divisor!r}")
    return merged.div_(div)


def global_tie_sign(scope: ModelScope, sparsified: Callable[[TensorInputs], torch.Tensor]) -> float:
    """Sign of the total elected mass over the whole model (TIES reference zero-resolution).

    The reference sets coordinates whose summed task vectors are exactly zero to
    ``sign(sum_j gamma_j)``, the majority of the elected signs over all coordinates of the model.
    ``sparsified(chunk)`` gives the chunk's sparsified task vectors ``[n, *chunk]`` (before weights).
    """
    total = 0.0
    for c in scope.chunks():
        d = sparsified(c)
        w = torch.tensor(c.model_param("weight"), dtype=d.dtype, device=d.device)
        d = d * w.reshape((-1,) + (1,) * (d.dim() - 1))
        total += float(torch.sign(d.sum(0)).sum().item())
    return float(math.copysign(1.0, total)) if total != 0 else 0.0
