"""Model Stock: interpolate between the base and the average of the fine-tuned models by their geometry.

Jang, Yun & Han, "Model Stock: All we need is just a few fine-tuned models", ECCV 2024
(arXiv:2403.19522). With N fine-tuned models whose task vectors make pairwise angles with mean cosine
``c``, the merged weights are ``t * mean_i(theta_i) + (1 - t) * theta_0`` with
``t = N c / (1 + (N - 1) c)``: identical models (c = 1) give their average, orthogonal task vectors
(c = 0) give the base, and for two models ``t = 2c / (1 + c)``.

``c`` is the mean of the pairwise cosines (mergekit and MergeLLM; the Model Stock authors confirmed
this aggregation in arcee-ai/mergekit#453), over the whole tensor or, with ``filter_wise``, per row
(per vector along the last dimension).

``t`` is not clamped: negatively correlated task vectors (c < 0) give t < 0, a step from the base away
from the average, as in the paper's formula, mergekit 0.1.5 and FusionBench. Only a vanishing
denominator (c = -1/(N-1)) falls back to the base (t = 0), as in mergekit. ``clamp_t: true`` is a
mergelab option that clamps t to [0, 1] (the base instead of an extrapolation). ``semantics: paper``
and ``semantics: mergekit`` (default) give the same result: mergekit implements the paper's formula.

Chunkable: the whole-tensor cosines are computed in ``prepare_tensor`` (float64 accumulation) when
the engine splits a tensor into row chunks; unsplit tensors reproduce mergekit's float32 sums.
"""

from __future__ import annotations

from dataclasses import replace
from typing import List, Optional

import torch

from mergelab.methods.inputs import whole_source
from mergelab.methods.common import SEMANTICS
from mergelab.methods.gram import all_pairs, cosine, gram
from mergelab.methods.registry import BaseUse, MergeMethod, Param, TensorInputs, TensorSource, register


def interpolation_ratio(cos: torch.Tensor, n: int, clamp: bool) -> torch.Tensor:
    """``t = n c / (1 + (n - 1) c)``; a denominator below 1e-6 in magnitude gives 0 (mergekit);
    ``clamp`` clamps t to ``[0, 1]``."""
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
    clamp = x.params["clamp_t"]
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
        Param("clamp_t", bool, "Clamp the ratio t to [0, 1], so negatively correlated task vectors give the "
              "base instead of an extrapolation away from the models' average (not in the paper or "
              "mergekit).", default=False),
        replace(SEMANTICS, meaning="Both values give the same result: mergekit 0.1.5 implements the paper's "
                "formula (mean of the pairwise cosines, t not clamped)."),
    ),
    min_models=2,
    chunkable=True,
    prepare_tensor=_prepare_tensor,
    notes="t = N c / (1 + (N - 1) c) is not clamped (paper, mergekit, FusionBench): c < 0 gives t < 0, an "
          "extrapolation away from the average; clamp_t: true clamps t to [0, 1]. The mean is over pairwise "
          "cosines (FusionBench averages angles instead). Per-model weights are not used (mergekit "
          "accepts none either).",
))
