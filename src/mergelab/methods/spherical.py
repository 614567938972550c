"""Spherical interpolation of weights: SLERP, NuSLERP, Multi-SLERP and the Karcher mean.

These treat each tensor (or each row) as a vector and interpolate along the great circle between
the inputs instead of the chord, so the merged tensor keeps a norm close to the inputs'.

* ``slerp``: Shoemake, "Animating rotation with quaternion curves", SIGGRAPH 1985; as used for
  model merging by mergekit (``merge_methods/slerp.py``). Two inputs: the base is ``v0`` (``t = 0``)
  and the one model is ``v1`` (``t = 1``), interpolated over the whole flattened tensor.
* ``nuslerp``: mergekit's "new SLERP": two models with weights, ``t = w2 / (w1 + w2)``, over the whole
  tensor or per row/column, and on task vectors when a base is given.
* ``multislerp``: mergekit's barycentric interpolation of N inputs on the sphere (one tangent-space
  step at the weighted mean direction; Goddard, "Multi-SLERP", goddard.blog 2025).
* ``karcher``: the Riemannian (Karcher/Frechet) mean of the unit directions by fixed-point iteration,
  scaled by the mean norm (Karcher 1977; mergekit ``karcher``, docs citing arXiv:2603.04972).

All four reproduce mergekit 0.1.5 in float32 (same order of operations) on tensors the engine
computes whole. All four are chunkable: when the engine splits a tensor into row chunks, the
whole-tensor norms and dot products are computed in ``prepare_tensor`` (float64 accumulation). For
``multislerp`` and ``karcher`` every vector the algorithm forms is a linear combination of the inputs,
so the whole algorithm runs on the inputs' Gram matrix (N x N numbers, Karcher's iterations included)
and each chunk is then one weighted sum of the inputs: same result up to rounding, memory bounded by
the chunk, and Karcher's iterations cost nothing per element. Karcher therefore streams every tensor
of more than one chunk (1M elements), not only those too large to compute whole.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import List, Optional

import torch

from mergelab.errors import RecipeError
from mergelab.methods.inputs import whole_source
from mergelab.methods.common import SEMANTICS, WEIGHT
from mergelab.methods.gram import gram, gram_matrix
from mergelab.methods.registry import BaseUse, MergeMethod, Param, TensorInputs, TensorSource, register

_F32 = torch.float32

# --------------------------------------------------------------------------------------------------
# SLERP
# --------------------------------------------------------------------------------------------------

_SLERP_EPS = 1e-8
_SLERP_DOT_THRESHOLD = 0.9995
_SLERP_BLOCK = 1024 * 1024  # mergekit accumulates norms and dots over blocks of this many elements


def slerp_coefficients(dot: torch.Tensor, t: float) -> tuple:
    """Coefficients ``(a, b)`` of ``a*v0 + b*v1`` for the normalised dot product ``dot`` (float32).

    ``|dot| > 0.9995`` (nearly colinear or antipodal) falls back to linear interpolation.
    """
    tt = torch.tensor(t, dtype=_F32, device=dot.device)
    dot = dot.clamp(-1, 1)
    linear = dot.abs() > _SLERP_DOT_THRESHOLD
    theta = torch.acos(torch.where(linear, 0, dot))
    sin_theta = torch.sin(theta)
    a = torch.where(linear, 1 - tt, torch.sin((1 - tt) * theta) / sin_theta)
    b = torch.where(linear, tt, torch.sin(tt * theta) / sin_theta)
    return a, b


def _slerp_dot_whole(v0: torch.Tensor, v1: torch.Tensor) -> torch.Tensor:
    """mergekit's float32 normalised dot product over the whole tensor (block-wise, as it sums)."""
    a = v0.reshape(1, -1)
    b = v1.reshape(1, -1)
    starts = range(0, a.shape[1], _SLERP_BLOCK)
    na = torch.stack([torch.linalg.vector_norm(a[:, s:s + _SLERP_BLOCK], dim=1, keepdim=True) for s in starts])
    nb = torch.stack([torch.linalg.vector_norm(b[:, s:s + _SLERP_BLOCK], dim=1, keepdim=True) for s in starts])
    na = torch.linalg.vector_norm(na, dim=0)
    nb = torch.linalg.vector_norm(nb, dim=0)
    na = torch.where(na > _SLERP_EPS, na, 1)
    nb = torch.where(nb > _SLERP_EPS, nb, 1)
    parts = [
        ((a[:, s:s + _SLERP_BLOCK] / na) * (b[:, s:s + _SLERP_BLOCK] / nb)).sum(dim=1, keepdim=True)
        for s in starts
    ]
    return torch.stack(parts).sum(dim=0).reshape(())


