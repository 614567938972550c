"""RAM and RAM+ (tensor-local): Reinforced Agent Merging.

Yuan et al., "Reinforced Agent Merging" (arXiv:2601.13572; official code xiangchi-yuan/mrl
``ram-main.py``); mergekit 0.1.5 ``ram`` and ``ramplus_tl``. RL fine-tunes change few entries, and
averaging dilutes an update that only one agent made. Per tensor, with task vectors
``tau_i = theta_i - theta_0`` and ``epsilon`` (default 1e-5):

* ``active_i = |tau_i| > epsilon`` (strict), ``c = sum_i active_i`` per entry;
* ``ram``: ``theta = theta_0 + sum_i active_i * tau_i / max(c, 1)``: an entry that one model changed
  (``c = 1``) takes that model's update in full, one that several changed takes the mean of their
  updates (sub-epsilon ones excluded), one that none changed keeps the base. This is the official
  code's ``arm`` mode as well.
* ``ramplus_tl`` (parameters ``r`` = 0.1, ``alpha`` = 0.2): per model, over this tensor,
  ``rho_i = shared_i / max(unique_i, epsilon)`` with ``shared_i`` (``unique_i``) the number of the
  model's active entries that other models also (do not) change, ``lambda_i = 1 + r * clamp(rho_i,
  0, alpha)``; unique entries take ``lambda_i * tau_i``, shared ones the mean as in ``ram``. A
  model with no unique entry gets ``rho = shared / epsilon`` (finite, clamped to ``alpha``), where
  the official global RAM+ divides by zero.

* ``ramplus`` (not in mergekit): the official RAM+ (``arm-r-v2``, the code's default mode), which
  counts over the whole model: ``lambda_j = 1 + (R - 1) * min(1, rho_j)``, ``rho_j = shared_j /
  unique_j`` summed over every merged tensor (``prepare_model``: a counting pass, then the merge).

``ram`` and ``ramplus_tl`` have mergekit's semantics, bit for bit in float32: ``epsilon`` is compared in
float32, the mean divides each update by ``c`` before summing in model order, and ``rho``/``lambda``
are float32 (the counts converted to float32, as torch promotes them). ``ram`` is element-wise
(streamed in cache-sized chunks); ``ramplus_tl`` counts the whole tensor first (``prepare_tensor``),
so a tensor split in row chunks gives the same result as whole.
"""

from __future__ import annotations

import math
from typing import List, Optional, Tuple

import torch

from mergelab.methods.registry import (
    STREAM_ELEMENTS, BaseUse, MergeMethod, ModelScope, Param, TensorInputs, TensorSource, register,
)

EPSILON = Param("epsilon", float, "An entry counts as changed by a model when |theta_i - theta_0| > epsilon "
                "(compared in float32).", default=1e-5, low=0.0)


def _active_counts(x: TensorInputs, eps: float) -> torch.Tensor:
    """``c``: how many models change each entry by more than ``eps`` (int32, shaped like the chunk)."""
    count = torch.zeros(x.base.shape, dtype=torch.int32, device=x.base.device)
    for m in x.models:
        count += (m - x.base).abs() > eps
    return count


def _merge(x: TensorInputs, lambdas: Optional[List[float]]) -> torch.Tensor:
    """``base + sum_i term_i`` in model order, ``term_i`` being ``tau_i * lambda_i`` (unique entry),
    ``tau_i / c`` (shared entry) or 0 (inactive). ``lambdas`` None is RAM (``lambda_i = 1``, and
    ``tau / 1`` is ``tau``). Each division is by the integer count, as mergekit divides, never by a
    rounded reciprocal."""
    eps = x.params["epsilon"]
    count = _active_counts(x, eps)
    divisor = count.clamp(min=1).to(x.base.dtype)
    unique = count == 1
    merged = torch.zeros_like(x.base)
    for i, m in enumerate(x.models):
        d = m - x.base
        active = d.abs() > eps
        if lambdas is None:
            term = d.div_(divisor)
        else:
            lam = torch.tensor(lambdas[i], dtype=torch.float32, device=d.device)
            term = torch.where(unique, d * lam, d / divisor)
        merged += torch.where(active, term, torch.zeros((), dtype=term.dtype, device=term.device))
    return x.base + merged


