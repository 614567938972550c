"""Exact order statistics over streams of chunks: the k-th largest magnitude without sorting.

TIES and its relatives keep the ``k`` entries of largest magnitude, over one tensor (mergekit) or over
the whole model (the TIES paper). Sorting a whole tensor, let alone a whole model, costs memory and
time (mergekit argsorts with an int64 index per element). Here the threshold is found exactly by a
two-pass radix select on the IEEE-754 bit patterns of ``|x|`` (for non-negative floats the bit pattern
orders like the value): pass one counts the high 16 bits, pass two counts the low 16 bits inside the
one bucket that holds the k-th value. Memory is two histograms per model, whatever the stream's length.

When the data is one in-memory tensor, :func:`kth_largest_in_memory` gets the same value with a
partition (numpy's introselect on the CPU, ``torch.kthvalue`` elsewhere).
"""

from __future__ import annotations

from typing import Callable, Iterable, Iterator, List, Optional, Sequence, Union

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


def _locate(hist: torch.Tensor, k: int) -> tuple:
    """Bucket holding the k-th largest count-wise (1-based), and the rank within it from the top."""
    from_top = torch.flip(hist, dims=[0]).cumsum(0)
    idx = int(torch.searchsorted(from_top, torch.tensor([k], dtype=from_top.dtype, device=from_top.device)).item())
    bucket = hist.numel() - 1 - idx
    above = int(from_top[idx - 1].item()) if idx > 0 else 0
    return bucket, k - above


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
    n = len(ks)
    if hi is None:
        return [float("inf") if k <= 0 else 0.0 for k in ks]
    out: List[float] = [0.0] * n
    want = []
    for i, k in enumerate(ks):
        if k <= 0:
            out[i] = float("inf")
        elif k >= total:
            out[i] = 0.0
        else:
            want.append(i)
    if not want:
        return out
    hi = hi.cpu()
    located = {i: _locate(hi[i], int(ks[i])) for i in want}
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
        low, _ = _locate(lo[i], rank)
        pattern = np.array([(bucket << 16) | low], dtype=np.int32)
        out[i] = float(pattern.view(np.float32)[0])
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
