"""Fused CPU kernels for the hot loops of TIES and DARE: one pass over the inputs, not thirty.

On a CPU, TIES written as tensor operations (subtract, trim, weigh, sum, sign, relu, sum, count,
divide, add) reads and writes every entry some thirty times, and its per-tensor trim threshold is a
partition of every task vector; the merge is bound by memory traffic, not arithmetic. These kernels
(compiled by numba, in :mod:`mergelab.methods._fused_kernels`) do the same float32 operations in
the same order in two passes over cache-sized blocks, and find TIES' exact trim
(:class:`mergelab.methods.select.Cut`: the k-th largest ``|tau|`` and, where entries tie with it,
the flat index of the last one kept) with two histogram passes over the raw inputs and at most a
partial third (a radix select on the IEEE-754 bit patterns, as :func:`mergelab.methods.select.top_cuts`,
without materialising the task vectors).

The tensor code in :mod:`mergelab.methods.ties` and :mod:`mergelab.methods.dare` stays the
reference (and the path on GPUs and wherever numba is missing); ``tests/methods/test_fused.py``
checks that both give the same bits. Two documented differences: DARE's L1 norms are summed here in
float64 (the tensor code sums in float32), so its rescale factors, and so the merged values, can
differ in the last bits between the two paths (each path is deterministic); and the sign of a zero
may differ where the base weight itself is zero. Inputs holding NaN or inf make a kernel report
them, and the caller takes the reference path, which defines what NaN does.

The kernels compile on first use and are cached on disk next to their source by numba (about
10 seconds once; a fresh process then loads them in well under a second). ``MERGELAB_FUSED=0`` in the
environment turns them off.
"""

from __future__ import annotations

import math
import os
from typing import Callable, Iterable, List, Optional, Sequence, Tuple

import numpy as np
import torch

from mergelab.methods.parallel import map_models
from mergelab.methods.select import EVERY, Cut, bits_value, located_cut, locate_from_top, split_ranks

_BINS = 1 << 16
_RANGE = 1 << 18  # elements per parallel task (fixed: float64 partial sums then combine the same way)

_kernels = None
_unavailable = False


def _turned_off() -> bool:
    return _unavailable or os.environ.get("MERGELAB_FUSED", "1") == "0"


def kernels():
    """The compiled kernels module, or None (turned off, or numba missing)."""
    global _kernels, _unavailable
    if _kernels is None and not _unavailable:
        if _turned_off():
            _unavailable = True
            return None
        try:
            from mergelab.methods import _fused_kernels
        except ImportError:
            _unavailable = True
            return None
        _kernels = _fused_kernels
    return _kernels


def warm_up(num_models: int) -> None:
    """Load (or compile) the kernels for ``num_models`` inputs on a background thread, now.

    Loading numba and the cached kernels costs about a second of mostly Python work; started when
    a merge starts, it overlaps the first reads (which release the GIL) instead of delaying the
    first tensor. Calls made meanwhile wait for it (numba's dispatchers hold a compile lock).
    """
    import threading

    def run() -> None:
        k = kernels()
        if k is None:
            return
        base = np.zeros(4, np.float32)
        models = tuple(np.zeros(4, np.float32) for _ in range(num_models))
        keys = np.zeros(num_models, np.uint64)
        counts = np.zeros((num_models, _BINS), np.int64)
        k.high_histograms(models, base, 0, 4, counts)
        k.low_histograms(models, base, 0, 4, np.zeros(num_models, np.int32), counts)
        limits = np.zeros(num_models, np.int64)
        kept = np.zeros((num_models, 4), np.uint8)
        k.masked_l1(models, base, 0, 4, keys, limits, np.zeros((num_models, 2)), kept)
        k.tie_cutoff(models[0], base, 0, 4, np.int32(0), 1)
        ones = np.ones(num_models, np.float32)
        every = np.full(num_models, EVERY, np.int64)
        for out in (np.empty(4, np.float32), np.empty(4, np.uint16)):
            k.consensus(models, base, 0, 4, ones, every, ones, keys, limits, kept, ones, ones, ones, True, True, False,
                        np.float32(1), out)
            k.weighted_sum(models, base, 0, 4, keys, limits, kept, ones, ones, ones, np.float32(1), np.float32(1),
                           out)

    if num_models > 0 and not _turned_off():
        threading.Thread(target=run, name="mergelab-fused-warm-up", daemon=True).start()


