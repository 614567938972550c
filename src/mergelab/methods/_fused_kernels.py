"""numba kernels behind :mod:`mergelab.methods.fused` (imported only through it, lazily).

Each kernel works on one range ``[lo, hi)`` of flat float32 arrays (``models`` and ``words`` are
tuples of 1-D arrays, one per model), releases the GIL, and is run on several ranges side by side
by the caller. The arithmetic is written to be the same float32
operations, in the same order, as the torch code it replaces (see the docstrings in ``fused``).
"""

import numpy as np
from numba import njit, types
from numba.extending import overload

_FLOAT32_MAX = np.float32(3.4028234663852886e38)
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


@njit(**_JIT)
def sfc64_fill(state, out):
    """Fill ``out`` (uint64) with the next outputs of the SFC64 generator whose ``state`` is
    ``[a, b, c, counter]`` (updated in place): the numbers numpy's ``SFC64.random_raw`` gives."""
    a, b, c, counter = state[0], state[1], state[2], state[3]
    s11, s3, s24, s40 = np.uint64(11), np.uint64(3), np.uint64(24), np.uint64(40)
    one = np.uint64(1)
    for j in range(out.size):
        tmp = a + b + counter
        counter += one
        a = b ^ (b >> s11)
        b = c + (c << s3)
        c = ((c << s24) | (c >> s40)) + tmp
        out[j] = tmp
    state[0], state[1], state[2], state[3] = a, b, c, counter


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


# Only the two L1 sums may be reassociated (their order is not part of any reference result: the
# tensor code's float32 sums round differently anyway); it lets them vectorize.
@njit(cache=True, nogil=True, boundscheck=False, error_model="numpy", fastmath={"reassoc"})
def masked_l1(models, base, lo, hi, words, keep_below, sums):
    """``sums[i, 0] += sum |d|`` and ``sums[i, 1] += sum |d * keep|`` over ``[lo, hi)`` (float64),
    ``d = models[i] - base``, ``keep = words[i] < keep_below[i]``. Returns the number of non-finite
    ``d`` seen."""
    bad = 0
    for i in range(len(models)):
        m = models[i]
        w = words[i]
        k = keep_below[i]
        before = 0.0
        after = 0.0
        for j in range(lo, hi):
            a = np.float64(abs(widen(m[j]) - widen(base[j])))
            bad += 0 if a <= _FLOAT32_MAX else 1
            before += a
            after += a if np.int64(w[j]) < k else 0.0
        sums[i, 0] += before
        sums[i, 1] += after
    return bad


@njit(**_JIT)
def consensus(models, base, lo, hi, thresholds, words, keep_below, use_words, factors, divisors, weights,
              tie_up, normalize, count_divisor, lam, out):
    """TIES' elect-sign and disjoint merge of prepared task vectors, plus the base, into ``out``.

    Per model ``i`` and entry ``j``: ``d = models[i, j] - base[j]``; ``d = 0`` unless
    ``|d| >= thresholds[i]`` (trim) and, with ``use_words``, ``d = d * (words[i, j] < keep_below[i])``
    (a random drop, as a multiply by the mask); then ``d = d * factors[i] / divisors[i] * weights[i]``.
    The elected sign is ``+1`` where ``sum_i d >= 0`` (``tie_up``) or ``> 0``, else ``-1``; the
    merged delta is ``sign * sum_i relu(sign * d_i)``, divided (``normalize``) by the summed weights
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
    bad = 0
    for start in range(lo, hi, _BLOCK):
        size = min(hi, start + _BLOCK) - start
        b = base[start:start + size]
        for i in range(n):
            m = models[i][start:start + size]
            p = prepared[i]
            t = thresholds[i]
            f = factors[i]
            q = divisors[i]
            w = weights[i]
            if use_words:
                wd = words[i][start:start + size]
                k = keep_below[i]
                for j in range(size):
                    d = widen(m[j]) - widen(b[j])
                    bad += 0 if abs(d) <= _FLOAT32_MAX else 1
                    d = d if abs(d) >= t else zero
                    d = d * (one if np.int64(wd[j]) < k else zero)
                    p[j] = d * f / q * w
            else:
                for j in range(size):
                    d = widen(m[j]) - widen(b[j])
                    bad += 0 if abs(d) <= _FLOAT32_MAX else 1
                    d = d if abs(d) >= t else zero
                    p[j] = d * f / q * w
        for j in range(size):
            total[j] = prepared[0, j]
        for i in range(1, n):
            p = prepared[i]
            for j in range(size):
                total[j] = total[j] + p[j]
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
            out[start + j] = merged * lam + widen(b[j])
    return bad
