"""Model Stock: interpolate between the base and the average of the fine-tuned models by their geometry.

Jang, Yun & Han, "Model Stock: All we need is just a few fine-tuned models", ECCV 2024
(arXiv:2403.19522). With N fine-tuned models whose task vectors make pairwise angles with mean cosine
``c``, the merged weights are ``t * mean_i(theta_i) + (1 - t) * theta_0`` with
``t = N c / (1 + (N - 1) c)``: identical models (c = 1) give their average, orthogonal task vectors
(c = 0) give the base, and for two models ``t = 2c / (1 + c)``.

``c`` is the mean of the pairwise cosines (mergekit and MergeLLM; the Model Stock authors confirmed
this aggregation in arcee-ai/mergekit#453), over the whole tensor or, with ``filter_wise``, per row
(per vector along the last dimension).

``semantics: paper`` (default) clamps ``t`` to ``[0, 1]``: the derivation places the merged point
between the base and the average, so negatively correlated task vectors (c < 0) give the base
instead of an extrapolation away from the average. ``semantics: mergekit`` is mergekit 0.1.5: ``t`` is
not clamped (only a vanishing denominator, c = -1/(N-1), falls back to the base).

Chunkable: the whole-tensor cosines are computed in ``prepare_tensor`` (float64 accumulation) when
the engine splits a tensor into row chunks; unsplit tensors reproduce mergekit's float32 sums.
"""

from __future__ import annotations

from dataclasses import replace
from typing import List, Optional

import torch

from mergelab.methods.breadcrumbs import whole_source
from mergelab.methods.common import SEMANTICS
from mergelab.methods.gram import all_pairs, cosine, gram
from mergelab.methods.registry import BaseUse, MergeMethod, Param, TensorInputs, TensorSource, register


def interpolation_ratio(cos: torch.Tensor, n: int, clamp: bool) -> torch.Tensor:
    """``t = n c / (1 + (n - 1) c)``; a denominator below 1e-6 in magnitude gives 0 (mergekit)."""
    denominator = 1 + (n - 1) * cos
    singular = denominator.abs() < 1e-6
    safe = torch.where(singular, torch.ones_like(denominator), denominator)
    t = torch.where(singular, torch.zeros_like(cos), (n * cos) / safe)
    return t.clamp(0, 1) if clamp else t


def _vectors(x: TensorInputs, filter_wise: bool) -> tuple:
    """Base and models viewed as mergekit views them: flattened, or as rows along the last dimension."""
    base, models = x.base, list(x.models)
    if filter_wise:
        if base.dim() <= 1:
            return base.reshape(1, -1), [m.reshape(1, -1) for m in models]
        return base, models
    return base.reshape(-1), [m.reshape(-1) for m in models]


def _mean_cosine(offsets: List[torch.Tensor]) -> torch.Tensor:
    cosines = []
    for i, a in enumerate(offsets):
        for b in offsets[i + 1:]:
            norm_product = torch.norm(a, dim=-1) * torch.norm(b, dim=-1)
            cosines.append(((a * b).sum(dim=-1) / norm_product.clamp(min=1e-6)).clamp(-1, 1))
    return torch.stack(cosines).mean(dim=0).unsqueeze(-1)


def _prepare_tensor(src: TensorSource) -> Optional[torch.Tensor]:
    if src.num_chunks == 1:
        return None  # merge computes mergekit's float32 reductions itself
    if src.params["filter_wise"] and len(src.shape) >= 2:
        return None  # rows never span chunks
    pairs = all_pairs(src.num_models)
    g = gram(src, lambda c: [m - c.base for m in c.models], pairs)
    cos = [cosine(g, p, 1e-6) for p in pairs]
    return torch.tensor([sum(cos) / len(cos)], dtype=torch.float32)


def model_stock_merge(x: TensorInputs) -> torch.Tensor:
    filter_wise = x.params["filter_wise"]
    clamp = x.params["semantics"] == "paper"
    base, models = _vectors(x, filter_wise)
    n = len(models)
    if x.tensor_stats is None:
        if not filter_wise or len(x.shape) <= 1:
            whole_source(x)  # the cosines need the whole tensor
        cos = _mean_cosine([m - base for m in models])
    else:
        cos = x.tensor_stats.to(base.device)
    t = interpolation_ratio(cos, n, clamp)
    average = sum(models) / n
    return (t * average + (1 - t) * base).reshape(x.base.shape)


register(MergeMethod(
    name="model_stock",
    family="model_stock",
    summary="Move from the base toward the models' average by a ratio set by the angle between their task vectors.",
    reference="Jang et al. 2024, Model Stock (arXiv:2403.19522); mergekit 0.1.5 `model_stock`.",
    merge=model_stock_merge,
    base=BaseUse.REQUIRED,
    params=(
        Param("filter_wise", bool, "Compute the ratio per row (vector along the last dimension) instead of "
              "per tensor.", default=False),
        replace(SEMANTICS, default="paper", meaning="'paper' (default) clamps the ratio t to [0, 1]; "
                "'mergekit' reproduces mergekit 0.1.5, which does not clamp it."),
    ),
    min_models=2,
    chunkable=True,
    prepare_tensor=_prepare_tensor,
    notes="semantics: paper (default) clamps t to [0, 1], so negatively correlated task vectors give the "
          "base; mergekit's unclamped t extrapolates (semantics: mergekit). The mean is over pairwise "
          "cosines (FusionBench averages angles instead). Per-model weights are not used (mergekit "
          "accepts none either).",
))