def _slerp_prepare(src: TensorSource) -> Optional[torch.Tensor]:
    if src.num_chunks == 1:
        return None  # merge computes mergekit's float32 reductions itself
    g = gram(src, lambda c: [c.base, c.models[0]], [(0, 1)])
    na, nb = (math.sqrt(float(s)) for s in g.sq)
    na = na if na > _SLERP_EPS else 1.0
    nb = nb if nb > _SLERP_EPS else 1.0
    return torch.tensor(float(g.dot[(0, 1)]) / (na * nb), dtype=_F32)


def slerp_merge(x: TensorInputs) -> torch.Tensor:
    """``sin((1-t)O)/sin(O) * v0 + sin(tO)/sin(O) * v1`` with ``cos(O)`` the normalised dot product."""
    v0, v1 = x.base, x.models[0]
    t = x.params["t"]
    if v0.numel() == 0:
        return (1 - t) * v0 + t * v1
    if x.tensor_stats is None:
        whole_source(x)  # the dot product needs the whole tensor
        dot = _slerp_dot_whole(v0, v1)
    else:
        dot = x.tensor_stats.to(v0.device)
    a, b = slerp_coefficients(dot, t)
    return a * v0 + b * v1


register(MergeMethod(
    name="slerp",
    family="spherical",
    summary="Spherical interpolation between the base (t=0) and one model (t=1) over each whole tensor.",
    reference="Shoemake 1985 (SLERP); mergekit 0.1.5 `slerp` (merge_methods/slerp.py).",
    merge=slerp_merge,
    base=BaseUse.REQUIRED,
    params=(Param("t", float, "Interpolation factor: 0 gives the base model, 1 the other model."),),
    min_models=1,
    max_models=1,
    chunkable=True,
    prepare_tensor=_slerp_prepare,
    notes="As in mergekit, base_model is v0 and the single other model is v1; they are interpolated as "
          "raw weights (not task vectors). Nearly colinear tensors (|cos| > 0.9995) are interpolated "
          "linearly. Chunked tensors accumulate the dot product in float64 (unchunked ones reproduce "
          "mergekit's float32 sums bit for bit).",
))

# --------------------------------------------------------------------------------------------------
# NuSLERP
# --------------------------------------------------------------------------------------------------

_NU_EPS = 1e-8
_NU_NORM_EPS = 1e-7


def _nuslerp_t(weights: List[float]) -> float:
    total = sum(weights)
    return 0.5 if abs(total) < 1e-6 else weights[1] / total


def _nuslerp_combine(t: float, cos: torch.Tensor, v0: torch.Tensor, v1: torch.Tensor) -> torch.Tensor:
    """mergekit's nuslerp formula for vectors with cosine ``cos`` (broadcast against ``v0``/``v1``)."""
    colinear = (1 - cos.square()) <= _NU_EPS ** 2
    theta = torch.acos(torch.where(colinear, 0, cos))
    sin_theta = torch.sin(theta)
    res = (torch.sin((1 - t) * theta) * v0 + torch.sin(t * theta) * v1) / sin_theta
    return torch.where(colinear, (1 - t) * v0 + t * v1, res)


def _nuslerp_whole(t: float, v0: torch.Tensor, v1: torch.Tensor, row_wise: bool, flatten: bool) -> torch.Tensor:
    shape = v0.shape
    if flatten or v0.dim() == 0:
        v0, v1 = v0.reshape(-1), v1.reshape(-1)
    elif row_wise:
        v0, v1 = v0.transpose(0, -1), v1.transpose(0, -1)
    u0 = v0 / torch.norm(v0, dim=-1, keepdim=True).clamp(min=_NU_NORM_EPS)
    u1 = v1 / torch.norm(v1, dim=-1, keepdim=True).clamp(min=_NU_NORM_EPS)
    cos = torch.sum(u0 * u1, dim=-1, keepdim=True).clamp(-1, 1)
    res = _nuslerp_combine(t, cos, v0, v1)
    if row_wise and not flatten and res.dim() >= 1:
        res = res.transpose(0, -1)
    return res.reshape(shape)