def ram_merge(x: TensorInputs) -> torch.Tensor:
    """RAM: unique updates kept whole, shared ones averaged over the models that make them."""
    return _merge(x, None)


def _chunk_counts(x: TensorInputs, eps: float) -> Tuple[List[int], List[int]]:
    """Per model: its active entries in this chunk that are shared (c > 1) and unique (c == 1)."""
    count = _active_counts(x, eps)
    shared, unique = [], []
    for m in x.models:
        active = (m - x.base).abs() > eps
        shared.append(int(torch.count_nonzero(active & (count > 1))))
        unique.append(int(torch.count_nonzero(active & (count == 1))))
    return shared, unique


def ramplus_lambdas(shared: List[int], unique: List[int], r: float, alpha: float, eps: float) -> List[float]:
    """``lambda_i = 1 + r * clamp(shared_i / max(unique_i, eps), 0, alpha)``, in float32 as mergekit
    computes it (the counts converted to float32 first)."""
    s = torch.tensor(shared, dtype=torch.float64).to(torch.float32)
    u = torch.tensor(unique, dtype=torch.float64).to(torch.float32)
    rho = s / u.clamp(min=eps)
    return (1 + r * rho.clamp(min=0, max=alpha)).tolist()


def _lambdas_of(params: dict, shared: List[int], unique: List[int]) -> List[float]:
    return ramplus_lambdas(shared, unique, params["r"], params["alpha"], params["epsilon"])


def _ramplus_prepare(src: TensorSource) -> Optional[List[float]]:
    """Per-model ``lambda_i`` of a chunked tensor (a whole tensor counts in its merge, so its task
    vectors are not computed an extra time on the read-ahead thread)."""
    if src.num_chunks == 1:
        return None
    shared = [0] * src.num_models
    unique = [0] * src.num_models
    for c in src.chunks():
        s, u = _chunk_counts(c, src.params["epsilon"])
        shared = [a + b for a, b in zip(shared, s)]
        unique = [a + b for a, b in zip(unique, u)]
    return _lambdas_of(src.params, shared, unique)


def ramplus_tl_merge(x: TensorInputs) -> torch.Tensor:
    """RAM+ with per-tensor counts: unique updates scaled by ``lambda_i``, shared ones averaged."""
    lambdas = x.tensor_stats
    if lambdas is None:
        lambdas = _lambdas_of(x.params, *_chunk_counts(x, x.params["epsilon"]))
    return _merge(x, lambdas)


def ramplus_official_lambda(shared: int, unique: int, rescale: float) -> float:
    """The official RAM+ (``arm-r-v2``) factor of one model from its whole-model counts:
    ``1 + (R - 1) * min(1, rho)`` with ``rho = overlap / (changed - overlap) = shared / unique``,
    0 for a model that changes nothing. A model whose every change is shared (the official code
    divides by zero there) gets ``rho = inf``, so ``R``; it has no unique entry to scale."""
    if shared + unique == 0:
        rho = 0.0
    elif unique == 0:
        rho = math.inf
    else:
        rho = shared / unique
    return 1.0 + (rescale - 1.0) * min(1.0, rho)


def _ramplus_prepare_model(scope: ModelScope) -> List[float]:
    """Per-model ``lambda_j`` of the official RAM+, from counts over every tensor the method merges."""
    shared = [0] * scope.num_models
    unique = [0] * scope.num_models
    for c in scope.chunks():
        s, u = _chunk_counts(c, scope.params["epsilon"])
        shared = [a + b for a, b in zip(shared, s)]
        unique = [a + b for a, b in zip(unique, u)]
    return [ramplus_official_lambda(s, u, scope.params["rescale"]) for s, u in zip(shared, unique)]


