"""LiNeS: layer-increasing network scaling of a task vector, after training or after merging.

Wang et al., "LiNeS: Post-training Layer Scaling Prevents Forgetting and Enhances Model Merging",
ICLR 2025 (arXiv:2410.17146; reference code wang-kee/LiNeS @43a7bdd, ``src/eval/eval.py::LiNeS_scaling``
and ``src/eval/aggregation.py``).

A task vector ``tau`` (one fine-tuned residual, or the merged multi-task vector of any
task-arithmetic-family method) is scaled by its block's depth: with ``L`` blocks and block index
``l`` in ``0..L-1``::

    lambda(l) = alpha + beta * l / (L - 1)          theta = theta_0 + lambda(l(key)) * tau[key]

(``L = 1`` gives ``alpha + beta``). Tensors outside the blocks (embeddings, final norm, heads,
``lm_head``) are scaled by ``alpha`` in the reference (``non_layer: alpha``); ``non_layer: deepest``
gives them the last block's ``alpha + beta`` instead.

* Single-task editing (method ``lines``): ``beta = 1 - alpha``, so the last block keeps the whole
  fine-tuned residual and shallow blocks shrink towards the pre-trained weights.
* Multi-task merging (post-step ``lines``): ``alpha = (||sum_t tau_t||_1 / ||tau_MTL||_1) / T`` with
  whole-model L1 norms (``alpha_mode: l1_ratio``, the reference); for task arithmetic this is exactly
  ``1/T`` (``alpha_mode: inverse_tasks``). ``beta`` is the method's tuned coefficient (the paper sweeps
  it over the method's lambda grid); ``alpha_mode: fixed`` takes ``alpha`` as given.

The reference assigns a key to block ``l`` when the substring ``.{l}.`` occurs in it (first match);
here the engine's layer index (``TensorInputs.layer``) is used, which avoids false matches such as
``mlp.0.weight``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from mergelab.errors import RecipeError
from mergelab.methods.registry import (
    BaseUse,
    MergeMethod,
    ModelScope,
    Param,
    PostStep,
    TensorInputs,
    register,
    register_post_step,
)

NON_LAYER = Param(
    "non_layer", str, "Scale of tensors outside the blocks (embeddings, final norm, heads): 'alpha' (reference) "
    "or 'deepest' (alpha + beta, like the last block).", default="alpha", choices=("alpha", "deepest"),
)


def layer_scale(layer: Optional[int], num_layers: Optional[int], alpha: float, beta: float,
                non_layer: str = "alpha") -> float:
    """LiNeS scale of a tensor in block ``layer`` of ``num_layers`` (``None`` outside the blocks)."""
    if layer is None or num_layers is None:
        return alpha if non_layer == "alpha" else alpha + beta
    if num_layers <= 1:
        return alpha + beta
    return alpha + beta * layer / (num_layers - 1)


# ---------------------------------------------------------------------------------------------
# The method: single-task editing.


def lines_merge(x: TensorInputs) -> torch.Tensor:
    alpha = x.params["alpha"]
    s = layer_scale(x.layer, x.num_layers, alpha, 1.0 - alpha, x.params["non_layer"])
    return x.base + s * (x.models[0] - x.base)


register(MergeMethod(
    name="lines",
    family="lines",
    summary="Scale one fine-tuned task vector linearly with depth: alpha in the first block up to 1 in the last.",
    reference="Wang et al. 2025, LiNeS (arXiv:2410.17146); wang-kee/LiNeS src/eval/eval.py::LiNeS_scaling.",
    merge=lines_merge,
    base=BaseUse.REQUIRED,
    params=(
        Param("alpha", float, "Scale of the first block (and of non-block tensors); the last block gets 1. "
              "The paper sweeps alpha over 0.0-1.0 on validation data.", low=0.0, high=1.0),
        NON_LAYER,
    ),
    min_models=1,
    max_models=1,
    chunkable=True,
    notes="Not in mergekit, FusionBench or PEFT. For a merged multi-task vector use the post-step "
          "`post: [{name: lines, parameters: {beta: ...}}]` after any task-vector method.",
))


# ---------------------------------------------------------------------------------------------
# The post-step: multi-task merging.


@dataclass(frozen=True)
class LinesStats:
    """Whole-model L1 norms for the ``l1_ratio`` alpha (see :func:`lines_post_statistics`)."""

    summed_task_vectors_l1: float
    merged_l1: float
    num_models: int

    @property
    def alpha(self) -> float:
        if self.merged_l1 == 0:
            return 1.0 / self.num_models
        return self.summed_task_vectors_l1 / self.merged_l1 / self.num_models


MERGED_DELTA = "merged_delta"


def lines_post_statistics(scope: ModelScope) -> LinesStats:
    """``||sum_t tau_t||_1`` and ``||tau_MTL||_1`` over the whole model, for ``alpha_mode: l1_ratio``.

    Each chunk of ``scope`` must carry the method's merged delta for that chunk (before this
    post-step) as ``chunk.aux["merged_delta"]``; ``base`` and ``models`` are the usual inputs.
    """
    summed = merged = 0.0
    n = 0
    for c in scope.chunks():
        if MERGED_DELTA not in c.aux:
            raise RecipeError("post-step lines: alpha_mode 'l1_ratio' needs the merged task vector of every "
                              "tensor (aux['merged_delta']); this engine did not provide it")
        n = len(c.models)
        total = torch.zeros_like(c.base)
        for m in c.models:
            total += m - c.base
        summed += float(total.abs().double().sum())
        merged += float(c.aux[MERGED_DELTA].abs().double().sum())
    return LinesStats(summed, merged, max(n, 1))


def lines_alpha(x: TensorInputs) -> float:
    """The post-step's alpha for this tensor, per ``alpha_mode``."""
    mode = x.params["alpha_mode"]
    if mode == "fixed":
        return x.params["alpha"]
    if mode == "inverse_tasks":
        return 1.0 / len(x.models)
    stats = x.model_stats
    if not isinstance(stats, LinesStats):
        raise RecipeError(
            "post-step lines: alpha_mode 'l1_ratio' needs whole-model statistics (the post-step's prepare_model "
            "pass over the merged task vector), which this engine did not run; use alpha_mode 'inverse_tasks' "
            "(exact for task_arithmetic) or 'fixed' with alpha"
        )
    return stats.alpha