def _nuslerp_vectors(c: TensorInputs) -> list:
    if c.base is None:
        return [c.models[0], c.models[1]]
    return [c.models[0] - c.base, c.models[1] - c.base]


def _nuslerp_prepare(src: TensorSource) -> Optional[torch.Tensor]:
    flatten, row_wise = src.params["nuslerp_flatten"], src.params["nuslerp_row_wise"]
    if src.num_chunks == 1:
        return None
    whole = flatten or len(src.shape) <= 1
    if not whole and not row_wise:
        return None  # every vector lies inside one row: nothing spans chunks
    g = gram(src, _nuslerp_vectors, [(0, 1)], per_column=not whole)
    n0 = torch.sqrt(g.sq[0]).clamp(min=_NU_NORM_EPS)
    n1 = torch.sqrt(g.sq[1]).clamp(min=_NU_NORM_EPS)
    cos = (g.dot[(0, 1)] / (n0 * n1)).clamp(-1, 1).to(_F32)
    return cos.reshape(1) if whole else cos.unsqueeze(0)


def nuslerp_merge(x: TensorInputs) -> torch.Tensor:
    """SLERP of the two models (or of their task vectors when there is a base) at ``t = w2/(w1+w2)``."""
    t = _nuslerp_t(x.model_param("weight"))
    v0, v1 = _nuslerp_vectors(x)
    if x.tensor_stats is None:
        if x.params["nuslerp_flatten"] or x.params["nuslerp_row_wise"] or len(x.shape) <= 1:
            whole_source(x)  # these vectors span rows: the cosines need the whole tensor
        res = _nuslerp_whole(t, v0, v1, x.params["nuslerp_row_wise"], x.params["nuslerp_flatten"])
    else:
        res = _nuslerp_combine(t, x.tensor_stats.to(v0.device), v0, v1)
    return res if x.base is None else x.base + res


register(MergeMethod(
    name="nuslerp",
    family="spherical",
    summary="SLERP of two models (or two task vectors) with t set by their weights, whole-tensor or per row.",
    reference="mergekit 0.1.5 `nuslerp` (merge_methods/nuslerp.py); SLERP after Shoemake 1985.",
    merge=nuslerp_merge,
    base=BaseUse.OPTIONAL,
    params=(
        Param("nuslerp_flatten", bool, "Interpolate the whole tensor as one vector (false: per row or column).",
              default=True),
        Param("nuslerp_row_wise", bool, "Without flatten, interpolate vectors along dimension 0 (columns of a "
              "[out, in] matrix) instead of the last dimension (rows).", default=False),
    ),
    model_params=(WEIGHT,),
    min_models=2,
    max_models=2,
    chunkable=True,
    prepare_tensor=_nuslerp_prepare,
    notes="t = w2 / (w1 + w2) (0.5 when the weights sum to ~0). With a base model, the two task vectors "
          "are interpolated and added to the base. No dot-product threshold: only exactly colinear "
          "vectors (1 - cos^2 <= 1e-16) fall back to linear interpolation. mergekit's docs call the "
          "dimension-0 vectors 'rows'; here they are the columns of a PyTorch [out, in] matrix.",
))

# --------------------------------------------------------------------------------------------------
# Multi-SLERP
# --------------------------------------------------------------------------------------------------


def _combine(vectors: List[torch.Tensor], coefficients: torch.Tensor) -> torch.Tensor:
    """``sum_i coefficients[i] * vectors[i]`` in float32."""
    c = coefficients.to(_F32).tolist()
    out = vectors[0] * c[0]
    for v, ci in zip(vectors[1:], c[1:]):
        out.add_(v, alpha=ci)
    return out


def _multislerp_vectors(c: TensorInputs) -> list:
    return list(c.models) if c.base is None else [m - c.base for m in c.models]


