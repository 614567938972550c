"""TIES-Merging: trim, elect sign, disjoint merge.

Yadav et al., "TIES-Merging: Resolving Interference When Merging Models", NeurIPS 2023
(arXiv:2306.01708; reference code prateeky2806/ties-merging ``merge_utils.py``).

1. Trim: keep the largest-magnitude entries of each task vector.
2. Elect: the sign of each coordinate is the sign of the summed (trimmed, weighted) task vectors.
3. Disjoint merge: average only the entries that agree with the elected sign.

``semantics: mergekit`` (default) is mergekit 0.1.5's ``ties``: the trim keeps ``max(1, int(d*n))``
entries *per tensor*, a zero sum elects ``+1``, and the mean divides by the summed weights of the
agreeing models. ``semantics: paper`` is the reference code: the trim is over the *whole model*
(``floor(d*N)+1`` entries per model, found exactly in a streaming pass, see
:mod:`mergelab.methods.select`), a zero sum takes the sign of the total elected mass over the model,
and the mean divides by the *count* of agreeing entries. mergekit's trim keeps exactly ``k`` entries
whatever the ties at the threshold, and so does mergelab's (among equal magnitudes the lower flat
index first, see :mod:`mergelab.methods.select`; mergekit takes them in its unstable sort's order).
The reference keeps every entry ``>=`` the threshold, so with ties it keeps more than ``k``; the
counts are recorded in ``mergelab.json`` when they differ by more than 0.1%.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from mergelab.errors import RecipeError
from mergelab.methods import fused
from mergelab.methods.common import DENSITY, INT8_MASK, LAMBDA, SEMANTICS, WEIGHT, normalize, rescale_flag
from mergelab.methods.registry import BaseUse, MergeMethod, ModelScope, TensorInputs, TensorSource, register
from mergelab.methods.select import as_cut, flat_offset, keep_count, task_vector_cuts, top_cuts, zero_outside
from mergelab.methods.transforms import TaskVectors, disjoint_merge, elect_sign, trim, weigh


def deltas_of(x: TensorInputs) -> torch.Tensor:
    """Stacked task vectors ``[n, *chunk]`` of a chunk."""
    return torch.stack([m - x.base for m in x.models])


@dataclass(frozen=True)
class TrimStats:
    """Per-model trim cuts (:class:`~mergelab.methods.select.Cut`, or plain thresholds that keep every
    entry ``>=`` them), optional L1 rescale factors, and the zero-sum sign, for one tensor or model."""

    thresholds: list
    l1_scale: Optional[list] = None
    tie_sign: float = 1.0

    @property
    def cuts(self) -> list:
        return [as_cut(t) for t in self.thresholds]

    def manifest_report(self) -> Optional[dict]:
        """Kept vs asked entries per model where the trim kept more than 0.1% over what was asked
        (ties at a threshold that keeps every entry ``>=`` it: ``semantics: paper``), else None."""
        over = [c for c in self.cuts if c.asked > 0 and c.kept > c.asked * 1.001]
        if not over:
            return None
        return {"trim_kept": [c.kept for c in self.cuts], "trim_asked": [c.asked for c in self.cuts]}


def tensor_cuts(src: TensorSource) -> list:
    """Per-model trim cuts over one tensor (mergekit: exactly ``max(1, int(d*n))`` entries each, ties
    at the threshold by flat index; see :mod:`mergelab.methods.select`), chunked when the tensor is."""
    return task_vector_cuts(src, [keep_count(p["density"], src.numel, "mergekit") for p in src.model_params])


def l1_rescale_factors(src: TensorSource, masked: Callable[[TensorInputs], torch.Tensor]) -> list:
    """mergekit's L1 rescale: ``||tau_i||_1 / ||m_i tau_i||_1`` per model over the whole tensor.

    ``masked(chunk)`` returns the masked task vectors ``[n, *chunk]``. A factor is 1 where either
    norm is below 1e-7, as in mergekit.
    """
    before = torch.zeros(src.num_models, dtype=torch.float64)
    after = torch.zeros(src.num_models, dtype=torch.float64)
    for c in src.chunks():
        d = deltas_of(c)
        before += d.abs().reshape(d.shape[0], -1).sum(1).double().cpu()
        after += masked(c).abs().reshape(d.shape[0], -1).sum(1).double().cpu()
    return [1.0 if b < 1e-7 or a < 1e-7 else float(b / a) for b, a in zip(before.tolist(), after.tolist())]


def global_tie_sign(scope: ModelScope, sparsified: Callable[[TensorInputs], torch.Tensor]) -> float:
    """Sign of the total elected mass over the whole model (TIES reference zero-resolution).

    The reference sets coordinates whose summed task vectors are exactly zero to
    ``sign(sum_j gamma_j)``, the majority of the elected signs over all coordinates of the model.
    """
    total = 0.0
    for c in scope.chunks():
        d = sparsified(c)
        w = torch.tensor(c.model_param("weight"), dtype=d.dtype, device=d.device)
        d = d * w.reshape((-1,) + (1,) * (d.dim() - 1))
        total += float(torch.sign(d.sum(0)).sum().item())
    return float(math.copysign(1.0, total)) if total != 0 else 0.0


def uniform_model_param(scope: ModelScope, name: str) -> list:
    """A per-model parameter that must be one value over the whole model (whole-model statistics)."""
    values = None
    for c in scope.chunks():
        v = c.model_param(name)
        if values is None:
            values = v
        elif v != values:
            raise RecipeError(
                f"parameter '{name}' must be one value per model with semantics: paper (the trim is over "
                f"the whole model), but it varies across tensors (tensor '{c.name}': {v} vs {values})"
            )
    return values or []


def _prepare_tensor(src: TensorSource) -> Optional[TrimStats]:
    if src.params["semantics"] == "paper":
        return None
    cuts = tensor_cuts(src)
    scale = None
    if src.params["rescale"]:
        scale = l1_rescale_factors(src.as_float32(), lambda c: trim(cuts, flat_offset(c.rows, c.shape))(
            TaskVectors.from_models(c.base, c.models)).deltas)
    return TrimStats(cuts, scale)


def _prepare_model(scope: ModelScope) -> Optional[TrimStats]:
    if scope.params["semantics"] != "paper":
        return None
    scope = scope.as_float32()
    densities = uniform_model_param(scope, "density")
    # The reference keeps every entry >= the k-th largest magnitude (ties included): not exact.
    cuts = top_cuts(lambda: (deltas_of(c) for c in scope.chunks()),
                    lambda total: [keep_count(d, total, "paper") for d in densities], exact=False)
    tie = global_tie_sign(scope, lambda c: trim(cuts)(TaskVectors.from_models(c.base, c.models)).deltas)
    return TrimStats(cuts, None, tie)


def consensus_merge(deltas: torch.Tensor, weights: torch.Tensor, tie_sign: float, normalize: bool,
                    divisor: str) -> torch.Tensor:
    """Sign election and disjoint merge of weighted task vectors ``deltas`` ``[n, *chunk]``.

    The same values as ``disjoint_merge(elect_sign(tie_sign)(tv), normalize, divisor)`` from
    :mod:`mergelab.methods.transforms`, bit for bit, computed in place in ``deltas`` (which the caller
    gives up). With an elected sign ``s`` of +1 or -1, an entry agrees exactly when ``s * tau > 0``,
    so the agreeing entries are ``s * relu(s * tau)``: negation is exact and rounding is symmetric,
    so ``s * sum_i relu(s * tau_i)`` equals the masked sum, without boolean masks or multiplies by
    them (which cost more than the arithmetic on a CPU).
    """
    if tie_sign == 0:  # a zero sum elects no sign; rare, so the plain pipeline does it
        tv = elect_sign(0.0)(TaskVectors(deltas, weights))
        return disjoint_merge(tv, normalize, divisor)
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


def sum_models(deltas: torch.Tensor) -> torch.Tensor:
    """``deltas.sum(dim=0)`` into a new buffer, adding the models in order (the same values, fewer passes)."""
    total = deltas[0].clone()
    for i in range(1, deltas.shape[0]):
        total.add_(deltas[i])
    return total


def ties_merge(x: TensorInputs) -> torch.Tensor:
    """``chain(trim, rescale, weigh, elect_sign, disjoint_merge)`` of one chunk, computed in place.

    Value for value the pipeline of :mod:`mergelab.methods.transforms`; see :func:`consensus_merge`.
    """
    paper = x.params["semantics"] == "paper"
    stats: TrimStats = x.model_stats if paper else x.tensor_stats
    cuts = stats.cuts
    offset = flat_offset(x.rows, x.shape)
    base = x.base
    if stats.tie_sign != 0 and fused.usable(base, *x.models):
        n = len(x.models)
        merged = fused.consensus_merge(
            base, x.models, thresholds=[c.value for c in cuts], cutoffs=[c.local_index(offset) for c in cuts], factors=stats.l1_scale or [1.0] * n, divisors=[1.0] * n,
            weights=x.model_param("weight"), tie_sign=stats.tie_sign, normalize=x.params["normalize"],
            count_divisor=paper, lam=x.params["lambda"], out_dtype=x.out_dtype)
        if merged is not None:
            return merged
    x = x.as_float32()
    base = x.base
    weights = torch.tensor(x.model_param("weight"), dtype=base.dtype, device=base.device)
    scale = None
    if stats.l1_scale is not None:
        scale = torch.tensor(stats.l1_scale, dtype=base.dtype, device=base.device)
    deltas = torch.empty((len(x.models),) + tuple(base.shape), dtype=base.dtype, device=base.device)
    for i, m in enumerate(x.models):
        d = torch.sub(m, base, out=deltas[i])
        zero_outside(d, cuts[i], offset)
        if scale is not None:
            d.mul_(scale[i])
        d.mul_(weights[i])
    merged = consensus_merge(deltas, weights, stats.tie_sign, x.params["normalize"],
                             "count" if paper else "weight")
    del deltas
    if x.params["lambda"] != 1:
        merged.mul_(x.params["lambda"])
    return merged.add_(base)


register(MergeMethod(
    name="ties",
    family="ties",
    summary="Trim small task-vector entries, elect a sign per coordinate, average the agreeing entries.",
    reference="Yadav et al. 2023, TIES-Merging (arXiv:2306.01708), prateeky2806/ties-merging; "
              "mergekit 0.1.5 `ties`.",
    merge=ties_merge,
    base=BaseUse.REQUIRED,
    params=(LAMBDA, normalize(True), rescale_flag(False), INT8_MASK, SEMANTICS),
    model_params=(WEIGHT, DENSITY),
    chunkable=True,
    prepare_tensor=_prepare_tensor,
    prepare_model=_prepare_model,
    warm_up=fused.warm_up,
    raw_inputs=True,
    notes="semantics: paper trims over the whole model (exact, streamed), resolves zero sums by the "
          "model's majority sign and divides by the count of agreeing entries. The paper's default "
          "density is 0.2 (K=20); mergekit's is 1.0 (no trim).",
))
