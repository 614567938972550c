"""DELLA-Merging: drop task-vector entries with magnitude-ranked probabilities (MagPrune), then merge.

Deep et al., "DELLA-Merging: Reducing Interference in Model Merging through Magnitude-Based
Sampling", 2024 (arXiv:2406.11617; reference code declare-lab/della ``mergekit/sparsify.py``
``rank_magnitude`` and ``merge_methods/generalized_task_arithmetic.py``).

Within each row (a vector along dimension 1; a 1-D or 0-D tensor is one row), entries are ranked by
``|tau|`` from 1 (smallest) to ``cols`` and the rank is mapped linearly to a keep probability
``p = (density - epsilon) + 2 * epsilon * (rank - 1) / (cols - 1)``: the smallest entry is kept with
probability ``density - epsilon``, the largest with ``density + epsilon``, and the row keeps
``density`` of its entries on average. Each entry is kept with probability ``p`` and the kept entries
are rescaled. ``della`` then elects a sign per coordinate and averages the agreeing entries (TIES),
``della_linear`` adds the weighted task vectors. The result is scaled by ``lambda``.

``semantics: mergekit`` (default) is mergekit 0.1.5: the kept entries are rescaled so that each task
vector keeps its L1 norm over the whole tensor (``rescale``). ``semantics: paper`` is the authors'
code: each kept entry is divided by its own keep probability ``p_ij`` (unbiased: E[tau~] = tau).
A row of one entry (mergekit divides 0 by 0 there and fails) gets ``p = density``.

Randomness: the keep draws use the same per-(seed, tensor, chunk, model) stream as DARE, so with
``epsilon: 0`` DELLA is exactly DARE (``dare_linear`` with the same semantics, ``dare_ties`` with
``semantics: mergekit``; ``dare_ties``' paper semantics adds TIES' trim and disjoint mean).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from mergelab.errors import RecipeError
from mergelab.methods.common import DENSITY, INT8_MASK, LAMBDA, SEMANTICS, WEIGHT, normalize, rescale_flag
from mergelab.methods.inputs import deltas_of, finish, whole_source
from mergelab.methods.parallel import map_models
from mergelab.methods.registry import BaseUse, MergeMethod, Param, TensorInputs, TensorSource, register
from mergelab.methods.rescale import exact_l1_factors
from mergelab.methods.select import ascending_order
from mergelab.methods.transforms import TaskVectors, disjoint_merge, drop, elect_sign, linear_combine, weigh

EPSILON = Param(
    "epsilon", float,
    "Half-width of the keep-probability ramp: ranks map to [density - epsilon, density + epsilon] "
    "(the paper's window_size / 2).",
    default=0.15, low=0.0,
)

# The stream DARE draws from: with epsilon = 0 the masks are DARE's own.
_PURPOSE = "dare"


def validate_della(params: dict, model_params: list) -> None:
    """``density - epsilon`` and ``density + epsilon`` must lie in (0, 1) where the density prunes."""
    for i, p in enumerate(model_params):
        d, e = p["density"], p["epsilon"]
        if 0 < d < 1 and (d - e <= 0 or d + e >= 1):
            raise RecipeError(
                f"della: parameter 'epsilon' = {e:g} with 'density' = {d:g} (model {i}) is invalid; expected "
                f"density - epsilon > 0 and density + epsilon < 1 (keep probabilities in (0, 1))"
            )


def keep_probabilities(delta: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    """MagPrune keep probabilities shaped like ``delta``, ranked along dimension 1 (mergekit's order of ops)."""
    rows = delta if delta.dim() >= 2 else delta.reshape(1, -1)
    cols = rows.shape[1]
    if cols == 1:
        rank_norm = torch.full_like(rows, 0.5)
    else:
        # 1-based rank of each |entry| along dimension 1 (the selection order reversed: among equal
        # magnitudes the lower column ranks higher), inverted by a scatter. The ranks are 1..cols, so
        # mergekit's min-max scaling is (r - 1) / (cols - 1).
        lines = rows.movedim(1, -1)
        flat = lines.reshape(-1, cols)
        ranks = torch.empty(flat.shape, dtype=torch.float32, device=rows.device)
        positions = torch.arange(1, cols + 1, dtype=torch.float32, device=rows.device).expand(flat.shape)
        ranks.scatter_(1, ascending_order(flat), positions)
        ranks = ranks.reshape(lines.shape).movedim(-1, 1)
        rank_norm = ((ranks - 1.0) / float(cols - 1)).clamp(0, 1)
    probs = (density - epsilon) + rank_norm * 2 * epsilon
    return probs.reshape(delta.shape)


@dataclass(frozen=True)
class DellaStats:
    probs: Optional[list] = None  # per model keep probabilities of a chunked 1-D tensor (whole vector)
    l1_scale: Optional[list] = None
    # (masks, probs) drawn for the L1 factors of a tensor in one chunk, reused by its merge (not redrawn)
    drawn: Optional[tuple] = None


def _probs(x: TensorInputs, i: int, delta: torch.Tensor, stats: Optional[DellaStats]) -> torch.Tensor:
    if stats is not None and stats.probs is not None and stats.probs[i] is not None:
        return stats.probs[i][x.rows[0]:x.rows[1]].to(delta.device)
    p = x.model_params[i]
    return keep_probabilities(delta, p["density"], p["epsilon"])


def _masks_and_probs(x: TensorInputs, deltas: torch.Tensor, stats: Optional[DellaStats]):
    """Keep masks ``[n, *chunk]`` and, for ``semantics: paper`` (which divides by them), the keep
    probabilities (else None: they are not kept, to save a full-size buffer)."""
    if stats is not None and stats.drawn is not None:
        return stats.drawn
    need_probs = x.params["semantics"] == "paper"

    def one(i: int):
        d = x.model_params[i]["density"]
        if d >= 1:
            return torch.ones_like(deltas[i]), torch.ones_like(deltas[i]) if need_probs else None
        if d <= 0:
            return torch.zeros_like(deltas[i]), torch.ones_like(deltas[i]) if need_probs else None
        pr = _probs(x, i, deltas[i], stats)
        return (x.rand(i, _PURPOSE) < pr).to(deltas.dtype), pr if need_probs else None

    # The ranking sorts and the random draws run on one core each: models side by side.
    pairs = map_models(one, range(len(x.model_params)), deltas.device.type)
    masks = torch.stack([m for m, _ in pairs])
    return masks, torch.stack([p for _, p in pairs]) if need_probs else None


def sparsified(x: TensorInputs) -> TaskVectors:
    """The chunk's task vectors after MagPrune and the rescale chosen by ``semantics``."""
    tv = TaskVectors.from_models(x.base, x.models, x.model_param("weight"))
    stats: Optional[DellaStats] = x.tensor_stats
    if stats is None and any(0 < p["density"] < 1 for p in x.model_params):
        if x.params["rescale"] and x.params["semantics"] == "mergekit":
            stats = _statistics(whole_source(x))
        elif len(x.shape) <= 1:
            whole_source(x)  # a chunk of a 1-D tensor needs the whole vector's ranks
    masks, probs = _masks_and_probs(x, tv.deltas, stats)
    if not x.params["rescale"]:
        return drop(masks, None)(tv)
    if x.params["semantics"] == "paper":
        return drop(masks, "inverse", keep_prob=probs)(tv)
    if stats is not None and stats.l1_scale is not None:
        return drop(masks, "l1", l1_scale=stats.l1_scale)(tv)
    return drop(masks, None)(tv)


def _prepare_tensor(src: TensorSource) -> Optional[DellaStats]:
    """The statistics of a chunked tensor. A whole tensor's are computed in its merge (see
    :func:`sparsified`), which keeps its masks: computed ahead on the read-ahead thread, they would be
    held beside the previous tensor's merge (about a fifth more peak memory on a 160M model)."""
    if src.num_chunks == 1:
        return None
    return _statistics(src)


def _statistics(src: TensorSource) -> Optional[DellaStats]:
    pruning = [0 < p["density"] < 1 for p in src.model_params]
    if not any(pruning):
        return None
    probs = None
    if len(src.shape) <= 1 and src.num_chunks > 1:
        # One row split across chunks: rank the whole vector once.
        full = torch.cat([deltas_of(c).reshape(src.num_models, -1) for c in src.chunks()], dim=1)
        probs = [
            keep_probabilities(full[i], p["density"], p["epsilon"]) if pruning[i] else None
            for i, p in enumerate(src.model_params)
        ]
    stats = DellaStats(probs)
    if src.params["rescale"] and src.params["semantics"] == "mergekit":
        drawn = []

        def masked(c: TensorInputs) -> torch.Tensor:
            d = deltas_of(c)
            masks_probs = _masks_and_probs(c, d, stats)
            if src.num_chunks == 1:
                drawn.append(masks_probs)
            return d * masks_probs[0]
        l1 = exact_l1_factors(src, masked)
        stats = DellaStats(probs, l1, drawn[0] if len(drawn) == 1 else None)
    return stats


def della_merge(x: TensorInputs) -> torch.Tensor:
    tv = elect_sign(1.0)(weigh()(sparsified(x)))
    return finish(x, disjoint_merge(tv, normalize=x.params["normalize"], divisor="weight"))


def della_linear_merge(x: TensorInputs) -> torch.Tensor:
    tv = weigh()(sparsified(x))
    return finish(x, linear_combine(tv, normalize=x.params["normalize"]))


_REFERENCE = (
    "Deep et al. 2024, DELLA-Merging (arXiv:2406.11617), declare-lab/della rank_magnitude; "
    "mergekit 0.1.5 `{}` (sparsify.della_magprune)."
)
_NOTES = (
    "semantics: mergekit (default) rescales the kept entries by L1-norm matching over the whole tensor; "
    "semantics: paper divides each kept entry by its keep probability p_ij (the authors' rescale=1). "
    "The paper's window_size is 2*epsilon. Rows of one entry get p = density (mergekit fails there). "
    "Ranks are along dimension 1 as in both references; among equal magnitudes the lower position "
    "ranks higher (mergelab's one selection order; mergekit's unstable argsort ranks them in any order)."
)

register(MergeMethod(
    name="della",
    family="della",
    summary="Drop task-vector entries with rank-dependent probabilities, rescale, elect signs, average.",
    reference=_REFERENCE.format("della"),
    merge=della_merge,
    base=BaseUse.REQUIRED,
    params=(LAMBDA, normalize(True), rescale_flag(True), INT8_MASK, SEMANTICS),
    model_params=(WEIGHT, DENSITY, EPSILON),
    chunkable=True,
    prepare_tensor=_prepare_tensor,
    validate=validate_della,
    notes=_NOTES,
))

register(MergeMethod(
    name="della_linear",
    family="della",
    summary="Drop task-vector entries with rank-dependent probabilities, rescale, add the weighted sum.",
    reference=_REFERENCE.format("della_linear"),
    merge=della_linear_merge,
    base=BaseUse.REQUIRED,
    params=(LAMBDA, normalize(False), rescale_flag(True), INT8_MASK, SEMANTICS),
    model_params=(WEIGHT, DENSITY, EPSILON),
    chunkable=True,
    prepare_tensor=_prepare_tensor,
    validate=validate_della,
    notes=_NOTES,
))