def multislerp_plan(gram: torch.Tensor, weights: List[float], normalize: bool, eps: float, name: str):
    """Multi-SLERP on the Gram matrix of the inputs ``v_i``: ``("zero", None)`` when every input is
    zero, else ``("combine", beta)`` with the result ``sum_i beta_i v_i`` (for the two-antipodal
    fallback, ``beta`` is the weights themselves). Same steps as :func:`multislerp_merge` with every
    vector written in the basis of the unit inputs ``u_i = v_i / (||v_i|| + eps)``."""
    g = gram.to(torch.float64)
    w = torch.tensor(weights, dtype=torch.float64)
    if normalize:
        w = w / w.sum()
    norms = torch.sqrt(torch.diagonal(g).clamp(min=0))
    if bool((norms <= eps).all()):
        return "zero", None
    scale = norms + eps
    u = g / torch.outer(scale, scale)  # Gram matrix of the units

    def norm(c: torch.Tensor) -> float:
        return math.sqrt(max(0.0, float(c @ u @ c)))

    mean_norm = norm(w)
    if mean_norm < eps:
        if len(weights) != 2:
            raise RecipeError(
                f"multislerp: parameter 'weight' = {weights} exactly balances opposite directions in tensor "
                f"'{name}' (the weighted mean direction is zero); expected weights that do not cancel"
            )
        return "combine", w  # the linear blend of the two inputs
    mean = w / mean_norm
    dots = u @ mean
    tangent = w - float(w @ dots) * mean
    tangent_norm = norm(tangent) + eps
    res = mean * math.cos(tangent_norm) + tangent * (math.sin(tangent_norm) / tangent_norm)
    return "combine", res * float(norms @ w) / scale


def _multislerp_prepare(src: TensorSource):
    if src.num_chunks == 1 or src.num_models == 1:
        return None  # merge reproduces mergekit's float32 steps on the whole tensor
    g = gram_matrix(src, _multislerp_vectors)
    return multislerp_plan(g, [p["weight"] for p in src.model_params], src.params["normalize_weights"],
                           src.params["eps"], src.name)


def multislerp_merge(x: TensorInputs) -> torch.Tensor:
    """One exponential-map step from the weighted mean direction, scaled by the weighted mean norm."""
    models = x.models
    if len(models) == 1:
        return models[0]
    if x.tensor_stats is not None:
        kind, coefficients = x.tensor_stats
        if kind == "zero":
            return torch.zeros_like(models[0]) if x.base is None else x.base.clone()
        res = _combine(_multislerp_vectors(x), coefficients)
        return res if x.base is None else res + x.base
    whole_source(x)  # the norms need the whole tensor
    eps = x.params["eps"]
    shape = models[0].shape
    tensors = torch.stack(models, dim=0)
    if x.base is not None:
        tensors = tensors - x.base
    flat = tensors.reshape(tensors.shape[0], -1)
    weights = torch.tensor(x.model_param("weight"), dtype=_F32, device=flat.device)
    if x.params["normalize_weights"]:
        weights = weights / weights.sum()
    norms = torch.norm(flat, dim=-1, keepdim=True)
    if bool((norms <= eps).all()):
        # Every input is (numerically) zero, e.g. a tensor no model changed from the base: there is
        # no direction to average, and the merged norm is zero. (mergekit raises here.)
        return torch.zeros(shape, dtype=_F32, device=flat.device) if x.base is None else x.base.clone()
    units = flat / (norms + eps)
    mean = (units * weights.view(-1, 1)).sum(0)
    mean_norm = torch.norm(mean)
    if mean_norm < eps:
        if len(models) != 2:
            raise RecipeError(
                f"multislerp: parameter 'weight' = {x.model_param('weight')} exactly balances opposite "
                f"directions in tensor '{x.name}' (the weighted mean direction is zero); expected weights "
                f"that do not cancel"
            )
        res = (tensors[0] * weights[0] + tensors[1] * weights[1]).reshape(shape)
        return res if x.base is None else res + x.base
    mean = mean / mean_norm
    dots = (units * mean).sum(-1, keepdim=True)
    tangent = ((units - dots * mean) * weights.view(-1, 1)).sum(0)
    tangent_norm = torch.norm(tangent) + eps
    res = mean * torch.cos(tangent_norm) + tangent * (torch.sin(tangent_norm) / tangent_norm)
    res = (res * (norms.squeeze(-1) * weights).sum()).reshape(shape)
    return res if x.base is None else res + x.base


