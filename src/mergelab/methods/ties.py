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

``rescale`` (mergekit's L1-norm matching of each trimmed task vector over its tensor) exists only with
``semantics: mergekit``: the reference has no rescale, so ``rescale: true`` with ``semantics: paper`` is
an error. ``normalize: false`` is the reference's "dis-sum" (no division) under either semantics.
"""

from __future__ import annotations

from typing import Optional

import torch

from mergelab.errors import RecipeError
from mergelab.methods import fused
from mergelab.methods.common import DENSITY, INT8_MASK, LAMBDA, SEMANTICS, WEIGHT, normalize, rescale_flag
from mergelab.methods.consensus import TrimStats, consensus_merge, global_tie_sign
from mergelab.methods.inputs import deltas_of, uniform_model_param
from mergelab.methods.registry import BaseUse, MergeMethod, ModelScope, TensorInputs, TensorSource, register
from mergelab.methods.rescale import l1_rescale_factors
from mergelab.methods.select import flat_offset, keep_count, task_vector_cuts, top_cuts, zero_outside
from mergelab.methods.transforms import TaskVectors, trim


def tensor_cuts(src: TensorSource) -> list:
    """Per-model trim cuts over one tensor (mergekit: exactly ``max(1, int(d*n))`` entries each, ties
    at the threshold by flat index; see :mod:`mergelab.methods.select`), chunked when the tensor is."""
    return task_vector_cuts(src, [keep_count(p["density"], src.numel, "mergekit") for p in src.model_params])


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


def _validate(params: dict, model_params: list) -> None:
    if params["semantics"] == "paper" and params["rescale"]:
        raise RecipeError("ties: parameter 'rescale' = true cannot be honoured with semantics: paper (the TIES "
                          "reference has no rescale; rescale is mergekit's L1-norm matching per tensor); remove "
                          "it, or use semantics: mergekit")


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
            base, x.models, thresholds=[c.value for c in cuts], cutoffs=[c.local_index(offset) for c in cuts],
            factors=stats.l1_scale or [1.0] * n, divisors=[1.0] * n,
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
    validate=_validate,
    warm_up=fused.warm_up,
    raw_inputs=True,
    notes="semantics: mergekit keeps exactly max(1, int(d*n)) entries per tensor whatever the ties (equal "
          "magnitudes by lower flat index). semantics: paper trims over the whole model (the k-th largest "
          "magnitude found exactly, streamed; every entry >= it kept, as in the reference), resolves zero sums by the "
          "model's majority sign and divides by the count of agreeing entries. The paper's default "
          "density is 0.2 (K=20); mergekit's is 1.0 (no trim). rescale (mergekit's L1-norm matching) is an "
          "error with semantics: paper; normalize: false is the reference's dis-sum.",
))
