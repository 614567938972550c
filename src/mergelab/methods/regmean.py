"""RegMean: merge linear layers by the closed-form least-squares fit to every model's activations.

Jin, Ren, Preotiuc-Pietro, Cheng, "Dataless Knowledge Fusion by Merging Weights of Language Models",
ICLR 2023 (arXiv:2212.09849). Reference code: bloomberg/dataless-model-merging
(``src/model_merge/avg_merger.py``: ``regmean_mean_params``, ``reduce_non_diag``); cross-checked with
FusionBench (``fusion_bench/method/regmean/regmean.py``) and MergeBench
(``merging/merging_methods/regmean.py``) for the numerics.

For a linear weight with per-model input Grams ``G_i`` (``mergelab calibrate --stats gram``), in
regression layout ``W_i`` (``[d_in, d_out]``, the transposed ``nn.Linear`` weight; GPT-2's ``Conv1D``
weight as stored):

    G~_i = alpha G_i + (1 - alpha) diag(G_i)        (off-diagonal shrinkage, the reference's
                                                     ``reduce_non_diag``; alpha = 1 keeps G_i)
    W*   = (sum_i s_i G~_i)^-1  sum_i s_i G~_i W_i   with s_i = M c_i, c_i = weight_i / sum_j weight_j

the exact minimiser of ``sum_i ||X_i W - X_i W_i||^2`` when ``alpha = 1``. Every other tensor (biases,
LayerNorm, embeddings; in the statistics file a 0-d entry) is the ``c``-weighted mean, as in the
reference (biases are averaged, not solved jointly). The Grams are used as stored: ``calibrate
--gram-reduction mean`` (running mean ``X^T X / n``, the reference code, default) or ``sum`` (``X^T X``,
the paper) decides whether models with more data weigh more.

Solve (float64): ``solver: auto`` uses ``torch.linalg.solve`` unless the system is singular-looking (a
zero diagonal entry or condition number above 1e8, MergeBench's rule), then the pseudo-inverse;
``solve`` / ``pinv`` force one; ``ridge`` adds ``ridge * trace / d`` to the diagonal first (our option,
off by default).
"""

from __future__ import annotations

import re
from typing import List, Optional, Sequence

import torch

from mergelab.errors import RecipeError
from mergelab.methods.common import STATISTICS, STATISTICS_PARAM
from mergelab.methods.registry import BaseUse, MergeMethod, Param, TensorInputs, register

GPT2_CONV1D = r"(^|\.)(c_attn|c_proj|c_fc|q_attn)\.weight$"
COND_LIMIT = 1e8

def shrink(gram: torch.Tensor, alpha: float) -> torch.Tensor:
    """``alpha G + (1 - alpha) diag(G)``: off-diagonal entries scaled by ``alpha``, diagonal kept."""
    if alpha == 1.0:
        return gram
    out = gram * alpha
    out.diagonal().copy_(gram.diagonal())
    return out


def _solve(a: torch.Tensor, b: torch.Tensor, solver: str, ridge: float) -> torch.Tensor:
    if ridge > 0:
        a = a.clone()
        a.diagonal().add_(ridge * float(a.diagonal().sum()) / a.shape[0])
    if solver == "pinv":
        return torch.linalg.pinv(a, hermitian=True) @ b
    if solver == "auto":
        if bool((a.diagonal() == 0).any()) or float(torch.linalg.cond(a)) > COND_LIMIT:
            return torch.linalg.pinv(a, hermitian=True) @ b
    return torch.linalg.solve(a, b)


def regmean_solve(weights: Sequence[torch.Tensor], grams: Sequence[torch.Tensor], alpha: float = 1.0,
                  coefficients: Optional[Sequence[float]] = None, solver: str = "auto", ridge: float = 0.0
                  ) -> torch.Tensor:
    """RegMean of weights in **regression layout** ``[d_in, d_out]`` with Grams ``[d_in, d_in]``.

    ``coefficients`` ``c_i`` (summing to 1; default uniform) scale each Gram by ``M c_i``. Returns the
    merged ``[d_in, d_out]`` weight in float64; the accumulation streams (``A = sum s_i G~_i``,
    ``B = sum s_i G~_i W_i``), so only two accumulators are held.
    """
    m = len(weights)
    if m == 0 or len(grams) != m:
        raise ValueError("regmean_solve needs one Gram per weight")
    coefficients = [1.0 / m] * m if coefficients is None else list(coefficients)
    a: Optional[torch.Tensor] = None
    b: Optional[torch.Tensor] = None
    for w, g, c in zip(weights, grams, coefficients):
        gs = shrink(g.to(torch.float64), alpha) * (m * c)
        wb = gs @ w.to(torch.float64)
        a = gs if a is None else a + gs
        b = wb if b is None else b + wb
    return _solve(a, b, solver, ridge)