register(MergeMethod(
    name="multislerp",
    family="spherical",
    summary="Spherical barycentre of N models (or task vectors): one tangent-space step at the mean direction.",
    reference="Goddard 2025, Multi-SLERP (goddard.blog/posts/multislerp-wow-what-a-cool-idea); "
              "mergekit 0.1.5 `multislerp`.",
    merge=multislerp_merge,
    base=BaseUse.OPTIONAL,
    params=(
        Param("normalize_weights", bool, "Divide the weights by their sum.", default=True),
        Param("eps", float, "Added to norms before dividing, for numerical stability.", default=1e-8,
              low=0.0),
    ),
    model_params=(WEIGHT,),
    min_models=1,
    chunkable=True,
    prepare_tensor=_multislerp_prepare,
    notes="A single exponential-map step, not an iterated Frechet mean (see karcher). With a base model the "
          "task vectors are interpolated and added to the base. Two antipodal inputs with balancing "
          "weights fall back to the linear blend; more than two raise an error naming the weights. "
          "A tensor that every input leaves at zero (with a base: that no model changed) gives zero "
          "(the base), where mergekit raises.",
))

# --------------------------------------------------------------------------------------------------
# Karcher mean
# --------------------------------------------------------------------------------------------------


def karcher_mean(tensors: List[torch.Tensor], alphas: List[float], max_iter: int, tol: float) -> torch.Tensor:
    """Weighted Karcher mean of the directions of ``tensors`` times ``sum_i alpha_i ||x_i||``.

    Follows mergekit 0.1.5's float32 order of operations. Inputs with norm ``<= tol`` are left out of
    the direction (their weight goes to the others) but count in the scale.
    """
    if len(tensors) == 1:
        return tensors[0]
    norms, units = [], []
    for t in tensors:
        n = torch.linalg.vector_norm(t)
        norms.append(n)
        units.append(torch.zeros_like(t) if n.item() == 0.0 else t / n)
    valid = [i for i, n in enumerate(norms) if n.item() > tol]
    if not valid:
        return torch.zeros_like(tensors[0])
    total = sum(alphas[i] for i in valid)
    a_valid = [alphas[i] / total for i in valid]
    u_valid = [units[i] for i in valid]
    mean = torch.zeros_like(u_valid[0])
    for a, u in zip(a_valid, u_valid):
        mean += a * u
    mean_norm = torch.linalg.vector_norm(mean)
    mean = u_valid[0].clone() if mean_norm.item() < tol else mean / mean_norm
    for _ in range(max_iter):
        tangent = torch.zeros_like(mean)
        for a, u in zip(a_valid, u_valid):
            cos = torch.clamp(torch.dot(mean.flatten(), u.flatten()), -1.0, 1.0)
            theta = torch.arccos(cos)
            if theta.item() < tol:
                continue
            tangent += a * (theta / torch.sin(theta)) * (u - cos * mean)
        tangent_norm = torch.linalg.vector_norm(tangent)
        if tangent_norm.item() < tol:
            break
        mean = torch.cos(tangent_norm) * mean + torch.sin(tangent_norm) * (tangent / tangent_norm)
        unit_norm = torch.linalg.vector_norm(mean)
        if unit_norm.item() > tol:
            mean = mean / unit_norm
    scale = sum(a * n for a, n in zip(alphas, norms))
    return scale * mean


def karcher_plan(gram: torch.Tensor, alphas: List[float], max_iter: int, tol: float) -> torch.Tensor:
    """:func:`karcher_mean` on the Gram matrix of the inputs: coefficients ``c`` with the result
    ``sum_i c_i x_i``. Every iterate is a combination of the unit inputs, so each step (cosines,
    tangent, norms) is an N x N computation; same decisions (zero norms, ``tol`` cut-offs)."""
    g = gram.to(torch.float64)
    n = g.shape[0]
    norms = torch.sqrt(torch.diagonal(g).clamp(min=0))
    inv = torch.where(norms > 0, 1.0 / torch.where(norms > 0, norms, 1.0), 0.0)
    u = g * torch.outer(inv, inv)  # Gram matrix of the units (zero rows for zero inputs)
    if n == 1:
        return torch.ones(1, dtype=torch.float64)
    valid = [i for i in range(n) if float(norms[i]) > tol]
    if not valid:
        return torch.zeros(n, dtype=torch.float64)
    total = sum(alphas[i] for i in valid)
    a = {i: alphas[i] / total for i in valid}

    def norm(c: torch.Tensor) -> float:
        return math.sqrt(max(0.0, float(c @ u @ c)))

    mean = torch.zeros(n, dtype=torch.float64)
    for i in valid:
        mean[i] += a[i]
    mean_norm = norm(mean)
    if mean_norm < tol:
        mean = torch.zeros(n, dtype=torch.float64)
        mean[valid[0]] = 1.0
    else:
        mean = mean / mean_norm
    for _ in range(max_iter):
        tangent = torch.zeros(n, dtype=torch.float64)
        cosines = u @ mean
        for j in valid:
            cos = min(1.0, max(-1.0, float(cosines[j])))
            theta = math.acos(cos)
            if theta < tol:
                continue
            step = a[j] * theta / math.sin(theta)
            tangent[j] += step
            tangent -= step * cos * mean
        tangent_norm = norm(tangent)
        if tangent_norm < tol:
            break
        mean = math.cos(tangent_norm) * mean + math.sin(tangent_norm) * (tangent / tangent_norm)
        unit_norm = norm(mean)
        if unit_norm > tol:
            mean = mean / unit_norm
    scale = float(sum(alphas[i] * float(norms[i]) for i in range(n)))
    return scale * mean * inv


