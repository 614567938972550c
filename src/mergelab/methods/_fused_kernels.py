"""numba kernels behind :mod:`mergelab.methods.fused` (imported only through it, lazily).

Each kernel works on one range ``[lo, hi)`` of flat float32 arrays (``models`` is a tuple of 1-D
arrays, one per model), releases the GIL, and is run on several ranges side by side
by the caller. The arithmetic is written to be the same float32
operations, in the same order, as the torch code it replaces (see the docstrings in ``fused``).
"""

import numpy as np
from numba import njit, types
from numba.extending import overload

from mergelab.methods.randomness import GAMMA, MIX1, MIX2, SHIFT1, SHIFT2, SHIFT3

_FLOAT32_MAX = np.float32(3.4028234663852886e38)
_EVERY = np.int64(1 << 62)  # a tie index above every entry (mergelab.methods.select.EVERY)
_BLOCK = 2048  # elements whose intermediates stay in the L1 cache between the two passes over models

_JIT = dict(cache=True, nogil=True, boundscheck=False, error_model="numpy")


def widen(value):
    """The float32 value of an input entry: float32 as is, bfloat16 (stored as uint16 bits) widened
    exactly (its bits are the high half of the float32's)."""
    raise NotImplementedError  # only called from compiled code, where the overload below applies


@overload(widen, inline="always")
def _widen(value):
    if isinstance(value, types.Float):
        return lambda value: value
    if isinstance(value, types.Integer) and value.bitwidth == 16:
        return lambda value: np.uint32(np.uint32(value) << np.uint32(16)).view(np.float32)
    return None


def narrow(out, value):
    """``value`` (float32) as an entry of ``out``: itself for float32 output, or for bfloat16 output
    (stored as uint16 bits) rounded to the nearest even, as torch's ``Tensor.to(torch.bfloat16)``
    rounds; a NaN becomes the quiet NaN 0x7FC0 (torch's payload and sign are not copied)."""
    raise NotImplementedError  # only called from compiled code, where the overload below applies


@overload(narrow, inline="always")
def _narrow(out, value):
    if isinstance(out, types.Array) and isinstance(out.dtype, types.Float):
        return lambda out, value: value
    if isinstance(out, types.Array) and out.dtype == types.uint16:
        def to_bfloat16(out, value):
            if value != value:
                return np.uint16(0x7FC0)
            bits = np.uint32(np.float32(value).view(np.uint32))
            bits = bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))
            return np.uint16(bits >> np.uint32(16))
        return to_bfloat16
    return None


@njit(inline="always")
def block_words(key, start, size, scratch):
    """Words ``start .. start + size - 1`` of the random stream keyed ``key`` (uint32; see
    :mod:`mergelab.methods.randomness`), computed into ``scratch`` (uint64, at least
    ``size // 2 + 1`` long) and returned as a view of it."""
    first = start >> 1
    stop = (start + size + 1) >> 1
    for k in range(first, stop):
        z = key + np.uint64(k + 1) * GAMMA
        z = (z ^ (z >> SHIFT1)) * MIX1
        z = (z ^ (z >> SHIFT2)) * MIX2
        scratch[k - first] = z ^ (z >> SHIFT3)
    skip = start - 2 * first
    return scratch.view(np.uint32)[skip:skip + size]


@njit(**_JIT)
def high_histograms(models, base, lo, hi, hist):
    """``hist[i, b] += #{j in [lo, hi): high 16 bits of |models[i, j] - base[j]| == b}``."""
    for i in range(len(models)):
        m = models[i]
        h = hist[i]
        for j in range(lo, hi):
            d = np.float32(abs(widen(m[j]) - widen(base[j])))
            h[d.view(np.int32) >> 16] += 1


@njit(**_JIT)
def low_histograms(models, base, lo, hi, buckets, hist):
    """``hist[i, b] += #{j: |models[i, j] - base[j]| has high bits buckets[i] and low bits b}``
    for each model with ``buckets[i] >= 0``."""
    for i in range(len(models)):
        want = buckets[i]
        if want < 0:
            continue
        m = models[i]
        h = hist[i]
        for j in range(lo, hi):
            bits = np.float32(abs(widen(m[j]) - widen(base[j]))).view(np.int32)
            if (bits >> 16) == want:
                h[bits & 0xFFFF] += 1


@njit(**_JIT)
def tie_cutoff(model, base, lo, hi, bits, need):
    """Scan ``[lo, hi)`` in order for entries with ``|model[j] - base[j]|`` of bit pattern ``bits``
    (float32): ``(j + 1, need)`` at the ``need``-th one, else ``(-1, number seen)``."""
    seen = 0
    for j in range(lo, hi):
        d = np.float32(abs(widen(model[j]) - widen(base[j])))
        if d.view(np.int32) == bits:
            seen += 1
            if seen == need:
                return j + 1, seen
    return -1, seen


