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

Both are exact with row chunks: the whole-tensor ranks are found by a streamed order statistic and a
count of the boundary ties per chunk (:func:`rank_windows`), so huge embeddings never need sorting.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, List, Optional, Sequence, Tuple

import numpy as np
import torch

from mergelab.methods.common import DENSITY, INT8_MASK, LAMBDA, SEMANTICS, WEIGHT, normalize, rescale_flag
from mergelab.methods.registry import BaseUse, MergeMethod, Param, TensorInputs, TensorSource, register
from mergelab.methods.parallel import map_models
from mergelab.methods.select import kth_largest_abs, kth_largests_in_memory
from mergelab.methods.ties import deltas_of, l1_rescale_factors
from mergelab.methods.transforms import TaskVectors, disjoint_merge, drop, elect_sign, linear_combine, weigh

GAMMA = Param(
    "gamma", float, "Fraction of the largest-magnitude task-vector entries removed as outliers.",
    default=0.01, low=0.0, high=1.0,
)

# --------------------------------------------------------------------------------------------------
# Exact rank windows over a stream of row chunks (shared with sce.py and della.py).
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RankWindow:
    """Keep the entries whose rank by ``|value|`` is in ``[start, stop)``.

    Ranks are 0-based in descending order of magnitude over the whole tensor; equal magnitudes are
    ordered by flat position (earlier first). ``hi``/``lo`` are the magnitudes at ranks ``start`` and
    ``stop - 1``; ``*_above`` count the entries strictly larger and ``*_equal`` those equal, over the
    whole tensor; ``*_before`` map the first row of each chunk to the number of entries equal to
    ``hi``/``lo`` in the chunks before it.
    """

    start: int
    stop: int
    numel: int
    hi: float = float("inf")
    hi_above: int = 0
    hi_before: Optional[dict] = None
    lo: float = 0.0
    lo_above: int = 0
    lo_before: Optional[dict] = None
    hi_equal: int = 0
    lo_equal: int = 0

    @property
    def splits_hi(self) -> bool:
        """Whether entries equal to ``hi`` fall on both sides of ``start`` (ranks must break the tie)."""
        return self.start > 0 and self.hi_above < self.start

    @property
    def splits_lo(self) -> bool:
        """Whether entries equal to ``lo`` fall on both sides of ``stop``."""
        return self.stop < self.numel and self.lo_above + self.lo_equal > self.stop

    @property
    def empty(self) -> bool:
        return self.stop <= self.start or self.start >= self.numel

    @property
    def everything(self) -> bool:
        return self.start <= 0 and self.stop >= self.numel


Stream = Callable[[], Iterable[Tuple[int, torch.Tensor]]]


def _kth_largest(stream: Stream, ks: List[int], numel: int, single: bool) -> List[float]:
    """Exact k-th largest ``|x|`` for ``1 <= k <= numel`` (other ks give ``inf``).

    ``ks`` may list several ks per model: ``ks[j]`` applies to model ``j % n`` of the stream's ``n``.
    """
    out = [float("inf")] * len(ks)
    mid = [j for j, k in enumerate(ks) if 1 <= k < numel]
    last = [j for j, k in enumerate(ks) if k == numel and numel > 0]
    if mid and single:
        ((_, v),) = list(stream())
        n = v.shape[0]
        models = sorted({j % n for j in mid})
        # One partition per model for all of its ks, the models on parallel threads.
        per_model = map_models(lambda i: kth_largests_in_memory(v[i], [ks[j] for j in mid if j % n == i]),
                               models, v.device.type)
        for i, found in zip(models, per_model):
            for j, value in zip([j for j in mid if j % n == i], found):
                out[j] = value
    elif mid:
        # One streamed selection per group of n ks (not one over a repeated [2n, *chunk] copy).
        n = None
        for _, v in stream():
            n = v.shape[0]
            break
        for g in range(0, len(ks), n):
            group = [ks[j] if j in mid else 0 for j in range(g, g + n)]
            if any(group):
                found = kth_largest_abs(lambda: (v for _, v in stream()), group)
                for j in range(g, g + n):
                    if j in mid:
                        out[j] = found[j - g]
    if last:  # the smallest magnitude (select's conventions map k == numel to 0.0)
        low: Optional[list] = None
        for _, v in stream():
            a = v.abs().reshape(v.shape[0], -1)
            if a.shape[1]:
                m = a.min(dim=1).values.tolist()
                low = m if low is None else [min(x, y) for x, y in zip(low, m)]
        for j in last:
            out[j] = low[j % len(low)]
    return out


