"""SCE (Select, Calculate, Erase): FuseChat's merge of task vectors toward a pivot model.

Wan et al., "FuseChat: Knowledge Fusion of Chat Models" (FuseChat-2.0), 2024 (arXiv:2408.07990;
reference code fanqiwan/FuseAI ``FuseChat/mergekit/merge_methods/sce_merging.py``). Per tensor, with
task vectors ``tau_t = theta_t - theta_0``:

1. Select: keep the ``select_topk`` fraction of positions (counted among those with non-zero
   variance) where the task vectors vary most across models (population variance).
2. Calculate: each model's weight is the mean of its squared selected task-vector entries, normalised
   to sum to 1 (uniform when they are all zero).
3. Erase: elect the sign of each coordinate by the sum of the task vectors (ties elect +1) and drop
   the entries of the other sign; average the rest with the model weights and add to the base.

``semantics: mergekit`` (default) is mergekit 0.1.5 ``sce``: the Select mask is applied to the task
vectors themselves (unselected positions keep the base), the weights fall back to uniform when their
sum is below 1e-6, and the divisor is clamped at 1e-6. ``semantics: paper`` is the FuseChat code: the
Select mask only decides the weights (erase and merge use the unmasked task vectors), the weights are
uniform only when their sum is exactly zero, and a zero divisor becomes 1.

Beware with ``semantics: mergekit``: the 1e-6 fallback is absolute, so task vectors with entries
around 1e-3 or smaller (typical of LLM fine-tunes) get uniform weights; ``semantics: paper`` does not.

Chunkable: the variance threshold (exact, ties by position) and the weights are computed over the
whole tensor in ``prepare_tensor``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from mergelab.methods.consensus import weighted_consensus_mean
from mergelab.methods.inputs import deltas_of, whole_source
from mergelab.methods.select import rank_windows, window_mask
from mergelab.methods.common import INT8_MASK, SEMANTICS
from mergelab.methods.registry import BaseUse, MergeMethod, Param, TensorInputs, TensorSource, register


@dataclass(frozen=True)
class SceStats:
    weights: torch.Tensor  # [n] float32, sum 1
    windows: Optional[list] = None  # one RankWindow over the variance, or None when nothing is selected out
    select_none: bool = False  # select_topk keeps no position


def _variance(d: torch.Tensor) -> torch.Tensor:
    """``torch.var(d, dim=0, unbiased=False)`` (mergekit's statistic), computed the way torch's CPU
    kernel does -- Welford's updates in float64, model by model -- but vectorised over the entries
    instead of one entry at a time, which is many times faster."""
    if d.device.type != "cpu":
        return torch.var(d, dim=0, unbiased=False)
    mean = d[0].double()
    m2 = torch.zeros_like(mean)
    for k in range(1, d.shape[0]):
        x = d[k].double()
        delta = x - mean
        mean += delta / (k + 1)
        m2 += delta * (x - mean)
    return (m2 / d.shape[0]).to(d.dtype)


def _select_mask(x: TensorInputs, d: torch.Tensor, stats: SceStats) -> Optional[torch.Tensor]:
    if stats.select_none:
        return torch.zeros_like(d[0])
    if stats.windows is None:
        return None
    return window_mask(_variance(d).unsqueeze(0), x.rows[0], stats.windows)[0]


def _selection(src: TensorSource) -> SceStats:
    topk = src.params["select_topk"]
    placeholder = torch.zeros(src.num_models)
    if topk >= 1:
        return SceStats(placeholder)
    if topk <= 0:
        return SceStats(placeholder, select_none=True)
    if src.num_chunks == 1:  # compute the variance once
        cached = [(c.rows[0], _variance(deltas_of(c)).unsqueeze(0)) for c in src.chunks()]
        stream = lambda: iter(cached)  # noqa: E731
    else:
        stream = lambda: ((c.rows[0], _variance(deltas_of(c)).unsqueeze(0)) for c in src.chunks())  # noqa: E731
    nonzero = sum(int(torch.count_nonzero(v).item()) for _, v in stream())
    k = int(nonzero * topk)
    if k == 0:
        return SceStats(placeholder, select_none=True)
    windows = rank_windows(stream, [(0, k)], src.numel, single=src.num_chunks == 1)
    return SceStats(placeholder, windows)


def _normalized(weights: torch.Tensor, paper: bool) -> torch.Tensor:
    total = torch.sum(weights).item()
    if (total == 0) if paper else (abs(total) < 1e-6):
        return torch.ones_like(weights) / weights.shape[0]
    return weights / total


def _prepare_tensor(src: TensorSource) -> Optional[SceStats]:
    """The statistics of a chunked tensor. A whole tensor's are computed in its merge: computed ahead
    on the read-ahead thread, its deltas and variances would be held beside the previous tensor's
    merge (a quarter more peak memory on a 160M model)."""
    if src.num_chunks == 1:
        return None
    return _statistics(src)


def _statistics(src: TensorSource) -> SceStats:
    sel = _selection(src)

    def selected(c: TensorInputs) -> torch.Tensor:
        d = deltas_of(c)
        m = _select_mask(c, d, sel)
        return d if m is None else d * m.unsqueeze(0)

    if src.num_chunks == 1:
        (c,) = list(src.chunks())
        s = selected(c)
        raw = s.square().reshape(s.shape[0], -1).mean(dim=1)
    else:
        acc = torch.zeros(src.num_models, dtype=torch.float64)
        for c in src.chunks():
            s = selected(c)
            acc += s.to(torch.float64).square().reshape(s.shape[0], -1).sum(dim=1).cpu()
        raw = (acc / max(src.numel, 1)).to(torch.float32)
    weights = _normalized(raw, src.params["semantics"] == "paper")
    return SceStats(weights, sel.windows, sel.select_none)


def sce_merge(x: TensorInputs) -> torch.Tensor:
    paper = x.params["semantics"] == "paper"
    stats: SceStats = x.tensor_stats if x.tensor_stats is not None else _statistics(whole_source(x))
    d = deltas_of(x)
    mask = _select_mask(x, d, stats)
    if mask is not None and not paper:
        d = d * mask.unsqueeze(0)
    # Erase: TIES' election on the unweighted task vectors, then the energy-weighted mean.
    merged = weighted_consensus_mean(d, stats.weights.to(d.device), "weight" if paper else "weight_floor")
    return x.base + merged


register(MergeMethod(
    name="sce",
    family="sce",
    summary="Select high-variance positions, weight models by task-vector energy, erase minority signs, average.",
    reference="Wan et al. 2024, FuseChat-2.0 SCE (arXiv:2408.07990), fanqiwan/FuseAI; mergekit 0.1.5 `sce`.",
    merge=sce_merge,
    base=BaseUse.REQUIRED,
    params=(
        Param("select_topk", float, "Fraction of positions (of those whose task vectors vary) kept by the "
              "variance selection; 1 keeps all.", default=1.0, low=0.0, high=1.0),
        INT8_MASK,
        SEMANTICS,
    ),
    min_models=1,
    chunkable=True,
    prepare_tensor=_prepare_tensor,
    notes="semantics: mergekit (default) masks the task vectors with the selection and falls back to "
          "uniform weights when their sum is below 1e-6 (so small task vectors get uniform weights); "
          "semantics: paper follows FuseChat: the selection only sets the weights, uniform only for an "
          "exactly zero sum. No per-model weights (mergekit takes none). FuseChat-2.0 used "
          "select_topk 0.1; mergekit's default 1.0 disables the selection.",
))