# Only the two L1 sums may be reassociated (their order is not part of any reference result: the
# tensor code's float32 sums round differently anyway); it lets them vectorize.
@njit(cache=True, nogil=True, boundscheck=False, error_model="numpy", fastmath={"reassoc"})
def masked_l1(models, base, lo, hi, keys, keep_below, sums, kept):
    """``sums[i, 0] += sum |d|`` and ``sums[i, 1] += sum |d * keep|`` over ``[lo, hi)`` (float64),
    ``d = models[i] - base``, ``keep = word_j < keep_below[i]`` with ``word_j`` the ``j``-th word of
    the stream keyed ``keys[i]``; the keep flags are also stored in ``kept[i, j]`` (uint8) unless
    ``kept`` has no columns. Returns the number of non-finite ``d`` seen."""
    bad = 0
    scratch = np.empty(_BLOCK // 2 + 1, np.uint64)
    store = kept.shape[1] > 0
    # Block by block, all models: the base's block stays in the L1 cache (twice as fast as model by model).
    for start in range(lo, hi, _BLOCK):
        size = min(hi, start + _BLOCK) - start
        b = base[start:start + size]
        for i in range(len(models)):
            m = models[i][start:start + size]
            limit = keep_below[i]
            before = 0.0
            after = 0.0
            if limit > 0xFFFFFFFF:
                for j in range(size):
                    a = np.float64(abs(widen(m[j]) - widen(b[j])))
                    bad += 0 if a <= _FLOAT32_MAX else 1
                    before += a
                after = before
            else:
                w = block_words(keys[i], start, size, scratch)
                for j in range(size):
                    a = np.float64(abs(widen(m[j]) - widen(b[j])))
                    bad += 0 if a <= _FLOAT32_MAX else 1
                    before += a
                    after += a if np.int64(w[j]) < limit else 0.0
                if store:
                    k = kept[i, start:start + size]
                    for j in range(size):
                        k[j] = 1 if np.int64(w[j]) < limit else 0
            sums[i, 0] += before
            sums[i, 1] += after
    return bad


@njit(inline="always")
def prepare_block(model, base, start, size, i, thresholds, cutoffs, raised, keys, keep_below, kept, factors, divisors,
                  weights, scratch, p):
    """Model ``i``'s prepared task vector on ``[start, start + size)`` into ``p``: per entry ``j``,
    ``d = model[j] - base[j]``; ``d = 0`` unless ``|d| > thresholds[i]``, or ``|d| == thresholds[i]``
    and ``j < cutoffs[i]`` (the trim's :class:`~mergelab.methods.select.Cut`, its tie index local to
    these arrays; entries before it are compared with ``>= thresholds[i]``, entries after it with
    ``>= raised[i]``, the next float32 up); where ``keep_below[i] < 2**32``,
    ``d = d * (word_j < keep_below[i])`` with ``word_j`` the ``j``-th word of the stream keyed
    ``keys[i]`` (DARE's drop, as a multiply by the mask; where ``kept`` has columns, the keep flags
    :func:`masked_l1` stored from the same words are read instead); then
    ``p[j] = d * factors[i] / divisors[i] * weights[i]``. Returns the number of non-finite ``d``."""
    zero = np.float32(0.0)
    one = np.float32(1.0)
    m = model[start:start + size]
    b = base[start:start + size]
    f = factors[i]
    q = divisors[i]
    w = weights[i]
    limit = keep_below[i]
    lim = min(max(cutoffs[i] - start, 0), size)
    bad = 0
    k = kept[i, start:start + size]  # empty unless flags were stored
    wd = scratch.view(np.uint32)[0:0]
    if limit <= 0xFFFFFFFF and kept.shape[1] == 0:
        wd = block_words(keys[i], start, size, scratch)
    for part in range(2):
        j0 = 0 if part == 0 else lim
        j1 = lim if part == 0 else size
        t = thresholds[i] if part == 0 else raised[i]
        if limit <= 0xFFFFFFFF and kept.shape[1] > 0:
            for j in range(j0, j1):
                d = widen(m[j]) - widen(b[j])
                bad += 0 if abs(d) <= _FLOAT32_MAX else 1
                d = d if abs(d) >= t else zero
                d = d * (one if k[j] != 0 else zero)
                p[j] = d * f / q * w
        elif limit <= 0xFFFFFFFF:
            for j in range(j0, j1):
                d = widen(m[j]) - widen(b[j])
                bad += 0 if abs(d) <= _FLOAT32_MAX else 1
                d = d if abs(d) >= t else zero
                d = d * (one if np.int64(wd[j]) < limit else zero)
                p[j] = d * f / q * w
        else:
            for j in range(j0, j1):
                d = widen(m[j]) - widen(b[j])
                bad += 0 if abs(d) <= _FLOAT32_MAX else 1
                d = d if abs(d) >= t else zero
                p[j] = d * f / q * w
    return bad


@njit(inline="always")
def prepare_and_sum(models, base, start, size, thresholds, cutoffs, raised, keys, keep_below, kept, factors, divisors,
                    weights, scratch, prepared, total):
    """Every model's prepared block (:func:`prepare_block`) into ``prepared[i]``, and their sum in
    model order into ``total``. Returns the number of non-finite task-vector entries."""
    bad = 0
    for i in range(len(models)):
        bad += prepare_block(models[i], base, start, size, i, thresholds, cutoffs, raised, keys, keep_below, kept,
                             factors, divisors, weights, scratch, prepared[i])
    for j in range(size):
        total[j] = prepared[0, j]
    for i in range(1, len(models)):
        p = prepared[i]
        for j in range(size):
            total[j] = total[j] + p[j]
    return bad


@njit(**_JIT)
def consensus(models, base, lo, hi, thresholds, cutoffs, raised, keys, keep_below, kept, factors, divisors, weights,
              tie_up, normalize, count_divisor, lam, out):
    """TIES' elect-sign and disjoint merge of prepared task vectors, plus the base, into ``out``.

    Each model's task vector is prepared as :func:`prepare_block` says (``d``). The elected sign is
    ``+1`` where ``sum_i d >= 0`` (``tie_up``) or ``> 0``, else ``-1``; the merged delta is ``sign * sum_i relu(sign * d_i)``, divided (``normalize``) by the summed weights
    (or the count, ``count_divisor``) of the agreeing models, a zero divisor becoming 1 (or at least
    1), times ``lam``, plus the base. Sums run in model order. Returns the number of non-finite ``d``
    seen (the caller then takes the reference path, whose NaN handling this does not copy).
    """
    n = len(models)
    zero = np.float32(0.0)
    one = np.float32(1.0)
    prepared = np.empty((n, _BLOCK), np.float32)
    total = np.empty(_BLOCK, np.float32)
    div = np.empty(_BLOCK, np.float32)
    sign = np.empty(_BLOCK, np.float32)
    scratch = np.empty(_BLOCK // 2 + 1, np.uint64)
    bad = 0
    for start in range(lo, hi, _BLOCK):
        size = min(hi, start + _BLOCK) - start
        b = base[start:start + size]
        bad += prepare_and_sum(models, base, start, size, thresholds, cutoffs, raised, keys, keep_below, kept, factors,
                               divisors, weights, scratch, prepared, total)
        for j in range(size):
            s = total[j]
            up = s >= zero if tie_up else s > zero
            sign[j] = one if up else -one
        for i in range(n):
            p = prepared[i]
            c = one if count_divisor else weights[i]
            for j in range(size):
                r = p[j] * sign[j]
                r = r if r > zero else zero
                agree = one if r > zero else zero
                if i == 0:
                    total[j] = r
                    div[j] = agree * c
                else:
                    total[j] = total[j] + r
                    div[j] = div[j] + agree * c
        for j in range(size):
            merged = total[j] * sign[j]
            if normalize:
                dv = div[j]
                if count_divisor:
                    dv = dv if dv > one else one
                else:
                    dv = dv if dv != zero else one
                merged = merged / dv
            out[start + j] = narrow(out, merged * lam + widen(b[j]))
    return bad


@njit(**_JIT)
def weighted_sum(models, base, lo, hi, keys, keep_below, kept, factors, divisors, weights, divide_by, lam, out):
    """``out = base + (sum_i d_i) / divide_by * lam`` with each model's task vector ``d_i`` prepared as
    :func:`prepare_block` says (no trim); the sum runs in model order. Returns the number of
    non-finite ``d`` seen."""
    n = len(models)
    prepared = np.empty((n, _BLOCK), np.float32)
    total = np.empty(_BLOCK, np.float32)
    no_trim = np.zeros(n, np.float32)
    every = np.full(n, _EVERY, np.int64)
    scratch = np.empty(_BLOCK // 2 + 1, np.uint64)
    bad = 0
    for start in range(lo, hi, _BLOCK):
        size = min(hi, start + _BLOCK) - start
        b = base[start:start + size]
        bad += prepare_and_sum(models, base, start, size, no_trim, every, no_trim, keys, keep_below, kept, factors,
                               divisors, weights, scratch, prepared, total)
        for j in range(size):
            out[start + j] = narrow(out, total[j] / divide_by * lam + widen(b[j]))
    return bad