def usable(base: torch.Tensor, *models: torch.Tensor) -> bool:
    """Whether the kernels can take these tensors: numba present, contiguous CPU tensors in float32
    or bfloat16 (read as stored: the kernels widen it exactly), the models all of one dtype."""
    return kernels() is not None and len({m.dtype for m in models}) <= 1 and all(
        t.device.type == "cpu" and t.dtype in (torch.float32, torch.bfloat16) and t.is_contiguous()
        for t in (base,) + models)


def _output(size: int, dtype: Optional[torch.dtype]) -> Tuple[np.ndarray, torch.Tensor]:
    """The kernels' output buffer and the tensor it is: bfloat16 (written as its bits, rounded to
    nearest even as ``Tensor.to`` rounds) when ``dtype`` is bfloat16, which saves the float32
    result's memory traffic and the cast after it; float32 otherwise (the caller casts)."""
    if dtype == torch.bfloat16:
        out = np.empty(size, np.uint16)
        return out, torch.from_numpy(out.view(np.int16)).view(torch.bfloat16)
    out = np.empty(size, np.float32)
    return out, torch.from_numpy(out)


def _flat(t: torch.Tensor) -> np.ndarray:
    """A flat numpy view: float32, or a bfloat16 tensor's bits as uint16 (numpy has no bfloat16)."""
    t = t.detach().reshape(-1)
    return (t.view(torch.uint16) if t.dtype == torch.bfloat16 else t).numpy()


