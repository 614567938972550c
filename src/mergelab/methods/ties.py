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
and the mean divides by the *count* of agreeing entries. Entries tied with the threshold are all kept
in both (mergekit keeps exactly k by its sort order; with float32 inputs ties are vanishingly rare).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch

from mergelab.errors import RecipeError
from mergelab.methods import fused
from mergelab.methods.common import DENSITY, INT8_MASK, LAMBDA, SEMANTICS, WEIGHT, normalize, rescale_flag
from mergelab.methods.registry import BaseUse, MergeMethod, ModelScope, TensorInputs, TensorSource, register
from mergelab.methods.select import kth_largest_abs, kth_largest_deltas
from mergelab.methods.transforms import TaskVectors, disjoint_merge, elect_sign, trim, weigh, zero_below


def keep_count(density: float, numel: int, semantics: str) -> int:
    """How many entries a trim at ``density`` keeps out of ``numel`` (before threshold ties)."""
    if density >= 1:
        return numel
    if density <= 0 or numel == 0:
        return 0
    if semantics == "mergekit":
        return max(1, int(density * numel))
    # Reference: threshold = kthvalue(|tau|, n - floor(n*d)) and keep |tau| >= threshold.
    return min(numel, math.floor(density * numel) + 1)


def deltas_of(x: TensorInputs) -> torch.Tensor:
    """Stacked task vectors ``[n, *chunk]`` of a chunk."""
    return torch.stack([m - x.base for m in x.models])


@dataclass(frozen=True)
class TrimStats:
    """Per-model magnitude thresholds, and optional L1 rescale factors, for one tensor or model."""

    thresholds: list
    l1_scale: Optional[list] = None
    tie_sign: float = 1.0


def tensor_thresholds(src: TensorSource, semantics: str = "mergekit") -> list:
    """Per-model trim thresholds over one tensor (exact, chunked when the tensor is)."""
    ks = [keep_count(p["density"], src.numel, semantics) for p in src.model_params]
    trivial = [0.0 if k >= src.numel else (math.inf if k <= 0 else None) for k in ks]
    if all(t is not None for t in trivial):
        return trivial
    want = [k if t is None else None for k, t in zip(ks, trivial)]
    if fused.kernels() is not None:
        first = next(iter(src.chunks()))
        if fused.usable(first.base, *first.models):
            found = fused.kth_largest_abs_deltas(lambda: ((c.base, c.models) for c in src.chunks()), want,
                                                 src.numel)
            return [t if t is not None else f for t, f in zip(trivial, found)]
    src = src.as_float32()
    if src.num_chunks == 1:
        (x,) = list(src.chunks())
        # One task vector per model at a time, not a [n, *shape] stack. (A partition in memory costs
        # less than the bracketed scan below once the tensor is read anyway.)
        found = kth_largest_deltas(x.base, x.models, want)
        return [t if t is not None else f for t, f in zip(trivial, found)]
    found = bracketed_thresholds(src, want)
    if found is not None:
        return [t if t is not None else f for t, f in zip(trivial, found)]
    return kth_largest_abs(lambda: (deltas_of(c) for c in src.chunks()), ks)


_BRACKET_SAMPLE = 1 << 16


