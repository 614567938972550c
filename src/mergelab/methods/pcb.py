"""PCB-Merging: parameter competition balancing (intra- and inter-balancing, drop, rescale).

Du et al., "Parameter Competition Balancing for Model Merging", NeurIPS 2024 (arXiv:2410.02396;
reference code duguodong7/pcb-merging @5897888, ``pcb-merging.py::PCB_merge`` and
``nlp_source_code/utils/merge_utils.py::task_para_att_merge``; the vision script
``vision_source_code/pcb.py`` is the ``inter: normalized`` variant).

With ``tau_t = theta_t - theta_0`` flattened over the whole model (``granularity: model``, the
reference) or over one tensor (``granularity: tensor``, a documented deviation), for each task t:

1. Clip: ``a_t = clamp(|tau_t|, lo_t, hi_t)`` with ``lo_t``/``hi_t`` the ascending order statistics
   of ``|tau_t|`` at positions ``int(d*clip)`` and ``int(d*(1-clip) - 1)``; ``tau~_t = sign(tau_t) a_t``.
2. Intra-balancing: ``exp(n * N(a_t)^2)`` with ``N`` the min-max normalisation over the task's row
   (``n`` = number of models).
3. Inter-balancing: ``tanh(tau_t * sum_j tau_j)`` (``inter: sum``, the NLP/LLM code) or
   ``tanh(tau_t * sum_j sign(tau_j) N(a_j))`` (``inter: normalized``, the vision script).
4. ``beta_t`` = intra * inter. Drop + rescale: ``q_t`` = ascending order statistic of ``beta_t`` at
   ``int(d*(1-ratio))``; ``w_t = (max(beta_t, q_t) - q_t) / (max(beta_t) - q_t)``.
5. ``tau_m = sum_t weight_t w_t tau~_t / max(sum_t w_t, 1e-12)``; ``theta = theta_0 + lambda tau_m``.

The paper writes inter-balancing as a softmax of normalised pairwise products; the released code
(which produced the paper's numbers) uses the tanh form above, so that is what is implemented.
All order statistics are exact and streamed (:func:`mergelab.methods.select.order_statistics`): the whole-model version
never holds more than a chunk of every model, whatever the model size. ``beta`` is computed as
``exp(n (N^2 - 1)) tanh(...)``: dividing every ``beta_t`` by the constant ``e^n`` leaves ``w_t``
unchanged (it is invariant to a positive scale of ``beta_t``) and avoids overflow for ``n >= 89``.

Degenerate rows, which give NaN in the reference (``hi_t == lo_t``, e.g. an all-zero task vector,
or ``max beta_t == q_t``), get ``w_t = 0``: that task contributes nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, Optional, Sequence

import torch

from mergelab.errors import RecipeError
from mergelab.methods.common import LAMBDA
from mergelab.methods.registry import BaseUse, MergeMethod, ModelScope, Param, TensorInputs, TensorSource, register
from mergelab.methods.select import order_statistics


@dataclass(frozen=True)
class PCBStats:
    """Per-model clip bounds, drop threshold and maximum balancing score (one tensor or model)."""

    lo: list
    hi: list
    q: list
    top: list

    def usable(self, i: int) -> bool:
        return self.hi[i] > self.lo[i] and self.top[i] > self.q[i]


def _deltas(x: TensorInputs) -> torch.Tensor:
    return torch.stack([m - x.base for m in x.models])


def _expand(values: Sequence[float], like: torch.Tensor) -> torch.Tensor:
    t = torch.tensor([float(v) for v in values], dtype=like.dtype, device=like.device)
    return t.reshape((-1,) + (1,) * (like.dim() - 1))


def _normalized_magnitude(d: torch.Tensor, lo: Sequence[float], hi: Sequence[float]) -> tuple:
    """Clipped magnitudes ``a_t`` and their min-max normalisation ``N(a_t)`` (0 for degenerate rows)."""
    lo_t, hi_t = _expand(lo, d), _expand(hi, d)
    a = torch.minimum(torch.maximum(d.abs(), lo_t), hi_t)
    span = hi_t - lo_t
    ok = span > 0
    norm = torch.where(ok, (a - lo_t) / torch.where(ok, span, torch.ones_like(span)), torch.zeros_like(a))
    return a, norm


def balancing(d: torch.Tensor, lo: Sequence[float], hi: Sequence[float], inter: str) -> torch.Tensor:
    """``beta_t / e^n``: intra-balancing times inter-balancing, for stacked task vectors ``d``."""
    n = d.shape[0]
    _, norm = _normalized_magnitude(d, lo, hi)
    intra = torch.exp(n * (norm * norm - 1.0))
    if inter == "sum":
        cross = d * d.sum(dim=0, keepdim=True)
    else:
        cross = d * (torch.sign(d) * norm).sum(dim=0, keepdim=True)
    return intra * torch.tanh(cross)


def pcb_statistics(chunks: Callable[[], Iterator[TensorInputs]], clip: float, ratio: float, inter: str) -> PCBStats:
    """Clip bounds and drop thresholds over a stream of chunks (a tensor or the whole model)."""
    def magnitudes():
        for c in chunks():
            yield _deltas(c).abs()

    bounds = order_statistics(magnitudes, lambda total: [int(total * clip), int(total * (1 - clip) - 1)])
    lo = [b[0] for b in bounds]
    hi = [b[1] for b in bounds]

    def betas():
        for c in chunks():
            yield balancing(_deltas(c), lo, hi, inter)

    drops = order_statistics(betas, lambda total: [min(int(total * (1 - ratio)), total - 1), total - 1])
    return PCBStats(lo, hi, [q[0] for q in drops], [q[1] for q in drops])


def pcb_weights(x: TensorInputs, stats: PCBStats) -> tuple:
    """Clipped task vectors ``tau~`` and PCB weights ``w`` for one chunk, both ``[n, *chunk]``."""
    d = _deltas(x)
    a, _ = _normalized_magnitude(d, stats.lo, stats.hi)
    clipped = torch.sign(d) * a
    beta = balancing(d, stats.lo, stats.hi, x.params["inter"])
    q = _expand(stats.q, d)
    span = _expand([t - qq for t, qq in zip(stats.top, stats.q)], d)
    usable = _expand([1.0 if stats.usable(i) else 0.0 for i in range(d.shape[0])], d)
    w = (torch.maximum(beta, q) - q) / torch.where(span > 0, span, torch.ones_like(span)) * usable
    return clipped, w


def pcb_merge(x: TensorInputs) -> torch.Tensor:
    stats: PCBStats = x.model_stats if x.params["granularity"] == "model" else x.tensor_stats
    clipped, w = pcb_weights(x, stats)
    lam = _expand(x.model_param("weight"), clipped)
    merged = (lam * clipped * w).sum(0) / torch.clamp(w.sum(0), min=1e-12)
    return x.base + x.params["lambda"] * merged


def _prepare_tensor(src: TensorSource) -> Optional[PCBStats]:
    if src.params["granularity"] != "tensor":
        return None
    return pcb_statistics(src.chunks, src.params["clip"], src.params["ratio"], src.params["inter"])


def _prepare_model(scope: ModelScope) -> Optional[PCBStats]:
    if scope.params["granularity"] != "model":
        return None
    return pcb_statistics(scope.chunks, scope.params["clip"], scope.params["ratio"], scope.params["inter"])


def _validate(params: dict, model_params: list) -> None:
    if params["clip"] >= 0.5:
        raise RecipeError(f"pcb: parameter 'clip' = {params['clip']} is invalid; expected a fraction below 0.5 "
                          "(the clip removes that fraction at each end of the sorted magnitudes)")


register(MergeMethod(
    name="pcb",
    family="pcb",
    summary="Balance parameter competition within and across tasks, drop low scores, merge with the rescaled scores.",
    reference="Du et al. 2024, PCB-Merging (arXiv:2410.02396); duguodong7/pcb-merging pcb-merging.py::PCB_merge.",
    merge=pcb_merge,
    base=BaseUse.REQUIRED,
    params=(
        Param("ratio", float, "Fraction of each task's entries kept after the drop (pcb_ratio / TPA ratio).",
              default=0.1, low=0.0, high=1.0, low_open=True, per_layer=False),
        Param("clip", float, "Fraction of |task vector| clipped at each end before balancing (1e-4 in "
              "pcb-merging.py, 0.01 in the NLP and vision scripts).", default=1e-4, low=0.0, high=0.5,
              high_open=True, per_layer=False),
        Param("inter", str, "Inter-balancing: 'sum' = tanh(tau_t * sum_j tau_j) (NLP/LLM code); 'normalized' "
              "= tanh(tau_t * sum_j sign(tau_j) N(|tau_j|)) (vision script).", default="sum",
              choices=("sum", "normalized"), per_layer=False),
        Param("granularity", str, "'model': statistics over the whole flattened model (reference); 'tensor': "
              "per tensor (deviation, for comparison).", default="model", choices=("model", "tensor"),
              per_layer=False),
        LAMBDA,
    ),
    model_params=(
        Param("weight", float, "Per-task coefficient on the clipped task vector in the numerator (the "
              "reference's lambda_t from its evolutionary search; 1 without search).", default=1.0),
    ),
    min_models=1,
    chunkable=True,
    prepare_tensor=_prepare_tensor,
    prepare_model=_prepare_model,
    validate=_validate,
    notes="Not in mergekit, FusionBench or PEFT. Reference defaults: ratio 0.1-0.2 (T5), 0.05 with lambda 1.2 "
          "(ViT); the per-task lambda search needs validation data and is not part of this method.",
))