def _ranges(n: int, parts: Optional[int] = None) -> List[Tuple[int, int]]:
    """``[lo, hi)`` ranges covering ``range(n)``: ``parts`` equal ones, or ``_RANGE``-sized ones."""
    if parts is None:
        parts = max(1, math.ceil(n / _RANGE))
    parts = max(1, min(parts, n)) if n else 1
    bounds = [n * p // parts for p in range(parts + 1)]
    return [(bounds[p], bounds[p + 1]) for p in range(parts)]


def _threads() -> int:
    return os.cpu_count() or 1


# ---------------------------------------------------------------------------------------- order statistics
ChunkStream = Callable[[], Iterable[Tuple[torch.Tensor, Sequence[torch.Tensor]]]]


def top_cuts_deltas(chunks: ChunkStream, ks: Sequence[Optional[int]], numel: int,
                    exact: bool = True) -> List[Optional[Cut]]:
    """The top-``ks[i]`` :class:`~mergelab.methods.select.Cut` of ``|models[i] - base|`` (None skips
    model ``i``) over a re-iterable stream of ``(base, models)`` row chunks, in flat order, that hold
    ``numel`` entries per model.

    The same cut as :func:`mergelab.methods.select.top_cuts` on the stacked task vectors, without
    materialising them: two histogram passes, and where ties at the threshold must be split
    (``exact``), a third that stops at the last tied entry kept (for a stream of one chunk, the second
    pass's per-range histograms say which range holds it, and only that range is scanned).
    ``chunks()`` is called two or three times.
    """
    k = kernels()
    out, want = split_ranks(ks, numel)
    if not want:
        return out
    high = _histograms(chunks, want, k.high_histograms)
    located = [locate_from_top(torch.from_numpy(high[r]), int(ks[i])) for r, i in enumerate(want)]
    buckets = np.array([bucket for bucket, _ in located], np.int32)
    single: list = []  # the ranges of a one-chunk stream and their low histograms
    low = _histograms(chunks, want, lambda ms, b, lo, hi, h: k.low_histograms(ms, b, lo, hi, buckets, h),
                      single if exact else None)
    remaining = {}
    for r, i in enumerate(want):
        bucket, rank = located[r]
        lowbits, quota = locate_from_top(torch.from_numpy(low[r]), rank)
        tied = int(low[r][lowbits])
        out[i] = located_cut(bits_value(bucket, lowbits), int(ks[i]), quota, tied)
        if exact and quota < tied and not math.isnan(out[i].value):
            remaining[i] = (r, lowbits, np.int32((bucket << 16) | lowbits), quota)
    if not remaining:
        return out
    if single:
        # One chunk: each range's count of tied entries is in its low histogram, so only the range
        # holding the quota-th tie is scanned.
        (base, models), = chunks()
        b = _flat(base)

        def find(i: int) -> int:
            r, lowbits, bits, quota = remaining[i]
            for lo, hi, h in single:
                here = int(h[r, lowbits])
                if quota <= here:
                    index, _ = k.tie_cutoff(_flat(models[i]), b, lo, hi, bits, quota)
                    return index
                quota -= here
            raise RuntimeError("internal: fewer tied entries than the histograms counted")

        todo = list(remaining)
        for i, index in zip(todo, map_models(find, todo)):
            out[i] = Cut(out[i].value, index, out[i].asked, out[i].asked)
        return out
    offset = 0
    for base, models in chunks():
        b = _flat(base)
        todo = list(remaining)
        found = map_models(lambda i: k.tie_cutoff(_flat(models[i]), b, 0, b.size, *remaining[i][2:]), todo)
        for i, (index, seen) in zip(todo, found):
            if index >= 0:
                out[i] = Cut(out[i].value, offset + index, out[i].asked, out[i].asked)
                del remaining[i]
            else:
                r, lowbits, bits, quota = remaining[i]
                remaining[i] = (r, lowbits, bits, quota - seen)
        offset += b.size
        if not remaining:
            break
    if remaining:
        raise RuntimeError("internal: fewer tied entries than the histograms counted (the stream changed)")
    return out


def kth_largest_abs_deltas(chunks: ChunkStream, ks: Sequence[Optional[int]], numel: int) -> List[Optional[float]]:
    """The thresholds of :func:`top_cuts_deltas` (the exact k-th largest ``|models[i] - base|``):
    ``k <= 0`` gives ``inf``, ``k >= numel`` gives ``0.0``. ``chunks()`` is called twice."""
    return [None if c is None else c.value for c in top_cuts_deltas(chunks, ks, numel, exact=False)]


def _histograms(chunks: ChunkStream, want: List[int], count, parts_of: Optional[list] = None) -> np.ndarray:
    """``[len(want), 65536]`` counts over the stream: ``count(models, base, lo, hi, hist)`` run on
    parallel ranges of each chunk (models ``want`` only), one histogram per range, then summed. With
    ``parts_of`` (a list), a stream of one chunk leaves its ranges there as ``(lo, hi, hist)``."""
    total = np.zeros((len(want), _BINS), np.int64)
    seen = 0
    for base, models in chunks():
        b = _flat(base)
        ms = tuple(_flat(models[i]) for i in want)
        parts = _ranges(b.size, _threads())
        hists = [np.zeros((len(want), _BINS), np.int64) for _ in parts]
        map_models(lambda p: count(ms, b, parts[p][0], parts[p][1], hists[p]), range(len(parts)))
        for h in hists:
            total += h
        seen += 1
        if parts_of is not None:
            parts_of[:] = [(lo, hi, h) for (lo, hi), h in zip(parts, hists)] if seen == 1 else []
    return total


# ---------------------------------------------------------------------------------------- DARE's L1 norms
def masked_l1_sums(base: torch.Tensor, models: Sequence[torch.Tensor], keys: Sequence[int],
                   keep_below: Sequence[int], kept: Optional[np.ndarray] = None) -> Optional[np.ndarray]:
    """``[n, 2]`` float64: ``sum |tau_i|`` and ``sum |tau_i * keep_i|``, where entry ``j`` is kept when
    word ``j`` of the random stream keyed ``keys[i]`` is below ``keep_below[i]`` (``2**32`` keeps
    all); None if a task vector holds NaN or inf. Summed in fixed ranges, then in range order, so
    the result does not depend on threads. With ``kept`` (uint8 ``[n, numel]``), the keep flags of
    the models that drop are stored there, for :func:`consensus_merge` to read instead of drawing
    the words again."""
    k = kernels()
    b = _flat(base)
    ms = tuple(_flat(m) for m in models)
    parts = _ranges(b.size)
    sums = [np.zeros((len(ms), 2), np.float64) for _ in parts]
    keys64, limits, kept = _drop_arrays(len(ms), keys, keep_below, kept)
    bad = map_models(lambda p: k.masked_l1(ms, b, parts[p][0], parts[p][1], keys64, limits, sums[p], kept),
                     range(len(parts)))
    if any(bad):
        return None
    return np.sum(sums, axis=0)  # _ranges gives at least one range


# ---------------------------------------------------------------------------------------- sign election and merge
def consensus_merge(base: torch.Tensor, models: Sequence[torch.Tensor], *, thresholds: Sequence[float],
                    cutoffs: Optional[Sequence[int]] = None, factors: Sequence[float], divisors: Sequence[float], weights: Sequence[float],
                    tie_sign: float, normalize: bool, count_divisor: bool, lam: float,
                    keys: Optional[Sequence[int]] = None, keep_below: Optional[Sequence[int]] = None,
                    kept: Optional[np.ndarray] = None,
                    out_dtype: Optional[torch.dtype] = None) -> Optional[torch.Tensor]:
    """``base + lam * disjoint_merge(elect_sign(prepared task vectors))`` as one fused pass; see
    :func:`mergelab.methods._fused_kernels.consensus` for the exact operations. Model ``i`` keeps the
    entries with ``|d| > thresholds[i]``, and those equal to it before flat index ``cutoffs[i]`` of
    these tensors (all of them without ``cutoffs``). With ``keys``, model
    ``i``'s entry ``j`` is dropped unless word ``j`` of the random stream keyed ``keys[i]`` is below
    ``keep_below[i]`` (DARE; ``kept``: the keep flags :func:`masked_l1_sums` stored from the same
    words). ``tie_sign`` must be ``+1`` or ``-1``. The result is float32, or bfloat16 if
    ``out_dtype`` says so (see :func:`_output`). Returns None if a task vector holds NaN or inf (take
    the reference path)."""
    if tie_sign not in (1, -1):
        raise ValueError(f"fused consensus_merge needs a tie sign of +1 or -1, got {tie_sign}")
    n = len(models)
    if keys is None:
        keys, keep_below = [0] * n, [1 << 32] * n
    drop = _drop_arrays(n, keys, keep_below, kept)
    thr, fac, dvs, wts = _f32(thresholds), _f32(factors), _f32(divisors), _f32(weights)
    cut = np.asarray([EVERY] * n if cutoffs is None else [min(max(int(c), -1), EVERY) for c in cutoffs], np.int64)
    raised = np.nextafter(thr, np.float32(np.inf))
    lam32 = np.float32(lam)
    k = kernels()
    return _merge_pass(base, models, out_dtype, lambda ms, b, lo, hi, out: k.consensus(
        ms, b, lo, hi, thr, cut, raised, *drop, fac, dvs, wts, tie_sign > 0, normalize, count_divisor, lam32, out))


# ---------------------------------------------------------------------------------------- weighted sum
def weighted_sum_merge(base: torch.Tensor, models: Sequence[torch.Tensor], *, factors: Sequence[float],
                       divisors: Sequence[float], weights: Sequence[float], divide_by: float, lam: float,
                       keys: Sequence[int], keep_below: Sequence[int], kept: Optional[np.ndarray] = None,
                       out_dtype: Optional[torch.dtype] = None) -> Optional[torch.Tensor]:
    """``base + lam * (sum_i prepared task vector i) / divide_by`` as one fused pass (DARE-linear: the
    task vectors dropped and rescaled as in :func:`consensus_merge`, without a trim); see
    :func:`mergelab.methods._fused_kernels.weighted_sum`; float32, or bfloat16 if ``out_dtype`` says
    so (see :func:`_output`). Returns None if a task vector holds NaN or inf (take the reference
    path)."""
    drop = _drop_arrays(len(models), keys, keep_below, kept)
    fac, dvs, wts = _f32(factors), _f32(divisors), _f32(weights)
    div32, lam32 = np.float32(divide_by), np.float32(lam)
    k = kernels()
    return _merge_pass(base, models, out_dtype, lambda ms, b, lo, hi, out: k.weighted_sum(
        ms, b, lo, hi, *drop, fac, dvs, wts, div32, lam32, out))


def _f32(values: Sequence[float]) -> np.ndarray:
    return np.asarray([float(v) for v in values], np.float32)


def _drop_arrays(n: int, keys: Sequence[int], keep_below: Sequence[int],
                 kept: Optional[np.ndarray]) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The kernels' ``keys, keep_below, kept`` arguments (no stored flags: a ``[n, 0]`` array)."""
    flags = np.zeros((n, 0), np.uint8) if kept is None else kept
    return np.asarray(keys, np.uint64), np.asarray(keep_below, np.int64), flags


def _merge_pass(base: torch.Tensor, models: Sequence[torch.Tensor], out_dtype: Optional[torch.dtype],
                kernel: Callable) -> Optional[torch.Tensor]:
    """Run ``kernel(models, base, lo, hi, out)`` on parallel ranges of the flat inputs into one output
    (see :func:`_output`), shaped like ``base``; None if a range saw a non-finite task vector."""
    b = _flat(base)
    ms = tuple(_flat(m) for m in models)
    out, result = _output(b.size, out_dtype)
    parts = _ranges(b.size, max(1, min(4 * _threads(), math.ceil(b.size / (1 << 16)))))
    bad = map_models(lambda p: kernel(ms, b, parts[p][0], parts[p][1], out), range(len(parts)))
    if any(bad):
        return None
    return result.reshape(base.shape)
