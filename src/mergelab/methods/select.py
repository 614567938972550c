"""Exact order statistics over streams of chunks: the k-th largest magnitude without sorting.

TIES and its relatives keep the ``k`` entries of largest magnitude, over one tensor (mergekit) or over
the whole model (the TIES paper). Sorting a whole tensor, let alone a whole model, costs memory and
time (mergekit argsorts with an int64 index per element). Here the threshold is found exactly by a
two-pass radix select on the IEEE-754 bit patterns of ``|x|`` (for non-negative floats the bit pattern
orders like the value): pass one counts the high 16 bits, pass two counts the low 16 bits inside the
one bucket that holds the k-th value. Memory is two histograms per model, whatever the stream's length.

:func:`kth_smallest` does the same for signed values (quantiles of a whole tensor streamed in row
chunks, e.g. Arcee Fusion's importance scores): the float32 bit patterns are first mapped to int32
keys that order like the values.

When the data is one in-memory tensor, :func:`kth_largest_in_memory` gets the same value with a
partition (numpy's introselect on the CPU, ``torch.kthvalue`` elsewhere).
"""

from __future__ import annotations

from typing import Callable, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from mergelab.methods.parallel import map_models

_BINS = 1 << 16


def _bits(values: torch.Tensor) -> torch.Tensor:
    """int32 bit patterns of ``|values|`` as float32, flattened per model: shape ``[n, m]``.

    For non-negative floats the bit pattern orders like the value and is itself non-negative, so
    int32 is enough (no int64 copy: on large chunks every extra full-size buffer costs as much as
    the counting itself).
    """
    a = values.reshape(values.shape[0], -1)
    a = a.abs() if a.dtype == torch.float32 else a.to(torch.float32).abs()
    return a.view(torch.int32)


def _high_histograms(b: torch.Tensor) -> torch.Tensor:
    """Per-model counts of the high 16 bits of ``b`` (``[n, m]`` int32): ``[n, 65536]`` int64.

    One ``bincount`` for all models: model ``i``'s buckets are offset by ``i * 65536``.
    """
    n = b.shape[0]
    idx = b >> 16
    if n > 1:
        idx += (torch.arange(n, dtype=idx.dtype, device=idx.device) * _BINS).unsqueeze(1)
    return torch.bincount(idx.reshape(-1), minlength=n * _BINS).reshape(n, _BINS)


def locate_from_top(hist: torch.Tensor, k: int) -> tuple:
    """Bucket holding the k-th largest count-wise (1-based), and the rank within it from the top."""
    from_top = torch.flip(hist, dims=[0]).cumsum(0)
    idx = int(torch.searchsorted(from_top, torch.tensor([k], dtype=from_top.dtype, device=from_top.device)).item())
    bucket = hist.numel() - 1 - idx
    above = int(from_top[idx - 1].item()) if idx > 0 else 0
    return bucket, k - above


def split_ranks(ks: Sequence[Optional[int]], total: int) -> Tuple[list, List[int]]:
    """The answers a k-th-largest search knows without looking, and the ranks it must search for.

    Returns ``(out, want)``: ``out[i]`` is ``inf`` for ``ks[i] <= 0`` (nothing reaches it), ``0.0``
    for ``ks[i] >= total`` (everything does), None for ``ks[i]`` None (model skipped) or in range;
    ``want`` lists the indices with ``0 < ks[i] < total``.
    """
    out: list = [None] * len(ks)
    want: List[int] = []
    for i, k in enumerate(ks):
        if k is None:
            continue
        if k <= 0:
            out[i] = float("inf")
        elif k >= total:
            out[i] = 0.0
        else:
            want.append(i)
    return out, want