def rank_windows(stream: Stream, bounds: Sequence[Tuple[int, int]], numel: int, single: bool = False) -> List[RankWindow]:
    """Per-model :class:`RankWindow` for ``bounds[i] = (start, stop)`` over a stream of chunks.

    ``stream()`` yields ``(first_row, values)`` with ``values`` shaped ``[n, *chunk]``; it is iterated
    up to four times (two for the thresholds, one for the smallest value if needed, one for ties).
    ``single`` says the stream is one in-memory chunk (a partition replaces the radix select).
    """
    n = len(bounds)
    windows: List[Optional[RankWindow]] = [None] * n
    for i, (start, stop) in enumerate(bounds):
        w = RankWindow(max(0, start), min(numel, stop), numel)
        if w.empty or w.everything:
            windows[i] = w
    if all(w is not None for w in windows):
        return windows  # type: ignore[return-value]
    ks_hi = [b[0] + 1 if windows[i] is None and b[0] > 0 else 0 for i, b in enumerate(bounds)]
    ks_lo = [b[1] if windows[i] is None and b[1] < numel else 0 for i, b in enumerate(bounds)]
    # One selection for both boundaries: 2n ks (upper bounds, then lower) over the n models.
    both = _kth_largest(stream, ks_hi + ks_lo, numel, single)
    his, los = both[:n], both[n:]
    hi_t = torch.tensor(his, dtype=torch.float32)
    lo_t = torch.tensor(los, dtype=torch.float32)
    above_hi = [0] * n
    above_lo = [0] * n
    eq_hi = [0] * n
    eq_lo = [0] * n
    before_hi = [dict() for _ in range(n)]
    before_lo = [dict() for _ in range(n)]
    todo = [i for i in range(n) if windows[i] is None]

    def counts(v: torch.Tensor, i: int) -> Tuple[int, int, int, int]:
        """Entries of model i's chunk above and equal to its hi and lo magnitudes."""
        a = v[i].abs().reshape(-1).to(torch.float32)
        if a.device.type == "cpu":  # numpy compares and counts several times faster than torch here
            x = a.numpy()
            return (int(np.count_nonzero(x > his[i])), int(np.count_nonzero(x == his[i])),
                    int(np.count_nonzero(x > los[i])), int(np.count_nonzero(x == los[i])))
        return (int((a > hi_t[i]).sum()), int((a == hi_t[i]).sum()), int((a > lo_t[i]).sum()),
                int((a == lo_t[i]).sum()))

    for first_row, v in stream():
        found = dict(zip(todo, map_models(lambda i: counts(v, i), todo, v.device.type)))
        gh, qh, gl, ql = ([found.get(i, (0, 0, 0, 0))[c] for i in range(n)] for c in range(4))
        for i in range(n):
            before_hi[i][first_row] = eq_hi[i]
            before_lo[i][first_row] = eq_lo[i]
            above_hi[i] += gh[i]
            eq_hi[i] += qh[i]
            above_lo[i] += gl[i]
            eq_lo[i] += ql[i]
    for i, (start, stop) in enumerate(bounds):
        if windows[i] is None:
            windows[i] = RankWindow(
                start, stop, numel, his[i], above_hi[i], before_hi[i], los[i], above_lo[i], before_lo[i],
                eq_hi[i], eq_lo[i],
            )
    return windows  # type: ignore[return-value]


def _before(counts: dict, first_row: int) -> int:
    if first_row in counts:
        return counts[first_row]
    if len(counts) == 1:  # one chunk: whatever rows label the engine gave it
        return next(iter(counts.values()))
    raise RuntimeError(f"no tie counts for the row chunk starting at row {first_row}: the chunks given to "
                       f"merge differ from those given to prepare_tensor")


def _drop_tied(keep: torch.Tensor, a: torch.Tensor, value: float, first_kept: int, last_kept: int) -> None:
    """Among the entries of ``a`` equal to ``value``, numbered ``0, 1, ...`` in flat order, clear ``keep``
    for those outside ``[first_kept, last_kept)`` (the position tie-break of a rank window)."""
    eq = (a == value).nonzero().squeeze(1)
    lo, hi = min(max(first_kept, 0), eq.numel()), min(max(last_kept, 0), eq.numel())
    keep[eq[:lo]] = False
    keep[eq[hi:]] = False


