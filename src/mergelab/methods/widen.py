"""WIDEN: merge by weight disentanglement into magnitude and direction (fine-tuned or pre-trained).

Yu et al., "Extend Model Merging from Fine-Tuned to Pre-Trained Large Language Models via Weight
Disentanglement", 2024 (arXiv:2408.03092; reference code yule-BUAA/MergeLLM @9178ef9,
``model_merging_methods/merging_methods.py::widen_merging``). Built for merging a continually
pre-trained model (large parameter shifts) with a fine-tuned one, where hand-set weights fail.

Per tensor, with ``theta_0`` the base and ``delta_t = theta_t - theta_0``:

* **Matrices** ``W`` (out x in; token embeddings are transposed first so that a column is a token):
  magnitude ``m_j = ||W[:, j]||``, direction ``W[:, j] / m_j``. For each model
  ``dm_t = |m(W_t) - m(W_0)|`` and ``dd_t = 1 - cos(W_t[:, j], W_0[:, j])``. Each is ranked within the
  model (stable ascending argsort, rank / in in ``[0, 1)``). Scores ``S = softmax over models of
  rank / temperature``; where ``rank_t[j] > ratio * mean_j(rank_t)`` the score is replaced by
  ``calibration``. ``omega_t = (S^m_t + S^d_t) / 2``; ``W = W_0 + sum_t omega_t[col] delta_t``.
* **Vectors** (norms, biases; 0-d tensors too): significance ``|delta_t|`` elementwise, no ranking;
  same softmax / above-average / calibration rule; ``theta = theta_0 + sum_t S_t delta_t``.

The reference has no temperature (it is 1); ``temperature`` is an extension for the paper's
formulation and defaults to the reference. Ranks, their mean and the scores of matrices are computed
in float64 with the exact mean rank ``(in - 1) / (2 in)``: the reference's float32 mean makes the
middle column's "above average" test depend on rounding (calibrated for ``in = 4097``, not for 9).
Column statistics are accumulated over row chunks in float64, so the method streams
(``chunkable``): the per-tensor statistics and the column weights come from :func:`_prepare_tensor`,
and the merge of a row chunk is elementwise.

Edge cases (NaN in the reference): a column that is zero in both ``W_t`` and ``W_0`` has
``dd = 0``; a column that is zero in only one of them has ``dd = 1``. Tensors with more than two
dimensions (convolutions) are rejected, as in the reference, which asserts Linear/Embedding.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional

import torch

from mergelab.errors import RecipeError
from mergelab.methods.registry import BaseUse, MergeMethod, Param, TensorInputs, TensorSource, register

DEFAULT_TOKEN_EMBEDDINGS = r"(^|\.)(embed_tokens|wte|word_embeddings|tok_embeddings|embed_in)\.weight$"


def _kind(name: str, shape: tuple, params: dict) -> str:
    """'vector', 'matrix' (columns are the second dimension) or 'tokens' (transposed embedding)."""
    if len(shape) <= 1:
        return "vector"
    if len(shape) > 2:
        raise RecipeError(
            f"widen: tensor '{name}' has shape {tuple(shape)}; WIDEN merges 2-D (Linear/Embedding) and 1-D "
            "tensors only (the reference asserts this). Merge it with another method via a tensor filter."
        )
    if re.search(params["token_embeddings"], name):
        return "tokens"
    return "matrix"


def within_model_rank(diff: torch.Tensor) -> torch.Tensor:
    """Rank of each entry within its row ``[n, k]``: stable ascending argsort position / k (float64)."""
    n, k = diff.shape
    order = torch.argsort(diff, dim=1, descending=False, stable=True)
    ranks = torch.empty(n, k, dtype=torch.float64, device=diff.device)
    positions = (torch.arange(k, dtype=torch.float64, device=diff.device) / k).expand(n, k)
    ranks.scatter_(1, order, positions.contiguous())
    return ranks


def importance_scores(significance: torch.Tensor, mean: torch.Tensor, params: dict) -> torch.Tensor:
    """Softmax over models of ``significance / temperature``, calibrated where above ``ratio * mean``.

    ``significance`` is ``[n, ...]``; ``mean`` is each model's mean significance over the whole
    tensor, broadcastable against it.
    """
    scores = torch.softmax(significance / params["temperature"], dim=0)
    above = significance > mean * params["above_average_ratio"]
    return torch.where(above, torch.full_like(scores, params["calibration"]), scores)


@dataclass(frozen=True)
class WidenStats:
    """Per-tensor WIDEN statistics: column weights ``[n, cols]`` or per-model mean significance."""

    kind: str
    weights: Optional[torch.Tensor] = None
    mean_significance: Optional[torch.Tensor] = None


def _column_sums(c: TensorInputs, kind: str) -> tuple:
    """Per-model squared norms, base squared norms and dot products of the chunk's columns (tokens)."""
    axis = 0 if kind == "matrix" else 1  # reduce over rows for matrices, over hidden for token rows
    base = c.base.double()
    models = torch.stack([m.double() for m in c.models])
    return (models * models).sum(axis + 1), (base * base).sum(axis), (models * base).sum(axis + 1)