def kth_largest_abs(
    chunks: Callable[[], Iterable[torch.Tensor]],
    ks: Union[Sequence[int], Callable[[int], Sequence[int]]],
) -> List[float]:
    """Exact k-th largest ``|x|`` per model over a re-iterable stream of ``[n, ...]`` chunks.

    ``chunks()`` is called twice. ``ks[i]`` is 1-based; ``k <= 0`` gives ``inf`` (nothing reaches
    it) and ``k`` at or beyond the number of entries gives ``0.0`` (everything does). ``ks`` may be a
    function of the number of entries per model, which is known only after the first pass.
    """
    hi = None
    total = 0
    for c in chunks():
        b = _bits(c)
        h = _high_histograms(b)
        hi = h if hi is None else hi + h
        total += b.shape[1]
        del b
    if callable(ks):
        ks = ks(total)
    if hi is None:
        return [float("inf") if k <= 0 else 0.0 for k in ks]
    out, want = split_ranks(ks, total)
    if not want:
        return out
    hi = hi.cpu()
    located = {i: locate_from_top(hi[i], int(ks[i])) for i in want}
    lo = {i: torch.zeros(_BINS, dtype=torch.int64) for i in want}
    for c in chunks():
        b = _bits(c)
        for i in want:
            bucket, _ = located[i]
            row = b[i]
            sel = row[(row >> 16) == bucket]
            if sel.numel():
                lo[i] += torch.bincount(sel & 0xFFFF, minlength=_BINS).cpu()
        del b
    for i in want:
        bucket, rank = located[i]
        low, _ = locate_from_top(lo[i], rank)
        pattern = np.array([(bucket << 16) | low], dtype=np.int32)
        out[i] = float(pattern.view(np.float32)[0])
    return out


def _ordered_keys(values: torch.Tensor) -> torch.Tensor:
    """Flat int32 keys of ``values`` as float32 whose int32 order is the float order.

    A non-negative float's bit pattern is a non-negative int32 that orders like the value; a negative
    float's pattern has the sign bit set and grows with the magnitude, so its 31 magnitude bits are
    flipped (``bits ^ 0x7FFFFFFF``): larger magnitudes become smaller (more negative) keys. ``-0.0``
    maps to ``-1``, just below ``+0.0``'s ``0``, with nothing in between, so either zero answers a
    rank that falls on zeros. NaNs are not ordered meaningfully (callers pass finite values).
    """
    a = values.reshape(-1)
    a = a if a.dtype == torch.float32 else a.to(torch.float32)
    bits = a.view(torch.int32)
    keys = bits >> 31  # -1 for negatives, 0 otherwise (a fresh buffer: the input is never written)
    keys &= 0x7FFFFFFF
    keys ^= bits
    return keys


def _key_value(key: int) -> float:
    """The float32 value whose :func:`_ordered_keys` key is ``key`` (an int in the int32 range)."""
    k = np.array([key], dtype=np.int32)
    if key < 0:
        k ^= np.int32(0x7FFFFFFF)
    return float(k.view(np.float32)[0])


def _locate_from_bottom(hist: torch.Tensor, k: int) -> tuple:
    """Bucket holding the k-th smallest count-wise (1-based), and the rank within it from the bottom."""
    below = hist.cumsum(0)
    idx = int(torch.searchsorted(below, torch.tensor([k], dtype=below.dtype)).item())
    return idx, k - (int(below[idx - 1].item()) if idx > 0 else 0)