def karcher_alphas(x) -> List[float]:
    """Per-input weights: uniform under ``semantics: mergekit``, else the normalised ``weight``s."""
    n = len(x.model_params)
    if x.params["semantics"] == "mergekit":
        return [1.0 / n] * n
    w = [p["weight"] for p in x.model_params]
    total = sum(w)
    return [wi / total for wi in w]


def _karcher_prepare(src: TensorSource) -> Optional[torch.Tensor]:
    if src.num_chunks == 1 or src.num_models == 1:
        return None  # merge reproduces mergekit's float32 iterations on the whole tensor
    g = gram_matrix(src, lambda c: list(c.models))
    return karcher_plan(g, karcher_alphas(src), src.params["max_iter"], src.params["tol"])


def validate_karcher(params: dict, model_params: list) -> None:
    weights = [p["weight"] for p in model_params]
    if params.get("semantics") == "mergekit":
        if len(set(weights)) > 1:
            raise RecipeError(
                f"karcher: parameter 'weight' = {weights} cannot be honoured with semantics: mergekit "
                "(mergekit 0.1.5 gives every model the weight 1/N); set semantics: paper for a weighted "
                "Karcher mean, or give every model the same weight"
            )
        return
    if weights and sum(weights) <= 0:
        raise RecipeError(
            "karcher: parameter 'weight' must have a positive sum over the models (the weights are "
            f"normalised to sum to 1); got {weights}"
        )


def karcher_merge(x: TensorInputs) -> torch.Tensor:
    if x.tensor_stats is not None:
        return _combine(list(x.models), x.tensor_stats)
    if len(x.models) > 1:
        whole_source(x)  # the norms and angles need the whole tensor
    return karcher_mean(list(x.models), karcher_alphas(x), x.params["max_iter"], x.params["tol"])


register(MergeMethod(
    name="karcher",
    family="spherical",
    summary="Riemannian (Karcher) mean of the models' directions on the unit sphere, scaled by their mean norm.",
    reference="Karcher 1977, Riemannian center of mass; mergekit 0.1.5 `karcher` (docs cite arXiv:2603.04972).",
    merge=karcher_merge,
    base=BaseUse.INPUT,
    params=(
        Param("max_iter", int, "Maximum fixed-point iterations.", default=10, low=0),
        Param("tol", float, "Stop when the tangent step is shorter than this (also the zero-norm cutoff).",
              default=1e-5, low=0.0, low_open=True),
        replace(SEMANTICS, meaning="'mergekit' (default): every model weighs 1/N, as in mergekit 0.1.5; "
                "'paper': the weighted Karcher mean with the models' 'weight's."),
    ),
    model_params=(replace(WEIGHT, default=1.0, low=0.0,
                          meaning="Weight of this model in the mean (normalised to sum to 1); "
                                  "semantics: paper only (with semantics: mergekit, unequal weights are an "
                                  "error)."),),
    min_models=1,
    chunkable=True,
    prepare_tensor=_karcher_prepare,
    # Iterating on the N x N Gram matrix is far cheaper than iterating over a large whole tensor, so
    # tensors above one chunk (1M elements) always stream; smaller ones keep mergekit's float32 steps.
    whole_elements=0,
    validate=validate_karcher,
    notes="semantics: mergekit (default) gives every model the weight 1/N, as mergekit 0.1.5 does; unequal "
          "'weight's are then an error. semantics: paper weights the mean by the per-model 'weight' (a "
          "weighted Karcher mean; equal weights give mergekit's result bit for bit). As in mergekit, a "
          "base_model is one more input.",
))