def column_weights(mm: torch.Tensor, bb: torch.Tensor, mb: torch.Tensor, params: dict) -> torch.Tensor:
    """WIDEN's per-column weights ``omega`` ``[n, cols]`` from squared norms and dot products."""
    mag_t, mag_0 = mm.sqrt(), bb.sqrt()
    dm = (mag_t - mag_0).abs()
    denom = mag_t * mag_0
    both_zero = (mag_t == 0) & (mag_0 == 0)
    cos = torch.where(denom > 0, mb / torch.where(denom > 0, denom, torch.ones_like(denom)), torch.zeros_like(mb))
    dd = torch.where(both_zero, torch.zeros_like(cos), 1.0 - cos)
    cols = dm.shape[1]
    mean_rank = torch.tensor((cols - 1) / (2 * cols), dtype=torch.float64, device=dm.device)  # exact
    s_m = importance_scores(within_model_rank(dm), mean_rank, params)
    s_d = importance_scores(within_model_rank(dd), mean_rank, params)
    return 0.5 * (s_m + s_d)


def _prepare_tensor(src: TensorSource) -> WidenStats:
    kind = _kind(src.name, src.shape, src.params)
    n = src.num_models
    if kind == "vector":
        total = torch.zeros(n, dtype=torch.float64)
        for c in src.chunks():
            d = torch.stack([m - c.base for m in c.models]).reshape(n, -1)
            total += d.abs().double().sum(1).cpu()
        numel = max(src.numel, 1)
        return WidenStats(kind, mean_significance=(total / numel).float())
    if kind == "matrix":
        acc = None
        for c in src.chunks():
            part = _column_sums(c, kind)
            acc = part if acc is None else tuple(a + p for a, p in zip(acc, part))
        return WidenStats(kind, weights=column_weights(*acc, src.params).float())
    rows = src.shape[0]
    mm = bb = mb = None
    for c in src.chunks():
        a, b, ab = _column_sums(c, kind)
        if mm is None:
            mm = torch.zeros(n, rows, dtype=torch.float64, device=a.device)
            bb = torch.zeros(rows, dtype=torch.float64, device=a.device)
            mb = torch.zeros(n, rows, dtype=torch.float64, device=a.device)
        lo, hi = c.rows if c.rows != (0, 0) else (0, rows)
        mm[:, lo:hi], bb[lo:hi], mb[:, lo:hi] = a, b, ab
    return WidenStats(kind, weights=column_weights(mm, bb, mb, src.params).float())


def widen_merge(x: TensorInputs) -> torch.Tensor:
    stats: WidenStats = x.tensor_stats
    d = torch.stack([m - x.base for m in x.models])
    n = d.shape[0]
    if stats.kind == "vector":
        mean = stats.mean_significance.to(d.device).reshape((n,) + (1,) * (d.dim() - 1))
        scores = importance_scores(d.abs(), mean, x.params)
        return x.base + (scores * d).sum(0)
    w = stats.weights.to(d.device)
    if stats.kind == "matrix":
        return x.base + (w[:, None, :] * d).sum(0)
    lo, hi = x.rows if x.rows != (0, 0) else (0, x.shape[0])
    return x.base + (w[:, lo:hi, None] * d).sum(0)


def _validate(params: dict, model_params: list) -> None:
    try:
        re.compile(params["token_embeddings"])
    except re.error as e:
        raise RecipeError(f"widen: parameter 'token_embeddings' = {params['token_embeddings']!r} is not a valid "
                          f"regular expression ({e})") from None


register(MergeMethod(
    name="widen",
    family="widen",
    summary="Weigh each column of each model by how much its magnitude and direction moved (ranked, softmaxed).",
    reference="Yu et al. 2024, WIDEN (arXiv:2408.03092); yule-BUAA/MergeLLM merging_methods.py::widen_merging.",
    merge=widen_merge,
    base=BaseUse.REQUIRED,
    params=(
        Param("above_average_ratio", float, "A score is calibrated where its significance exceeds this ratio "
              "times the model's mean significance (reference above_average_value_ratio).", default=1.0, low=0.0),
        Param("calibration", float, "Score given to above-average entries (reference score_calibration_value).",
              default=1.0),
        Param("temperature", float, "Softmax temperature over models (extension; the reference has none, i.e. 1).",
              default=1.0, low=0.0, low_open=True),
        Param("token_embeddings", str, "Regular expression naming token-embedding tensors, transposed so a column "
              "is a token (reference: model.embed_tokens.weight only).", default=DEFAULT_TOKEN_EMBEDDINGS),
    ),
    min_models=1,
    chunkable=True,
    prepare_tensor=_prepare_tensor,
    validate=_validate,
    notes="Not in mergekit, FusionBench or PEFT. The reference matches parameter names of Llama/Qwen models "
          "(model.layers.N.*, lm_head.weight, model.embed_tokens.weight); here 2-D tensors are matrices, "
          "1-D/0-D tensors vectors, and token embeddings are found by name. Column statistics are float64.",
))