def weight_layout(name: str, shape: tuple, gram_dim: int, layout: str) -> str:
    """``linear`` (``[d_out, d_in]``) or ``conv1d`` (``[d_in, d_out]``) for a weight and its Gram size."""
    if layout not in ("auto", "linear", "conv1d"):
        raise RecipeError(f"regmean: layout must be auto, linear or conv1d, got '{layout}'")
    rows, cols = shape[0], int(torch.tensor(shape[1:]).prod()) if len(shape) > 1 else 1
    fits = {"linear": cols == gram_dim, "conv1d": rows == gram_dim}
    if layout == "auto":
        if fits["linear"] and fits["conv1d"]:
            layout = "conv1d" if re.search(GPT2_CONV1D, name) else "linear"
        elif fits["linear"]:
            layout = "linear"
        elif fits["conv1d"]:
            layout = "conv1d"
    if layout == "auto" or not fits[layout]:
        raise RecipeError(
            f"regmean: the Gram of tensor '{name}' is {gram_dim}x{gram_dim}, which matches neither input "
            f"dimension of its weight {list(shape)}; the statistics come from a different architecture"
        )
    return layout


def _coefficients(x: TensorInputs) -> List[float]:
    w = [float(v) for v in x.model_param("weight")]
    total = sum(w)
    if total <= 0:
        raise RecipeError(f"regmean: tensor '{x.name}': the models' weights must have a positive sum, got {w}")
    return [v / total for v in w]


def _averaged(x: TensorInputs, c: List[float]) -> torch.Tensor:
    out = torch.zeros_like(x.models[0])
    for t, ci in zip(x.models, c):
        out.add_(t, alpha=ci)
    return out


def regmean_merge(x: TensorInputs) -> torch.Tensor:
    """One tensor of RegMean: solved for linear weights with 2-D Grams, averaged otherwise."""
    c = _coefficients(x)
    grams = x.aux.get(STATISTICS)
    if grams is None or len(grams) != len(x.models):
        raise RecipeError(f"regmean: tensor '{x.name}' has no statistics for every model; give each model the "
                          f"per-model parameter '{STATISTICS}' (a gram.safetensors from `mergelab calibrate`)")
    exclude = x.params["exclude"]
    kinds = {("none" if g is None or g.dim() == 0 else "gram") for g in grams}
    if len(kinds) > 1:
        raise RecipeError(f"regmean: tensor '{x.name}' has a Gram matrix for some models and none for others; "
                          f"the statistics files come from different architectures")
    if kinds == {"none"} or (exclude and re.search(exclude, x.name)) or x.models[0].dim() < 2:
        return _averaged(x, c)
    d = grams[0].shape[0]
    for i, g in enumerate(grams):
        if g.dim() != 2 or g.shape[0] != g.shape[1] or g.shape[0] != d:
            raise RecipeError(f"regmean: statistics of model {i} for tensor '{x.name}' have shape {list(g.shape)}; "
                              f"expected a square Gram matrix [{d}, {d}]")
    layout = weight_layout(x.name, tuple(x.shape), d, x.params["layout"])
    shape = x.models[0].shape
    if layout == "linear":
        ws = [t.reshape(shape[0], -1).T for t in x.models]
    else:
        ws = [t.reshape(shape[0], -1) for t in x.models]
    merged = regmean_solve(ws, grams, x.params["alpha"], c, x.params["solver"], x.params["ridge"])
    if layout == "linear":
        merged = merged.T
    return merged.to(torch.float32).reshape(shape).contiguous()


register(MergeMethod(
    name="regmean",
    family="regmean",
    summary="Closed-form least-squares merge of linear layers from each model's input Gram matrices.",
    reference="Jin et al. 2023, Dataless Knowledge Fusion (arXiv:2212.09849); bloomberg/dataless-model-merging "
              "avg_merger.py regmean_mean_params.",
    merge=regmean_merge,
    base=BaseUse.IGNORED,
    params=(
        Param("alpha", float, "Off-diagonal Gram scale (reference reduce_non_diag; 1 = no shrinkage, 0 = diagonal).",
              default=0.1, low=0.0, high=1.0),
        Param("solver", str, "auto (solve, pseudo-inverse if cond > 1e8 or a zero diagonal), solve or pinv.",
              default="auto", choices=("auto", "solve", "pinv")),
        Param("ridge", float, "Add ridge * trace(A) / d to the diagonal before solving (not in the paper).",
              default=0.0, low=0.0),
        Param("layout", str, "Weight layout: auto (from the Gram size; square GPT-2 Conv1D names are conv1d), "
              "linear ([out, in]) or conv1d ([in, out]).", default="auto", choices=("auto", "linear", "conv1d")),
        Param("exclude", str, "Regex of tensor names averaged instead of solved (e.g. task heads).", default="",
              per_layer=False),
    ),
    model_params=(STATISTICS_PARAM, Param("weight", float, "Relative weight c_i of this model (Grams scaled by M c_i).",
                                          default=1.0, low=0.0)),
    min_models=1,
    chunkable=False,
    aux_inputs=(STATISTICS,),
    notes="alpha defaults to 0.1 (reference emotion/NER configs and FusionBench's generic config). Grams come from "
          "`mergelab calibrate --stats gram`, which by default drops padding tokens (the reference keeps them: "
          "--include-padding). Non-linear tensors are found by their 0-d entry in the statistics file.",
))
