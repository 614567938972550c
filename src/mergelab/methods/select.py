"""Exact selection by magnitude and rank: the one place where every threshold of every method is chosen.

**The order.** Every selection here ranks a tensor's entries in one total order: ``|x|`` descending,
and among equal magnitudes the *lower flat index first* (the flat index over the whole tensor, not
over a row chunk). "The top ``k``" is the first ``k`` entries of that order, exactly ``k`` of them
whatever the number of ties. mergekit sorts with ``torch.argsort``, which is not stable, so among
entries of equal magnitude it keeps whichever its sort puts first; mergelab and mergekit can
therefore differ only at entries whose magnitude equals the threshold, and keep the same count.

**A cut.** The top ``k`` is represented as a :class:`Cut` ``(value t, index p)``: an entry is kept when
``|x| > t``, or ``|x| == t`` and its flat index is below ``p``. This is a pair of numbers, so it is
the same for a whole tensor and for each of its row chunks (a chunk compares flat indices offset
by its first entry), on any device and in the fused kernels (:mod:`mergelab.methods.fused`).

**Finding it.** ``t`` is the exact k-th largest ``|x|``, found without sorting by a two-pass radix
select on the IEEE-754 bit patterns of ``|x|`` (for non-negative floats the bit pattern orders like
the value): pass one counts the high 16 bits, pass two the low 16 bits inside the one bucket that
holds the k-th value. Pass two also says how many entries are above ``t`` and how many equal it. When
every tied entry fits in ``k``, ``p`` is :data:`EVERY` and nothing more is read; otherwise one more
pass over the chunks in flat order finds the flat index of the last tied entry kept, stopping as
soon as the quota is reached. In memory, a partition (numpy's introselect, ``torch.kthvalue`` off the
CPU) replaces the radix select. Memory is two histograms per model, whatever the stream's length.

**Who uses it.** TIES' trim (mergekit: :func:`keep_count` per tensor, exact), breadcrumbs' two cuts
and SCE's top-k (:func:`rank_windows`), DELLA's ranks (:func:`ascending_order`, the reverse of this
order within a row), PCB's clip bounds and drop threshold (:func:`order_statistics`, values only:
its formulas treat tied entries alike), and the whole-model thresholds of the TIES paper, DOGE and
OTA, whose reference code keeps every entry ``>=`` the k-th value (:func:`top_cuts` with
``exact=False``: a ``Cut`` with ``p`` = :data:`EVERY`, whose ``kept`` count may exceed ``k``;
:func:`kept_vs_asked` reports it for ``mergelab.json``).

:func:`kth_smallest` gives order statistics of signed values (quantiles of a whole tensor streamed
in row chunks, e.g. Arcee Fusion's importance scores).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from mergelab.methods.parallel import map_models

_BINS = 1 << 16

#: A tie cutoff above every flat index: every entry equal to the threshold is kept.
EVERY = 1 << 62


# ----------------------------------------------------------------------------------------------- cuts
@dataclass(frozen=True)
class Cut:
    """The first entries of a tensor in the selection order: ``|x| > value``, or ``|x| == value`` and
    flat index ``< index``.

    ``Cut(0.0)`` keeps everything (NaN included), ``Cut(inf, 0)`` nothing. ``kept`` is the number of
    entries the cut keeps when it is known (-1 otherwise); ``asked`` the number that was asked for.
    """

    value: float
    index: int = EVERY
    kept: int = -1
    asked: int = -1

    @property
    def keeps_all(self) -> bool:
        return self.value <= 0 and self.index >= EVERY

    @property
    def keeps_none(self) -> bool:
        return math.isinf(self.value) and self.value > 0 and self.index <= 0

    def local_index(self, offset: int) -> int:
        """The tie cutoff for a chunk whose first entry has flat index ``offset``."""
        return EVERY if self.index >= EVERY else self.index - offset


NONE = Cut(math.inf, 0)
ALL = Cut(0.0, EVERY)


def as_cut(value: Union[Cut, float, None]) -> Optional[Cut]:
    """A :class:`Cut` from a cut, or from a plain threshold (every entry ``>=`` it is kept)."""
    if value is None or isinstance(value, Cut):
        return value
    value = float(value)
    return NONE if math.isinf(value) and value > 0 else Cut(value, EVERY)


def kept_vs_asked(what: str, cuts: Sequence[Optional[Cut]]) -> Optional[dict]:
    """``{what: {"kept": [...], "asked": [...]}}`` per model (None for a model without a cut) where some
    cut kept more than 0.1% over what was asked (ties at a threshold that keeps every entry ``>=`` it,
    the reference rule of ``semantics: paper``), else None: for ``mergelab.json``."""
    if not any(c is not None and c.asked > 0 and c.kept > c.asked * 1.001 for c in cuts):
        return None
    return {what: {"kept": [None if c is None else c.kept for c in cuts],
                   "asked": [None if c is None else c.asked for c in cuts]}}


def keep_count(density: float, numel: int, semantics: str) -> int:
    """How many entries a magnitude trim at ``density`` asks for out of ``numel``.

    ``mergekit``: ``max(1, int(density * numel))`` (mergekit 0.1.5 ``sparsify.magnitude``); ``paper``:
    ``floor(density * numel) + 1`` (the TIES reference takes the threshold at
    ``kthvalue(|tau|, n - floor(n * d))`` and keeps everything ``>=`` it). ``density >= 1`` keeps all,
    ``density <= 0`` nothing.
    """
    if density >= 1:
        return numel
    if density <= 0 or numel == 0:
        return 0
    if semantics == "mergekit":
        return max(1, int(density * numel))
    return min(numel, math.floor(density * numel) + 1)


def flat_offset(rows: Sequence[int], shape: Sequence[int]) -> int:
    """Flat index of the first entry of the row chunk ``rows = (start, stop)`` of a tensor of ``shape``."""
    return int(rows[0]) * math.prod(shape[1:]) if len(shape) else 0


def cut_mask(a: torch.Tensor, cut: Cut, offset: int = 0, inside: bool = True) -> torch.Tensor:
    """Boolean mask of the entries of a flat chunk of magnitudes ``a`` that ``cut`` keeps (``inside``)
    or leaves out (not ``inside``); ``a[j]`` has flat index ``offset + j`` (``a`` holds ``|x|``, or any
    non-negative score). One comparison per entry: ``>= t`` before the tie index, ``> t`` after it."""
    if cut.keeps_all:
        return torch.full_like(a, inside, dtype=torch.bool)
    local = min(max(cut.local_index(offset), 0), a.numel())
    keep = torch.empty_like(a, dtype=torch.bool)
    head, tail = (torch.ge, torch.gt) if inside else (torch.lt, torch.le)
    if local:
        head(a[:local], cut.value, out=keep[:local])
    if local < a.numel():
        tail(a[local:], cut.value, out=keep[local:])
    return keep


def zero_outside(t: torch.Tensor, cut: Cut, offset: int = 0) -> torch.Tensor:
    """Set the entries of the contiguous chunk ``t`` that ``cut`` does not keep to zero, in place.

    ``t``'s first entry has flat index ``offset``. Entries equal to the threshold are kept up to the
    cut's tie index; for float32/float64 the ``>=`` part is one pass of ``hardshrink`` (see
    :func:`zero_below`) and only the tail past the tie index is looked at again.
    """
    zero_below(t, cut.value)
    local = cut.local_index(offset)
    if cut.value > 0 and not math.isinf(cut.value) and local < t.numel():
        tail = t.view(-1)[max(0, local):]
        tail.masked_fill_(tail.abs() == cut.value, 0)
    return t


_FLOAT_INFO = {torch.float32: np.float32, torch.float64: np.float64}


def zero_below(t: torch.Tensor, threshold: float) -> torch.Tensor:
    """Set the entries of ``t`` with ``|t| < threshold`` to zero, in place; returns ``t``.

    Entries equal to the threshold are kept; ``threshold <= 0`` keeps everything and ``inf`` nothing.
    For float32/float64 this is one pass of ``hardshrink`` at the largest representable value below
    the threshold (``|x| > lam`` is then exactly ``|x| >= threshold``), several times faster on a CPU
    than building ``|t| >= threshold`` and multiplying by it.
    """
    thr = float(threshold)
    if thr <= 0:
        return t
    if math.isinf(thr):
        return t.zero_()
    kind = _FLOAT_INFO.get(t.dtype)
    if kind is None:
        return t.mul_(t.abs() >= thr)
    ceil = kind(thr)
    if float(ceil) < thr:
        ceil = np.nextafter(ceil, kind(np.inf))
    lam = float(np.nextafter(ceil, kind(0)))
    return torch.ops.aten.hardshrink.out(t, lam, out=t)


# ----------------------------------------------------------------------------------------------- radix select
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
    """The cuts a top-k search knows without looking, and the ranks it must search for.

    Returns ``(out, want)``: ``out[i]`` is :data:`NONE` for ``ks[i] <= 0``, :data:`ALL` for
    ``ks[i] >= total``, None for ``ks[i]`` None (model skipped) or in range; ``want`` lists the
    indices with ``0 < ks[i] < total``.
    """
    out: list = [None] * len(ks)
    want: List[int] = []
    for i, k in enumerate(ks):
        if k is None:
            continue
        if k <= 0:
            out[i] = replace_counts(NONE, 0, int(k))
        elif k >= total:
            out[i] = replace_counts(ALL, total, int(k))
        else:
            want.append(i)
    return out, want


def replace_counts(cut: Cut, kept: int, asked: int) -> Cut:
    return Cut(cut.value, cut.index, kept, asked)


def bits_value(bucket: int, low: int) -> float:
    """The float32 value whose bit pattern has high 16 bits ``bucket`` and low 16 bits ``low``."""
    return float(np.array([(bucket << 16) | low], dtype=np.int32).view(np.float32)[0])


def located_cut(value: float, k: int, quota: int, tied: int) -> Cut:
    """The cut at ``value`` for the top ``k`` when ``quota`` of the ``tied`` entries equal to ``value``
    are kept; its tie index is still unknown (:data:`EVERY`) when ``quota < tied``."""
    return Cut(value, EVERY, k - quota + tied, k)


def top_cuts(chunks: Callable[[], Iterable[torch.Tensor]],
             ks: Union[Sequence[Optional[int]], Callable[[int], Sequence[Optional[int]]]],
             exact: bool = True) -> List[Optional[Cut]]:
    """The top-``ks[i]`` :class:`Cut` of model ``i`` over a re-iterable stream of ``[n, ...]`` chunks.

    The chunks are the row chunks of one population per model, in flat order (their flat offsets add
    up). ``ks[i]`` is a count (None skips model ``i``); it may be a function of the number of entries
    per model, known only after the first pass. ``exact`` finds the tie index so that exactly
    ``ks[i]`` entries are kept; without it, every entry equal to the threshold is kept (the cut's
    ``kept`` says how many that is). ``chunks()`` is called twice, or three times when ties at a
    threshold must be split (that pass stops once every quota is reached).
    """
    if callable(ks):
        many = top_cuts_many(chunks, lambda total: [[k] for k in ks(total)], exact)
    else:
        many = top_cuts_many(chunks, [[k] for k in ks], exact)
    return [m[0] for m in many]


def top_cuts_many(chunks: Callable[[], Iterable[torch.Tensor]],
                  ks: Union[Sequence[Sequence[Optional[int]]], Callable[[int], Sequence[Sequence[Optional[int]]]]],
                  exact: bool = True) -> List[List[Optional[Cut]]]:
    """:func:`top_cuts` for several counts per model (``ks[i]`` lists model ``i``'s), in the same two
    or three passes over the stream."""
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
    out: List[List[Optional[Cut]]] = []
    want: List[Tuple[int, int, int]] = []  # (model, slot, k)
    for i, row in enumerate(ks):
        found, inside = split_ranks(row, total)
        out.append(found)
        want.extend((i, j, int(row[j])) for j in inside)
    if hi is None or not want:
        return out
    hi = hi.cpu()
    located = [locate_from_top(hi[i], k) for i, _, k in want]
    buckets = sorted({(i, bucket) for (i, _, _), (bucket, _) in zip(want, located)})
    lo = {key: torch.zeros(_BINS, dtype=torch.int64) for key in buckets}
    for c in chunks():
        b = _bits(c)
        for i, bucket in buckets:
            row = b[i]
            sel = row[(row >> 16) == bucket]
            if sel.numel():
                lo[i, bucket] += torch.bincount(sel & 0xFFFF, minlength=_BINS).cpu()
        del b
    quotas: Dict[Tuple[int, int], Tuple[float, int]] = {}
    for (i, j, k), (bucket, rank) in zip(want, located):
        hist = lo[i, bucket]
        low, quota = locate_from_top(hist, rank)
        tied = int(hist[low])
        out[i][j] = located_cut(bits_value(bucket, low), k, quota, tied)
        if exact and quota < tied and not math.isnan(out[i][j].value):  # NaN: see the module docstring
            quotas[i, j] = (out[i][j].value, quota)
    if quotas:
        for (i, j), index in tie_indices(chunks, quotas).items():
            out[i][j] = Cut(out[i][j].value, index, out[i][j].asked, out[i][j].asked)
    return out


_BLOCK = 1 << 20


def nth_equal(a: torch.Tensor, value: float, q: int) -> Tuple[int, int]:
    """``(index, q)`` of the ``q``-th entry of the flat tensor ``a`` equal to ``value`` (0-based index),
    or ``(-1, q - count)`` when ``a`` holds fewer; block by block, stopping at the block that holds it
    (no index buffer the size of ``a``)."""
    for start in range(0, a.numel(), _BLOCK):
        eq = a[start:start + _BLOCK] == value
        seen = int(eq.sum())
        if seen >= q:
            return start + int(eq.nonzero()[q - 1]), q
        q -= seen
    return -1, q


def tie_indices(chunks: Callable[[], Iterable[torch.Tensor]], quotas: dict) -> dict:
    """For each key ``(i, ...)`` of ``quotas`` with ``quotas[key] = (t, q)``: one past the flat index of
    the ``q``-th entry of model ``i`` with ``|x| == t``, in flat order over the stream of ``[n, ...]``
    chunks (stops once all are found)."""
    remaining = dict(quotas)
    found: dict = {}
    offset = 0
    for c in chunks():
        flat = c.reshape(c.shape[0], -1)
        rows: dict = {}
        for key in list(remaining):
            i = key[0]
            t, q = remaining[key]
            if i not in rows:
                rows[i] = flat[i].abs() if flat.dtype == torch.float32 else flat[i].to(torch.float32).abs()
            index, left = nth_equal(rows[i], t, q)
            if index >= 0:
                found[key] = offset + index + 1
                del remaining[key]
            else:
                remaining[key] = (t, left)
        offset += flat.shape[1]
        if not remaining:
            break
    if remaining:
        raise RuntimeError("internal: fewer tied entries than the histograms counted (the stream changed)")
    return found


def kth_largest_abs(
    chunks: Callable[[], Iterable[torch.Tensor]],
    ks: Union[Sequence[int], Callable[[int], Sequence[int]]],
) -> List[float]:
    """Exact k-th largest ``|x|`` per model over a re-iterable stream of ``[n, ...]`` chunks.

    ``chunks()`` is called twice. ``ks[i]`` is 1-based; ``k <= 0`` gives ``inf`` (nothing reaches
    it) and ``k`` at or beyond the number of entries gives ``0.0`` (everything does). ``ks`` may be a
    function of the number of entries per model, which is known only after the first pass. Used as
    a threshold, every entry ``>=`` it is kept (ties included: the reference rule of the TIES paper,
    DOGE and OTA); :func:`top_cuts` gives the exact-count cut.
    """
    return [c.value for c in top_cuts(chunks, ks, exact=False)]


# ----------------------------------------------------------------------------------------------- in memory
def _abs_float32(values: torch.Tensor) -> torch.Tensor:
    a = values.detach().reshape(-1)
    return a.abs() if a.dtype == torch.float32 else a.to(torch.float32).abs()


def cuts_in_memory(values: torch.Tensor, ks: Sequence[int], exact: bool = True) -> List[Cut]:
    """The top-``k`` :class:`Cut` of one in-memory tensor's ``|values|`` for each ``k`` of ``ks``, with
    one partition (numpy's introselect on the CPU, ``torch.kthvalue`` elsewhere); see :func:`top_cuts`."""
    n = values.numel()
    out: List[Optional[Cut]] = []
    for k in ks:
        out.append(replace_counts(NONE, 0, k) if k <= 0 else replace_counts(ALL, n, k) if k >= n else None)
    inside = sorted({n - k for k in ks if 0 < k < n})
    if not inside:
        return out  # type: ignore[return-value]
    a = _abs_float32(values)
    located: Dict[int, Tuple[float, int, int]] = {}  # k -> (value, entries above it, entries equal to it)
    if a.device.type == "cpu":
        arr = a.numpy()  # a fresh buffer of our own: partition it in place, no second copy
        arr.partition(inside)
        for pos in inside:
            t = arr[pos]
            # After the partition everything right of pos is >= t and everything left of it <= t.
            located[n - pos] = (float(t), int(np.count_nonzero(arr[pos + 1:] > t)), int(np.count_nonzero(arr == t)))
        a = None
    else:
        for pos in inside:
            t = torch.kthvalue(a, pos + 1).values
            located[n - pos] = (float(t.item()), int((a > t).sum()), int((a == t).sum()))
    for j, k in enumerate(ks):
        if out[j] is not None:
            continue
        t, above, tied = located[k]
        quota = k - above
        cut = located_cut(t, k, quota, tied)
        if exact and quota < tied:
            if a is None:
                a = _abs_float32(values)  # in flat order again (the partitioned copy is not)
            cut = Cut(t, nth_equal(a, t, quota)[0] + 1, k, k)
        out[j] = cut
    return out  # type: ignore[return-value]


def kth_largest_in_memory(values: torch.Tensor, k: int) -> float:
    """Exact k-th largest ``|values|`` (1-based) of one tensor; same conventions as :func:`kth_largest_abs`."""
    return kth_largests_in_memory(values, [k])[0]


def kth_largests_in_memory(values: torch.Tensor, ks: Sequence[int]) -> List[float]:
    """:func:`kth_largest_in_memory` for several ``ks`` of one tensor, with one partition."""
    return [c.value for c in cuts_in_memory(values, ks, exact=False)]


def delta_cuts(base: torch.Tensor, models: Sequence[torch.Tensor], ks: Sequence[Optional[int]],
               exact: bool = True) -> list:
    """``cuts_in_memory(models[i] - base, [ks[i]])`` for each model whose ``ks[i]`` is not None (else
    None), the models on parallel CPU threads (see :mod:`mergelab.methods.parallel`)."""
    todo = [i for i, k in enumerate(ks) if k is not None]
    found = map_models(lambda i: cuts_in_memory(models[i] - base, [ks[i]], exact)[0], todo, base.device.type)
    out: list = [None] * len(ks)
    for i, value in zip(todo, found):
        out[i] = value
    return out


def stream_of(values: Iterator[torch.Tensor]) -> Callable[[], Iterable[torch.Tensor]]:
    """Make a re-iterable stream from an in-memory list (for tests and small cases)."""
    items = list(values)
    return lambda: iter(items)


# ----------------------------------------------------------------------------------------------- task vectors
_BRACKET_SAMPLE = 1 << 16

PairStream = Callable[[], Iterable[Tuple[torch.Tensor, Sequence[torch.Tensor]]]]


def bracketed_cuts(pairs: PairStream, ks: list, numel: int, budget: float = 0.125,
                   exact: bool = True) -> Optional[list]:
    """The top-``ks[i]`` :class:`Cut` of ``|models[i] - base|`` over a stream of ``(base, models)`` row
    chunks in *one* pass (two when ties must be split), or None.

    ``ks[i]`` is a count with ``0 < ks[i] < numel``, or None for a model to skip (its entry in the
    result is None too). Quantiles of a random sample of the first chunk give each model a bracket
    ``[lo, hi]`` that very probably holds the k-th largest magnitude. One pass then counts the entries
    above ``hi`` and keeps those inside the bracket; if the k-th largest falls inside, it is found
    exactly among the kept values. If a bracket missed (the first chunk was not representative) or
    kept more than ``budget`` of the entries, None is returned and the caller uses the radix select
    (:func:`top_cuts`), which is always exact. Either way the result is the same cut; this only saves
    re-reading every chunk a second time.
    """
    chunks = iter(pairs())
    first_base, first_models = next(chunks)
    want = [i for i, k in enumerate(ks) if k is not None]
    lo: dict = {}
    hi: dict = {}
    flat_base = first_base.reshape(-1)
    size = flat_base.numel()
    # Quantiles of a fixed random sample of the first chunk (the sample only sets the bracket; the
    # result is exact whatever it is, so a fixed seed keeps the run time reproducible).
    picks = None
    if size > _BRACKET_SAMPLE:
        g = torch.Generator().manual_seed(0)
        picks = torch.randint(0, size, (_BRACKET_SAMPLE,), generator=g).to(flat_base.device)
    for i in want:
        flat = first_models[i].reshape(-1)
        a = (flat - flat_base).abs_() if picks is None else (flat[picks] - flat_base[picks]).abs_()
        m = a.numel()
        k = min(max(int(ks[i]), 1), numel)
        q = 1.0 - k / numel  # where the threshold sits, as a quantile of |tau_i|
        margin = 0.01 + 4.0 * math.sqrt(max(q * (1 - q), 1.0 / m) / m)
        ilo = min(m - 1, max(0, int((q - margin) * m)))
        ihi = min(m - 1, max(0, int(math.ceil((q + margin) * m))))
        arr = a.numpy() if a.device.type == "cpu" else a.cpu().numpy()
        arr.partition([ilo, ihi])
        lo[i] = float(arr[ilo]) if q - margin > 0 else 0.0
        hi[i] = float(arr[ihi]) if q + margin < 1 else math.inf
    above = {i: 0 for i in want}
    kept: dict = {i: [] for i in want}
    kept_count = {i: 0 for i in want}
    limit = max(1 << 16, int(budget * numel))

    def scan(base: torch.Tensor, models: Sequence[torch.Tensor]) -> bool:
        for i in want:
            # numpy's counting and compress are several times faster than torch's on CPU here.
            a = (models[i] - base).abs_().reshape(-1).cpu().numpy()
            above[i] += a.size - int(np.count_nonzero(a <= hi[i]))  # NaN counts as above, as in the radix select
            sel = a[(a >= lo[i]) & (a <= hi[i])]
            kept_count[i] += sel.size
            if kept_count[i] > limit:
                return False
            kept[i].append(sel)
        return True

    if not scan(first_base, first_models):
        return None
    del first_base, first_models
    for base, models in chunks:
        if not scan(base, models):
            return None
    out: list = [None] * len(ks)
    quotas: dict = {}
    for i in want:
        k = int(ks[i])
        rank = k - above[i]  # rank of the threshold among the bracketed values, from the top
        if rank < 1 or rank > kept_count[i]:
            return None
        values = np.concatenate(kept[i])
        values.partition(values.size - rank)
        t = values[values.size - rank]
        over = above[i] + int(np.count_nonzero(values > t))
        tied = int(np.count_nonzero(values == t))
        out[i] = located_cut(float(t), k, k - over, tied)
        if exact and k - over < tied:
            quotas[i,] = (float(t), k - over)
    if quotas:
        models_of = lambda: (torch.stack([ms[i] - b for i in range(len(ks))]) for b, ms in pairs())  # noqa: E731
        for (i,), index in tie_indices(models_of, quotas).items():
            out[i] = Cut(out[i].value, index, out[i].asked, out[i].asked)
    return out


def task_vector_cuts(src, ks: Sequence[Optional[int]], exact: bool = True) -> list:
    """The top-``ks[i]`` :class:`Cut` of each model's task vector ``|models[i] - base|`` over one tensor
    (a :class:`~mergelab.methods.registry.TensorSource`, chunked or not); None where ``ks[i]`` is None.

    The fused CPU kernels count on the raw inputs where they run; otherwise a tensor in one chunk is
    partitioned in memory, and a chunked one is scanned once with a bracket (:func:`bracketed_cuts`)
    or, failing that, by the radix select (:func:`top_cuts`). All give the same cut.
    """
    from mergelab.methods import fused

    numel = src.numel
    out, want_idx = split_ranks(ks, numel)
    if not want_idx:
        return out
    want = [k if i in want_idx else None for i, k in enumerate(ks)]
    if fused.kernels() is not None:
        first = next(iter(src.chunks()))
        if fused.usable(first.base, *first.models):
            found = fused.top_cuts_deltas(lambda: ((c.base, c.models) for c in src.chunks()), want, numel, exact)
            return [o if o is not None else f for o, f in zip(out, found)]
    src = src.as_float32()
    if src.num_chunks == 1:
        (x,) = list(src.chunks())
        # One task vector per model at a time, not a [n, *shape] stack. (A partition in memory costs
        # less than the bracketed scan below once the tensor is read anyway.)
        found = delta_cuts(x.base, x.models, want, exact)
        return [o if o is not None else f for o, f in zip(out, found)]
    pairs = lambda: ((c.base, c.models) for c in src.chunks())  # noqa: E731
    found = bracketed_cuts(pairs, want, numel, exact=exact)
    if found is None:
        deltas = lambda: (torch.stack([m - c.base for m in c.models]) for c in src.chunks())  # noqa: E731
        found = top_cuts(deltas, want, exact)
    return [o if o is not None else f for o, f in zip(out, found)]


# ----------------------------------------------------------------------------------------------- rank windows
@dataclass(frozen=True)
class RankWindow:
    """Keep the entries whose rank in the selection order is in ``[start, stop)``: those inside the
    ``stop`` cut and outside the ``start`` cut (ranks are 0-based over the whole tensor)."""

    start: int
    stop: int
    numel: int
    top: Cut = NONE  # the first ``start`` entries (dropped)
    upto: Cut = ALL  # the first ``stop`` entries

    @property
    def empty(self) -> bool:
        return self.stop <= self.start or self.start >= self.numel

    @property
    def everything(self) -> bool:
        return self.start <= 0 and self.stop >= self.numel


Stream = Callable[[], Iterable[Tuple[int, torch.Tensor]]]


def _row_size(values: torch.Tensor) -> int:
    """Entries per row of dimension 0 of a tensor chunk stacked as ``[n, rows, ...]``."""
    return math.prod(values.shape[2:]) if values.dim() >= 2 else 0


def rank_windows(stream: Stream, bounds: Sequence[Tuple[int, int]], numel: int,
                 single: bool = False) -> List[RankWindow]:
    """Per-model :class:`RankWindow` for ``bounds[i] = (start, stop)`` over a stream of chunks.

    ``stream()`` yields ``(first_row, values)`` with ``values`` shaped ``[n, *chunk]``, the row chunks
    of a tensor in order; ``single`` says it is one in-memory chunk (a partition replaces the radix
    select).
    """
    n = len(bounds)
    windows: List[Optional[RankWindow]] = [None] * n
    for i, (start, stop) in enumerate(bounds):
        w = RankWindow(max(0, start), min(numel, stop), numel)
        if w.empty or w.everything:
            windows[i] = w
    todo = [i for i in range(n) if windows[i] is None]
    if not todo:
        return windows  # type: ignore[return-value]
    ks_top = [max(0, bounds[i][0]) if i in todo else None for i in range(n)]
    ks_upto = [min(numel, bounds[i][1]) if i in todo else None for i in range(n)]
    if single:
        ((_, v),) = list(stream())
        found = map_models(lambda i: cuts_in_memory(v[i], [ks_top[i], ks_upto[i]]), todo, v.device.type)
        tops = dict(zip(todo, (f[0] for f in found)))
        uptos = dict(zip(todo, (f[1] for f in found)))
    else:
        both = top_cuts_many(lambda: (v for _, v in stream()), [[a, b] for a, b in zip(ks_top, ks_upto)])
        tops = {i: both[i][0] for i in todo}
        uptos = {i: both[i][1] for i in todo}
    for i in todo:
        windows[i] = RankWindow(ks_top[i], ks_upto[i], numel, tops[i], uptos[i])
    return windows  # type: ignore[return-value]


def window_mask(values: torch.Tensor, first_row: int, windows: Sequence[RankWindow]) -> torch.Tensor:
    """Float masks ``[n, *chunk]`` (1 keeps) of the row chunk ``values`` whose first row is ``first_row``."""
    out = torch.empty_like(values, dtype=torch.float32)
    offset = first_row * _row_size(values)
    for i, w in enumerate(windows):
        a = values[i].abs().reshape(-1).to(torch.float32)
        if w.empty:
            keep = torch.zeros_like(a, dtype=torch.bool)
        else:
            keep = cut_mask(a, w.upto, offset)
            if w.start > 0:
                keep &= cut_mask(a, w.top, offset, inside=False)
        out[i] = keep.reshape(values[i].shape).to(torch.float32)
    return out


def row_window_mask(values: torch.Tensor, bounds: Sequence[Tuple[int, int]]) -> torch.Tensor:
    """Float masks ``[n, *chunk]`` keeping, in each vector along the last dimension, ranks ``[start, stop)``
    of the selection order within the vector (``|value|`` descending, ties by position)."""
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


def ascending_order(rows: torch.Tensor) -> torch.Tensor:
    """Column indices of each row of ``rows`` ``[r, cols]`` from last to first in the selection order:
    ``|x|`` ascending, and among equal magnitudes the higher column first (DELLA's ranks: position
    ``j`` of the result has rank ``j + 1``, so the top of the selection order has rank ``cols``).

    On a CPU, float32 rows are sorted as int64 keys ``bits(|x|) << b | (cols - 1 - column)``: the bit
    pattern of a non-negative float orders like its value and the reversed column breaks ties, so one
    plain sort of unique keys (numpy's vectorised sort) gives the order, about five times faster than
    torch's stable argsort (used elsewhere, on the reversed columns).
    """
    mags = rows.abs()
    cols = mags.shape[1]
    if mags.device.type != "cpu" or mags.dtype != torch.float32:
        flipped = mags.flip(1)
        keys = flipped.view(torch.int32) if flipped.dtype == torch.float32 else flipped
        return (cols - 1) - torch.argsort(keys, dim=1, stable=True)
    shift = max(1, (cols - 1).bit_length())
    keys = mags.contiguous().view(torch.int32).numpy().astype(np.int64) << shift
    keys |= np.arange(cols - 1, -1, -1, dtype=np.int64)
    keys.sort(axis=1)
    keys &= (1 << shift) - 1
    return torch.from_numpy((cols - 1) - keys)


# ----------------------------------------------------------------------------------------------- order statistics
def order_statistics(
    values: Callable[[], Iterable[torch.Tensor]],
    positions: Callable[[int], Sequence[int]],
) -> List[List[float]]:
    """Exact ascending order statistics of signed values, per model, over a stream of chunks.

    ``values()`` yields ``[n, ...]`` chunks (re-iterable; called up to three times).
    ``positions(total)`` gives 0-based positions into the ascending sort of each model's ``total``
    entries (``0`` is the minimum, ``total - 1`` the maximum), the same for every model; the result
    holds, per model, the value at each position (a value: ties do not matter).
    Positions strictly inside the range are found with the radix select of :func:`kth_largest_abs`
    on the negative or non-negative part.
    """
    n = None
    total = 0
    negatives = lows = highs = None
    for c in values():
        f = c.reshape(c.shape[0], -1)
        if n is None:
            n = f.shape[0]
            negatives = torch.zeros(n, dtype=torch.int64)
            lows = torch.full((n,), float("inf"), dtype=torch.float64)
            highs = torch.full((n,), float("-inf"), dtype=torch.float64)
        if f.shape[1] == 0:
            continue
        negatives += (f < 0).sum(1).cpu()
        lows = torch.minimum(lows, f.min(1).values.double().cpu())
        highs = torch.maximum(highs, f.max(1).values.double().cpu())
        total += f.shape[1]
    if n is None or total == 0:
        raise ValueError("order_statistics: the stream holds no entries")
    wanted = [list(positions(total)) for _ in range(n)]
    out: List[List[float]] = [[0.0] * len(p) for p in wanted]
    rows = []  # (model, "neg"/"pos", k, slot)
    for i, plist in enumerate(wanted):
        for j, p in enumerate(plist):
            if not 0 <= p < total:
                raise ValueError(f"order_statistics: position {p} outside [0, {total})")
            if p == 0:
                out[i][j] = float(lows[i])
            elif p == total - 1:
                out[i][j] = float(highs[i])
            elif p < int(negatives[i]):
                rows.append((i, "neg", p + 1, j))  # (p+1)-th largest |x| among the negatives
            else:
                rows.append((i, "pos", total - p, j))  # (total-p)-th largest among the non-negatives
    if rows:
        def stacked() -> Iterator[torch.Tensor]:
            for c in values():
                f = c.reshape(c.shape[0], -1)
                parts = []
                for i, kind, _, _ in rows:
                    v = f[i]
                    keep = v < 0 if kind == "neg" else v >= 0
                    parts.append(torch.where(keep, v, torch.zeros_like(v)))
                yield torch.stack(parts)

        found = kth_largest_abs(stacked, [k for _, _, k, _ in rows])
        for (i, kind, _, j), v in zip(rows, found):
            out[i][j] = -v if kind == "neg" else v
    return out


# ----------------------------------------------------------------------------------------------- signed values
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