def lines_post_apply(x: TensorInputs, merged_delta: torch.Tensor) -> torch.Tensor:
    """Scale the merged task vector of one tensor (or chunk) by its block's LiNeS factor.

    ``x.params`` are the post-step's parameters; with ``alpha_mode: l1_ratio``, ``x.model_stats`` is the
    :class:`LinesStats` returned by :func:`lines_post_statistics`.
    """
    alpha = lines_alpha(x)
    return layer_scale(x.layer, x.num_layers, alpha, x.params["beta"], x.params["non_layer"]) * merged_delta


register_post_step(PostStep(
    name="lines",
    summary="Scale the merged task vector linearly with depth (alpha at the first block, alpha + beta at the last).",
    reference="Wang et al. 2025, LiNeS (arXiv:2410.17146); wang-kee/LiNeS src/eval/eval.py::LiNeS_scaling, "
              "src/eval/aggregation.py (alpha from L1 norms).",
    apply=lines_post_apply,
    params=(
        Param("beta", float, "Scale added across depth (the last block gets alpha + beta); the paper tunes it "
              "on the merging method's lambda grid (task arithmetic 0.1-1.0, TIES 0.1-1.5)."),
        Param("alpha_mode", str, "'l1_ratio': alpha = ||sum_t tau_t||_1 / ||tau_merged||_1 / T over the whole model "
              "(reference); 'inverse_tasks': alpha = 1/T; 'fixed': the alpha parameter.", default="l1_ratio",
              choices=("l1_ratio", "inverse_tasks", "fixed"), per_layer=False),
        Param("alpha", float, "Scale of the first block with alpha_mode: fixed (ignored otherwise).", default=0.0),
        NON_LAYER,
    ),
    chunkable=True,
    prepare_model=lines_post_statistics,
))