def ramplus_merge(x: TensorInputs) -> torch.Tensor:
    """RAM+ as in the paper's code: unique updates scaled by the whole-model ``lambda_j``."""
    if x.model_stats is None:  # never plain RAM by accident
        raise RuntimeError("ramplus needs its whole-model counts: the engine must call prepare_model first")
    return _merge(x, x.model_stats)


_REFERENCE = ("Yuan et al. 2026, Reinforced Agent Merging (arXiv:2601.13572), xiangchi-yuan/mrl ram-main.py; "
              "mergekit 0.1.5 `{}`.")

register(MergeMethod(
    name="ram",
    family="ram",
    summary="Per entry: the update of the only model that changed it, or the mean of the models that did.",
    reference=_REFERENCE.format("ram"),
    merge=ram_merge,
    base=BaseUse.REQUIRED,
    params=(EPSILON,),
    min_models=1,
    chunkable=True,
    stream_elements=STREAM_ELEMENTS,
    notes="Identical to mergekit 0.1.5 and to the official code's `arm` mode (float32). No per-model "
          "weights (mergekit takes none). A change of at most epsilon counts as no change; with bfloat16 "
          "inputs mergelab subtracts in float32, mergekit in the config dtype.",
))

register(MergeMethod(
    name="ramplus_tl",
    family="ram",
    summary="RAM, with each model's unique updates scaled up by how much of its update other models share "
            "(counted per tensor).",
    reference=_REFERENCE.format("ramplus_tl"),
    merge=ramplus_tl_merge,
    base=BaseUse.REQUIRED,
    params=(
        Param("r", float, "Strength of the rescale: lambda_i = 1 + r * clamp(rho_i, 0, alpha).", default=0.1),
        Param("alpha", float, "Cap on the shared/unique ratio rho_i.", default=0.2, low=0.0),
        Param("epsilon", float, EPSILON.meaning + " Must be > 0 (rho divides by max(unique_i, epsilon)).",
              default=1e-5, low=0.0, low_open=True),
    ),
    min_models=1,
    chunkable=True,
    prepare_tensor=_ramplus_prepare,
    notes="mergekit 0.1.5's tensor-local RAM+: rho_i = shared_i / max(unique_i, epsilon) per tensor, so the "
          "largest lambda is 1 + r * alpha (1.02 by default). The paper's RAM+ (official `arm-r-v2`) counts "
          "over the whole model with lambda = 1 + (R - 1) * min(1, rho) (mergelab's `ramplus`): on a one-tensor "
          "model it is ramplus_tl with r = R - 1 and alpha = 1.",
))

register(MergeMethod(
    name="ramplus",
    family="ram",
    summary="RAM+ as in the paper's code: RAM, with each model's unique updates scaled up by the share of "
            "its changes that other models also make, counted over the whole model.",
    reference="Yuan et al. 2026, Reinforced Agent Merging (arXiv:2601.13572), xiangchi-yuan/mrl ram-main.py "
              "`arm-r-v2` (not in mergekit 0.1.5, whose `ramplus_tl` counts per tensor).",
    merge=ramplus_merge,
    base=BaseUse.REQUIRED,
    params=(
        Param("rescale", float, "R: lambda_j = 1 + (R - 1) * min(1, rho_j), rho_j = shared_j / unique_j over the "
              "whole model (the official code's --rescale_factor; R = 1 is RAM).", default=1.05, low=1.0,
              per_layer=False),
        Param("epsilon", float, EPSILON.meaning + " One value for the whole model.", default=1e-5, low=0.0,
              per_layer=False),
    ),
    min_models=1,
    chunkable=True,
    prepare_model=_ramplus_prepare_model,
    notes="Two passes over the model: the counts, then the merge. rescale defaults to the official command "
          "line's 1.05 (its function default is 1.1; the README's RAM+ runs use 1.2). The official code "
          "treats R < 1 as 1; here it is an error. A model whose every change is shared makes the official "
          "code divide by zero; here its lambda is R, and it has no unique entry to scale.",
))
