"""Model Breadcrumbs: drop both tails of each task vector's magnitudes, then merge.

Davari & Belilovsky, "Model Breadcrumbs: Scaling Multi-Task Model Merging with Sparse Masks",
ECCV 2024 (arXiv:2312.06795; reference code rezazzr/breadcrumbs ``src/task_vectors.py``,
``TaskVectorMiddleKeep``). Each task vector loses its largest-magnitude entries (outliers, fraction
``gamma``) and its smallest ones (negligible perturbations) so that a fraction ``density`` is kept;
the masked task vectors are then summed (``breadcrumbs``) or merged with TIES' sign election
(``breadcrumbs_ties``, a mergekit addition), scaled by ``lambda`` and added to the base.

``semantics: mergekit`` (default) is mergekit 0.1.5 ``magnitude_outliers``: over the *whole tensor*
of ``n`` entries, ``int(density*n)`` entries are kept, the ``int(gamma*n)`` largest are dropped, the
top drop shrinks when both do not fit, and ``density >= 1`` keeps everything (``gamma`` is then
ignored). mergekit before 0.1.5 dropped whole tensors when ``int(gamma*n) == 0`` (a slice
``[n_bot:-0]``); 0.1.5 no longer does and neither does mergelab (tested). Ties in magnitude at a
boundary are broken by flat position (mergekit's sort leaves them in an unspecified order).

``semantics: paper`` is the authors' code: the masks are per vector along the *last* dimension (each
row of a ``[out, in]`` matrix; a 1-D tensor is one vector; 0-D tensors are kept), the
``int(gamma*cols)`` largest entries are removed first and then the ``int(density*cols)`` largest of
the rest are kept (fewer if fewer remain), so ``gamma`` also applies at ``density: 1``.

Both keep exact counts, whatever the ties, and are exact with row chunks: the two cuts of the
whole-tensor rank window are found by a streamed selection (:func:`mergelab.methods.select.rank_windows`,
ties by flat index), so huge embeddings never need sorting.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch

from mergelab.errors import RecipeError
from mergelab.methods.common import DENSITY, INT8_MASK, LAMBDA, SEMANTICS, WEIGHT, normalize, rescale_flag
from mergelab.methods.registry import BaseUse, MergeMethod, Param, TensorInputs, TensorSource, register
from mergelab.methods.inputs import deltas_of, finish, whole_source
from mergelab.methods.rescale import exact_l1_factors
from mergelab.methods.select import rank_windows, row_window_mask, window_mask
from mergelab.methods.transforms import TaskVectors, disjoint_merge, drop, elect_sign, linear_combine, weigh

GAMMA = Param(
    "gamma", float, "Fraction of the largest-magnitude task-vector entries removed as outliers.",
    default=0.01, low=0.0, high=1.0,
)

# --------------------------------------------------------------------------------------------------
# Breadcrumbs
# --------------------------------------------------------------------------------------------------


def mergekit_bounds(density: float, gamma: float, numel: int) -> Tuple[int, int]:
    """Descending-rank window ``[start, stop)`` kept by mergekit 0.1.5 ``magnitude_outliers``."""
    if density >= 1:
        return 0, numel
    target = int(density * numel)
    n_top = int(gamma * numel)
    n_bot = max(0, numel - target - n_top)
    return numel - n_bot - target, numel - n_bot


def paper_bounds(density: float, gamma: float, cols: int) -> Tuple[int, int]:
    """Descending-rank window kept in one vector of ``cols`` entries by the authors' code."""
    n_top = int(cols * gamma)
    keep = int(cols * density)
    return n_top, min(cols, n_top + keep)


@dataclass(frozen=True)
class BreadcrumbsStats:
    windows: Optional[list] = None  # per model RankWindow over the whole tensor (or None)
    l1_scale: Optional[list] = None


def _paper_rowwise(shape: tuple) -> bool:
    return len(shape) >= 2


def _masks(x: TensorInputs, stats: Optional[BreadcrumbsStats]) -> Optional[torch.Tensor]:
    """Keep masks ``[n, *chunk]`` of a chunk, or None when nothing is masked."""
    d = deltas_of(x)
    if x.params["semantics"] == "paper":
        if len(x.shape) == 0:
            return None
        if _paper_rowwise(x.shape):
            cols = x.shape[-1]
            bounds = [paper_bounds(p["density"], p["gamma"], cols) for p in x.model_params]
            return row_window_mask(d, bounds)
    if stats is None or stats.windows is None:
        return None
    return window_mask(d, x.rows[0], stats.windows)


def _bounds(src_shape: tuple, numel: int, model_params: list, semantics: str) -> Optional[list]:
    if semantics == "paper":
        if len(src_shape) == 0 or _paper_rowwise(src_shape):
            return None
        return [paper_bounds(p["density"], p["gamma"], numel) for p in model_params]
    return [mergekit_bounds(p["density"], p["gamma"], numel) for p in model_params]