def window_mask(values: torch.Tensor, first_row: int, windows: Sequence[RankWindow]) -> torch.Tensor:
    """Float masks ``[n, *chunk]`` (1 keeps) of a chunk whose first row is ``first_row``."""
    out = torch.empty_like(values, dtype=torch.float32)
    for i, w in enumerate(windows):
        a = values[i].abs().reshape(-1).to(torch.float32)
        if w.empty:
            keep = torch.zeros_like(a, dtype=torch.bool)
        elif w.everything:
            keep = torch.ones_like(a, dtype=torch.bool)
        else:
            keep = torch.ones_like(a, dtype=torch.bool)
            if w.start > 0:
                keep &= a <= w.hi
                if w.splits_hi:  # else every entry equal to hi has rank >= start
                    # The j-th such entry here has rank hi_above + (those in earlier chunks) + j.
                    skip = w.start - w.hi_above - _before(w.hi_before, first_row)
                    _drop_tied(keep, a, w.hi, skip, a.numel())
            if w.stop < w.numel:
                keep &= a >= w.lo
                if w.splits_lo:  # else every entry equal to lo has rank < stop
                    _drop_tied(keep, a, w.lo, 0, w.stop - w.lo_above - _before(w.lo_before, first_row))
        out[i] = keep.reshape(values[i].shape).to(torch.float32)
    return out


def row_window_mask(values: torch.Tensor, bounds: Sequence[Tuple[int, int]]) -> torch.Tensor:
    """Float masks ``[n, *chunk]`` keeping, in each vector along the last dimension, ranks ``[start, stop)``.

    Ranks are by descending ``|value|`` within the vector, ties ordered by position.
    """
    out = torch.empty_like(values, dtype=torch.float32)
    cols = values.shape[-1]
    for i, (start, stop) in enumerate(bounds):
        a = values[i].abs().reshape(-1, cols)
        order = torch.sort(a, dim=1, descending=True, stable=True).indices
        ranks = torch.empty_like(order)
        ranks.scatter_(1, order, torch.arange(cols, device=a.device).expand_as(order).contiguous())
        keep = (ranks >= start) & (ranks < stop)
        out[i] = keep.reshape(values[i].shape).to(torch.float32)
    return out


def whole_source(x: TensorInputs) -> TensorSource:
    """A one-chunk :class:`TensorSource` over ``x``, to compute statistics the engine did not provide.

    Only a whole tensor can stand for itself; a row chunk without its statistics is a contract error.
    """
    if tuple(x.models[0].shape) != tuple(x.shape):
        raise RuntimeError(
            f"tensor '{x.name}': a row chunk reached merge without the statistics of prepare_tensor"
        )
    return TensorSource(x.name, tuple(x.shape), x.params, x.model_params, len(x.models), 1, lambda: iter([x]))


def exact_l1_factors(src: TensorSource, masked: Callable[[TensorInputs], torch.Tensor]) -> list:
    """mergekit's L1 rescale factors ``||tau||_1 / ||m*tau||_1`` per model over the whole tensor.

    For a tensor in one chunk the sums are float32 over the whole tensor, as mergekit computes them,
    so the factors agree bit for bit; chunked tensors accumulate in float64
    (:func:`mergelab.methods.ties.l1_rescale_factors`).
    """
    if src.num_chunks != 1:
        return l1_rescale_factors(src, masked)
    (c,) = list(src.chunks())
    d = deltas_of(c)
    m = masked(c)
    out = []
    for i in range(d.shape[0]):
        before = d[i].abs().sum()
        after = m[i].abs().sum()
        out.append(1.0 if bool(before < 1e-7) or bool(after < 1e-7) else float(before / after))
    return out


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


def _finish(x: TensorInputs, merged: torch.Tensor) -> torch.Tensor:
    if x.params["lambda"] != 1:
        merged = merged * x.params["lambda"]
    return x.base + merged


def breadcrumbs_merge(x: TensorInputs) -> torch.Tensor:
    """``theta_0 + lambda * sum_i w_i m_i tau_i`` (divided by ``sum_i w_i`` when ``normalize``)."""
    tv = weigh()(sparsified(x))
    return _finish(x, linear_combine(tv, normalize=x.params["normalize"]))


def breadcrumbs_ties_merge(x: TensorInputs) -> torch.Tensor:
    """Breadcrumbs masks, then TIES' sign election (ties elect +1) and the agreeing (weighted) sum."""
    tv = elect_sign(1.0)(weigh()(sparsified(x)))
    return _finish(x, disjoint_merge(tv, normalize=x.params["normalize"], divisor="weight"))


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
    notes=_NOTES + " The sign election is mergekit's (a zero sum elects +1, the mean divides by the "
                   "agreeing weights when normalize); the breadcrumbs paper has no TIES variant.",
))