def kth_smallest(
    chunks: Callable[[], Iterable[torch.Tensor]],
    ks: Union[Sequence[int], Callable[[int], Sequence[int]]],
) -> List[float]:
    """Exact k-th smallest value of all the entries of a re-iterable stream of tensors, for each k.

    Unlike :func:`kth_largest_abs` (one population per model, along dim 0), every entry of every
    tensor ``chunks()`` yields, whatever its shape, belongs to one population of signed values (cast
    to float32; finite, NaN is not supported); ``ks`` lists several 1-based ranks in it, or is a
    function of the number of entries, which is known only after the first pass. The result is the
    value ``torch.sort(all_entries).values[k - 1]`` would give (the two zeros are one value: a rank
    that falls on zeros gives ``0.0`` or ``-0.0``); ``k <= 0`` gives ``-inf`` and ``k`` beyond the
    number of entries gives ``inf``.

    ``chunks()`` is called once, or twice when some ``k`` is in range. Memory is one histogram of
    65536 counts for the first pass and one per distinct bucket sought for the second, plus
    temporaries the size of one chunk, whatever the stream's length. Chunks may live on any device.
    """
    hi = None
    total = 0
    for c in chunks():
        keys = _ordered_keys(c)
        keys >>= 16
        keys += _BINS // 2  # high 16 bits as a bucket in [0, 65536), in key order
        h = torch.bincount(keys, minlength=_BINS)
        hi = h if hi is None else hi + h
        total += keys.numel()
        del keys
    if callable(ks):
        ks = ks(total)
    ks = [int(k) for k in ks]
    out = [float("-inf") if k <= 0 else float("inf") for k in ks]
    want = [i for i, k in enumerate(ks) if 0 < k <= total]
    if not want:
        return out
    hi = hi.cpu()
    located = {i: _locate_from_bottom(hi, ks[i]) for i in want}
    buckets = sorted({bucket for bucket, _ in located.values()})
    lo = {b: torch.zeros(_BINS, dtype=torch.int64) for b in buckets}
    for c in chunks():
        keys = _ordered_keys(c)
        high = keys >> 16
        for b in buckets:
            sel = keys[high == b - _BINS // 2]
            if sel.numel():
                sel &= 0xFFFF
                lo[b] += torch.bincount(sel, minlength=_BINS).cpu()
        del keys, high
    for i in want:
        bucket, rank = located[i]
        low, _ = _locate_from_bottom(lo[bucket], rank)
        out[i] = _key_value(((bucket - _BINS // 2) << 16) | low)
    return out


def kth_largest_in_memory(values: torch.Tensor, k: int) -> float:
    """Exact k-th largest ``|values|`` (1-based) of one tensor; same conventions as above."""
    return kth_largests_in_memory(values, [k])[0]


def kth_largests_in_memory(values: torch.Tensor, ks: Sequence[int]) -> List[float]:
    """:func:`kth_largest_in_memory` for several ``ks`` of one tensor, with one partition."""
    n = values.numel()
    out = [float("inf") if k <= 0 else 0.0 for k in ks]
    inside = sorted({n - k for k in ks if 0 < k < n})
    if not inside:
        return out
    a = values.detach().reshape(-1)
    a = a.abs() if a.dtype == torch.float32 else a.to(torch.float32).abs()
    if a.device.type == "cpu":
        arr = a.numpy()  # a fresh buffer of our own: partition it in place, no second copy
        arr.partition(inside)
        found = {i: float(arr[i]) for i in inside}
    else:
        found = {i: float(torch.kthvalue(a, i + 1).values.item()) for i in inside}
    return [found[n - k] if 0 < k < n else o for k, o in zip(ks, out)]


def kth_largest_deltas(base: torch.Tensor, models: Sequence[torch.Tensor], ks: Sequence[Optional[int]]) -> list:
    """``kth_largest_in_memory(models[i] - base, ks[i])`` for each model whose ``ks[i]`` is not None
    (else None), the models on parallel CPU threads (see :mod:`mergelab.methods.parallel`)."""
    todo = [i for i, k in enumerate(ks) if k is not None]
    found = map_models(lambda i: kth_largest_in_memory(models[i] - base, ks[i]), todo, base.device.type)
    out: list = [None] * len(ks)
    for i, value in zip(todo, found):
        out[i] = value
    return out


def stream_of(values: Iterator[torch.Tensor]) -> Callable[[], Iterable[torch.Tensor]]:
    """Make a re-iterable stream from an in-memory list (for tests and small cases)."""
    items = list(values)
    return lambda: iter(items)