def bracketed_thresholds(src: TensorSource, ks: list, budget: float = 0.125) -> Optional[list]:
    """Exact k-th largest ``|tau_i|`` per model over a tensor in *one* pass, or None.

    ``ks[i]`` is 1-based and ``0 < ks[i] < numel``, or None for a model to skip (its entry in the
    result is None too).

    Quantiles of a random sample of the first chunk give each model a bracket ``[lo, hi]`` that very
    probably holds the k-th largest magnitude. One pass then counts the entries above ``hi`` and
    keeps those inside the bracket; if the k-th largest falls inside, it is found exactly among the
    kept values. If a bracket missed (the first chunk was not representative) or kept more than
    ``budget`` of the entries, None is returned and the caller uses the two-pass radix select, which
    is always exact. Either way the result is the same number; this only saves re-reading every chunk
    a second time.
    """
    numel = src.numel
    chunks = src.chunks()
    first = next(chunks)
    want = [i for i, k in enumerate(ks) if k is not None]
    lo: dict = {}
    hi: dict = {}
    flat_base = first.base.reshape(-1)
    size = flat_base.numel()
    # Quantiles of a fixed random sample of the first chunk (the sample only sets the bracket; the
    # result is exact whatever it is, so a fixed seed keeps the run time reproducible).
    picks = None
    if size > _BRACKET_SAMPLE:
        g = torch.Generator().manual_seed(0)
        picks = torch.randint(0, size, (_BRACKET_SAMPLE,), generator=g).to(flat_base.device)
    for i in want:
        flat = first.models[i].reshape(-1)
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

    def scan(c: TensorInputs) -> bool:
        for i in want:
            # numpy's counting and compress are several times faster than torch's on CPU here.
            a = (c.models[i] - c.base).abs_().reshape(-1).cpu().numpy()
            above[i] += a.size - int(np.count_nonzero(a <= hi[i]))  # NaN counts as above, as in the radix select
            sel = a[(a >= lo[i]) & (a <= hi[i])]
            kept_count[i] += sel.size
            if kept_count[i] > limit:
                return False
            kept[i].append(sel)
        return True

    if not scan(first):
        return None
    del first
    for c in chunks:
        if not scan(c):
            return None
    out: list = [None] * len(ks)
    for i in want:
        rank = int(ks[i]) - above[i]  # rank of the threshold among the bracketed values, from the top
        if rank < 1 or rank > kept_count[i]:
            return None
        values = np.concatenate(kept[i])
        values.partition(values.size - rank)
        out[i] = float(values[values.size - rank])
    return out


def l1_rescale_factors(src: TensorSource, masked: Callable[[TensorInputs], torch.Tensor]) -> list:
    """mergekit's L1 rescale: ``||tau_i||_1 / ||m_i tau_i||_1`` per model over the whole tensor.

    ``masked(chunk)`` returns the masked task vectors ``[n, *chunk]``. A factor is 1 where either
    norm is below 1e-7, as in mergekit.
    """
    before = torch.zeros(src.num_models, dtype=torch.float64)
    after = torch.zeros(src.num_models, dtype=torch.float64)
    for c in src.chunks():
        d = deltas_of(c)
        before += d.abs().reshape(d.shape[0], -1).sum(1).double().cpu()
        after += masked(c).abs().reshape(d.shape[0], -1).sum(1).double().cpu()
    return [1.0 if b < 1e-7 or a < 1e-7 else float(b / a) for b, a in zip(before.tolist(), after.tolist())]


def global_tie_sign(scope: ModelScope, sparsified: Callable[[TensorInputs], torch.Tensor]) -> float:
    """Sign of the total elected mass over the whole model (TIES reference zero-resolution).

    The reference sets coordinates whose summed task vectors are exactly zero to
    ``sign(sum_j gamma_j)``, the majority of the elected signs over all coordinates of the model.
    """
    total = 0.0
    for c in scope.chunks():
        d = sparsified(c)
        w = torch.tensor(c.model_param("weight"), dtype=d.dtype, device=d.device)
        d = d * w.reshape((-1,) + (1,) * (d.dim() - 1))
        total += float(torch.sign(d.sum(0)).sum().item())
    return float(math.copysign(1.0, total)) if total != 0 else 0.0


def uniform_model_param(scope: ModelScope, name: str) -> list:
    """A per-model parameter that must be one value over the whole model (whole-model statistics)."""
    values = None
    for c in scope.chunks():
        v = c.model_param(name)
        if values is None:
            values = v
        elif v != values:
            raise RecipeError(
                f"parameter '{name}' must be one value per model with semantics: paper (the trim is over "
                f"the whole model), but it varies across tensors (tensor '{c.name}': {v} vs {values})"
            )
    return values or []


def _prepare_tensor(src: TensorSource) -> Optional[TrimStats]:
    if src.params["semantics"] == "paper":
        return None
    thresholds = tensor_thresholds(src)
    scale = None
    if src.params["rescale"]:
        scale = l1_rescale_factors(src.as_float32(),
                                   lambda c: trim(thresholds)(TaskVectors.from_models(c.base, c.models)).deltas)
    return TrimStats(thresholds, scale)