def _prepare_tensor(src: TensorSource) -> Optional[BreadcrumbsStats]:
    bounds = _bounds(tuple(src.shape), src.numel, src.model_params, src.params["semantics"])
    windows = None
    if bounds is not None and not all(b == (0, src.numel) for b in bounds):
        if src.num_chunks == 1:  # take the task vectors once
            cached = [(c.rows[0], deltas_of(c)) for c in src.chunks()]
            stream = lambda: iter(cached)  # noqa: E731
        else:
            stream = lambda: ((c.rows[0], deltas_of(c)) for c in src.chunks())  # noqa: E731
        windows = rank_windows(stream, bounds, src.numel, single=src.num_chunks == 1)
    stats = BreadcrumbsStats(windows)
    if src.params["rescale"]:
        def masked(c: TensorInputs) -> torch.Tensor:
            m = _masks(c, stats)
            d = deltas_of(c)
            return d if m is None else d * m
        stats = BreadcrumbsStats(windows, exact_l1_factors(src, masked))
    return stats


def sparsified(x: TensorInputs) -> TaskVectors:
    """The chunk's task vectors after the breadcrumbs masks (and L1 rescale when asked)."""
    stats: Optional[BreadcrumbsStats] = x.tensor_stats
    if stats is None:
        stats = _prepare_tensor(whole_source(x))
    tv = TaskVectors.from_models(x.base, x.models, x.model_param("weight"))
    masks = _masks(x, stats)
    if masks is None:  # nothing masked: the L1 factors are exactly 1
        return tv
    if stats is not None and stats.l1_scale is not None:
        return drop(masks, "l1", l1_scale=stats.l1_scale)(tv)
    return drop(masks, None)(tv)


def breadcrumbs_merge(x: TensorInputs) -> torch.Tensor:
    """``theta_0 + lambda * sum_i w_i m_i tau_i`` (divided by ``sum_i w_i`` when ``normalize``)."""
    tv = weigh()(sparsified(x))
    return finish(x, linear_combine(tv, normalize=x.params["normalize"]))


def breadcrumbs_ties_merge(x: TensorInputs) -> torch.Tensor:
    """Breadcrumbs masks, then TIES' sign election (ties elect +1) and the agreeing (weighted) sum."""
    tv = elect_sign(1.0)(weigh()(sparsified(x)))
    return finish(x, disjoint_merge(tv, normalize=x.params["normalize"], divisor="weight"))


def _validate(params: dict, model_params: list) -> None:
    if params["semantics"] == "paper" and params["rescale"]:
        raise RecipeError("breadcrumbs: parameter 'rescale' = true cannot be honoured with semantics: paper (the "
                          "authors' code has no rescale; rescale is mergekit's L1-norm matching per tensor); remove "
                          "it, or use semantics: mergekit")


_REFERENCE = (
    "Davari & Belilovsky 2024, Model Breadcrumbs (arXiv:2312.06795), rezazzr/breadcrumbs "
    "TaskVectorMiddleKeep; mergekit 0.1.5 `{}` (sparsify.magnitude_outliers)."
)
_NOTES = (
    "semantics: mergekit (default) masks over the whole tensor with mergekit 0.1.5's counts "
    "(int(density*n) kept, int(gamma*n) outliers dropped, fewer when both do not fit; density 1 keeps "
    "all). semantics: paper masks each vector along the last dimension like the authors' code: the "
    "int(gamma*cols) largest go first, then the int(density*cols) largest of the rest are kept; 0-D "
    "tensors are kept. Magnitude ties at a boundary are broken by position. mergekit < 0.1.5 dropped "
    "whole tensors when int(gamma*n) == 0; 0.1.5 and mergelab do not."
)

register(MergeMethod(
    name="breadcrumbs",
    family="breadcrumbs",
    summary="Drop each task vector's largest and smallest entries, add the weighted sum to the base.",
    reference=_REFERENCE.format("breadcrumbs"),
    merge=breadcrumbs_merge,
    base=BaseUse.REQUIRED,
    params=(LAMBDA, normalize(False), rescale_flag(False), INT8_MASK, SEMANTICS),
    model_params=(WEIGHT, DENSITY, GAMMA),
    chunkable=True,
    prepare_tensor=_prepare_tensor,
    validate=_validate,
    notes=_NOTES,
))

register(MergeMethod(
    name="breadcrumbs_ties",
    family="breadcrumbs",
    summary="Breadcrumbs masks, then TIES' sign election and the sum of the agreeing entries.",
    reference=_REFERENCE.format("breadcrumbs_ties"),
    merge=breadcrumbs_ties_merge,
    base=BaseUse.REQUIRED,
    params=(LAMBDA, normalize(False), rescale_flag(False), INT8_MASK, SEMANTICS),
    model_params=(WEIGHT, DENSITY, GAMMA),
    chunkable=True,
    prepare_tensor=_prepare_tensor,
    validate=_validate,
    notes=_NOTES + " The sign election is mergekit's (a zero sum elects +1, the mean divides by the "
                   "agreeing weights when normalize); the breadcrumbs paper has no TIES variant.",
))
