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
and the mean divides by the *count* of agreeing entries. Entries tied with the threshold are all kept
in both (mergekit keeps exactly k by its sort order; with float32 inputs ties are vanishingly rare).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from mergelab.errors import RecipeError
from mergelab.methods.common import DENSITY, INT8_MASK, LAMBDA, SEMANTICS, WEIGHT, normalize, rescale_flag
from mergelab.methods.registry import BaseUse, MergeMethod, ModelScope, TensorInputs, TensorSource, register
from mergelab.methods.select import kth_largest_abs, kth_largest_in_memory
from mergelab.methods.transforms import TaskVectors, disjoint_merge, elect_sign, trim, weigh


def keep_count(density: float, numel: int, semantics: str) -> int:
    """How many entries a trim at ``density`` keeps out of ``numel`` (before threshold ties)."""
    if density >= 1:
        return numel
    if density <= 0 or numel == 0:
        return 0
    if semantics == "mergekit":
        return max(1, int(density * numel))
    # Reference: threshold = kthvalue(|tau|, n - floor(n*d)) and keep |tau| >= threshold.
    return min(numel, math.floor(density * numel) + 1)


def deltas_of(x: TensorInputs) -> torch.Tensor:
    """Stacked task vectors ``[n, *chunk]`` of a chunk."""
    return torch.stack([m - x.base for m in x.models])


@dataclass(frozen=True)
class TrimStats:
    """Per-model magnitude thresholds, and optional L1 rescale factors, for one tensor or model."""

    thresholds: list
    l1_scale: Optional[list] = None
    tie_sign: float = 1.0


def tensor_thresholds(src: TensorSource, semantics: str = "mergekit") -> list:
    """Per-model trim thresholds over one tensor (exact, chunked when the tensor is)."""
    ks = [keep_count(p["density"], src.numel, semantics) for p in src.model_params]
    trivial = [0.0 if k >= src.numel else (math.inf if k <= 0 else None) for k in ks]
    if all(t is not None for t in trivial):
        return trivial
    if src.num_chunks == 1:
        (x,) = list(src.chunks())
        d = deltas_of(x)
        return [t if t is not None else kth_largest_in_memory(d[i], ks[i]) for i, t in enumerate(trivial)]
    return kth_largest_abs(lambda: (deltas_of(c) for c in src.chunks()), ks)


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
    thresholds = tensor_thresholds(src)
    scale = None
    if src.params["rescale"]:
        scale = l1_rescale_factors(src, lambda c: trim(thresholds)(TaskVectors.from_models(c.base, c.models)).deltas)
    return TrimStats(thresholds, scale)


def _prepare_model(scope: ModelScope) -> Optional[TrimStats]:
    if scope.params["semantics"] != "paper":
        return None
    densities = uniform_model_param(scope, "density")
    thresholds = kth_largest_abs(
        lambda: (deltas_of(c) for c in scope.chunks()),
        lambda total: [keep_count(d, total, "paper") for d in densities],
    )
    tie = global_tie_sign(scope, lambda c: trim(thresholds)(TaskVectors.from_models(c.base, c.models)).deltas)
    return TrimStats(thresholds, None, tie)


def ties_merge(x: TensorInputs) -> torch.Tensor:
    paper = x.params["semantics"] == "paper"
    stats: TrimStats = x.model_stats if paper else x.tensor_stats
    tv = TaskVectors.from_models(x.base, x.models, x.model_param("weight"))
    tv = trim(stats.thresholds)(tv)
    if stats.l1_scale is not None:
        s = torch.tensor(stats.l1_scale, dtype=tv.deltas.dtype, device=tv.deltas.device)
        tv = TaskVectors(tv.deltas * tv.expand(s), tv.weights)
    tv = elect_sign(stats.tie_sign)(weigh()(tv))
    merged = disjoint_merge(tv, normalize=x.params["normalize"], divisor="count" if paper else "weight")
    if x.params["lambda"] != 1:
        merged = merged * x.params["lambda"]
    return x.base + merged


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
    notes="semantics: paper trims over the whole model (exact, streamed), resolves zero sums by the "
          "model's majority sign and divides by the count of agreeing entries. The paper's default "
          "density is 0.2 (K=20); mergekit's is 1.0 (no trim).",
))