def _prepare_model(scope: ModelScope) -> Optional[TrimStats]:
    if scope.params["semantics"] != "paper":
        return None
    scope = scope.as_float32()
    densities = uniform_model_param(scope, "density")
    thresholds = kth_largest_abs(
        lambda: (deltas_of(c) for c in scope.chunks()),
        lambda total: [keep_count(d, total, "paper") for d in densities],
    )
    tie = global_tie_sign(scope, lambda c: trim(thresholds)(TaskVectors.from_models(c.base, c.models)).deltas)
    return TrimStats(thresholds, None, tie)


def consensus_merge(deltas: torch.Tensor, weights: torch.Tensor, tie_sign: float, normalize: bool,
                    divisor: str) -> torch.Tensor:
    """Sign election and disjoint merge of weighted task vectors ``deltas`` ``[n, *chunk]``.

    The same values as ``disjoint_merge(elect_sign(tie_sign)(tv), normalize, divisor)`` from
    :mod:`mergelab.methods.transforms`, bit for bit, computed in place in ``deltas`` (which the caller
    gives up). With an elected sign ``s`` of +1 or -1, an entry agrees exactly when ``s * tau > 0``,
    so the agreeing entries are ``s * relu(s * tau)``: negation is exact and rounding is symmetric,
    so ``s * sum_i relu(s * tau_i)`` equals the masked sum, without boolean masks or multiplies by
    them (which cost more than the arithmetic on a CPU).
    """
    if tie_sign == 0:  # a zero sum elects no sign; rare, so the plain pipeline does it
        tv = elect_sign(0.0)(TaskVectors(deltas, weights))
        return disjoint_merge(tv, normalize, divisor)
    n = deltas.shape[0]
    sign = sum_models(deltas)
    if tie_sign > 0:
        sign = torch.where(sign >= 0, 1.0, -1.0)
    else:
        sign = torch.where(sign > 0, 1.0, -1.0)
    for i in range(n):
        deltas[i].mul_(sign).relu_()
    merged = sum_models(deltas)
    merged.mul_(sign)
    if not normalize:
        return merged
    # The divisor: sum_i w_i [agree_i] ("weight") or sum_i [agree_i] ("count"), in model order.
    div = sign  # reuse the buffer
    agree = torch.empty_like(merged)
    for i in range(n):
        torch.sign(deltas[i], out=agree)
        if i == 0:
            torch.mul(agree, float(weights[0]) if divisor == "weight" else 1.0, out=div)
        else:
            div.add_(agree, alpha=float(weights[i]) if divisor == "weight" else 1.0)
    if divisor == "weight":
        div.masked_fill_(div == 0, 1)
    elif divisor == "count":
        div.clamp_min_(1)
    else:
        raise ValueError(f"unknown divisor {divisor!r}")
    return merged.div_(div)


def sum_models(deltas: torch.Tensor) -> torch.Tensor:
    """``deltas.sum(dim=0)`` into a new buffer, adding the models in order (the same values, fewer passes)."""
    total = deltas[0].clone()
    for i in range(1, deltas.shape[0]):
        total.add_(deltas[i])
    return total


def ties_merge(x: TensorInputs) -> torch.Tensor:
    """``chain(trim, rescale, weigh, elect_sign, disjoint_merge)`` of one chunk, computed in place.

    Value for value the pipeline of :mod:`mergelab.methods.transforms`; see :func:`consensus_merge`.
    """
    paper = x.params["semantics"] == "paper"
    stats: TrimStats = x.model_stats if paper else x.tensor_stats
    base = x.base
    if stats.tie_sign != 0 and fused.usable(base, *x.models):
        n = len(x.models)
        merged = fused.consensus_merge(
            base, x.models, thresholds=stats.thresholds, factors=stats.l1_scale or [1.0] * n, divisors=[1.0] * n,
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
        zero_below(d, stats.thresholds[i])
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
    warm_up=fused.warm_up,
    raw_inputs=True,
    notes="semantics: paper trims over the whole model (exact, streamed), resolves zero sums by the "
          "model's majority sign and divides by the count of agreeing entries. The paper's default "
          "density is 0.2 (K=20); mergekit's is 1.0 (no trim).",
))
