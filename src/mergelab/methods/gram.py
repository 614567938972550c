"""Gram statistics of a tensor's input vectors, streamed over its row chunks.

Methods that need the geometry of their inputs over a *whole* tensor (SLERP's angle, Model Stock's
mean cosine, Multi-SLERP's and Karcher's norms and angles) cannot compute it from one row chunk. When
the engine splits a tensor, their ``prepare_tensor`` streams the chunks once through :func:`gram` and
gets, in float64, each vector's sum of squares and the dot products of the requested pairs; norms and
cosines follow from these (:func:`cosine`), and an N x N matrix from :func:`gram_matrix`.

"Vectors" are whatever the method derives from a chunk (raw weights, task vectors ``theta_i -
theta_0``): a callable maps a chunk's :class:`~mergelab.methods.registry.TensorInputs` to a list of
same-shaped tensors. The sums run over the whole tensor, or per column (``per_column``: a sum over
dimension 0, i.e. over the rows the chunks split, for vectors that lie along dimension 0).

These are statistics of the merged weights themselves, not the activation Gram matrices ``X^T X`` of
RegMean (:mod:`mergelab.calibrate`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple

import torch

from mergelab.methods.registry import TensorInputs, TensorSource

Pair = Tuple[int, int]


@dataclass(frozen=True)
class Gram:
    """Float64 sums over a streamed tensor: squared norms of its vectors and dot products of pairs."""

    sq: list  # per vector: sum of squares (a 0-d tensor, or one value per column)
    dot: dict  # (i, j) -> sum of products, same form


def all_pairs(n: int) -> List[Pair]:
    """``(i, j)`` for ``0 <= i < j < n``, in row-major order."""
    return [(i, j) for i in range(n) for j in range(i + 1, n)]


def gram(src: TensorSource, vectors: Callable[[TensorInputs], Sequence[torch.Tensor]],
         pairs: Sequence[Pair], per_column: bool = False) -> Gram:
    """One pass over ``src``'s chunks: ``sum(v_i * v_i)`` for every vector and ``sum(v_i * v_j)`` for
    ``pairs``, accumulated in float64 over the whole tensor (or per column with ``per_column``)."""
    sq: Optional[list] = None
    dot: dict = {}
    for c in src.chunks():
        vs = [v.to(torch.float64) for v in vectors(c)]
        if per_column:
            s = [(v * v).sum(dim=0) for v in vs]
            d = {p: (vs[p[0]] * vs[p[1]]).sum(dim=0) for p in pairs}
        else:
            s = [(v * v).sum() for v in vs]
            d = {p: (vs[p[0]] * vs[p[1]]).sum() for p in pairs}
        sq = s if sq is None else [x + y for x, y in zip(sq, s)]
        for p in pairs:
            dot[p] = d[p] if p not in dot else dot[p] + d[p]
    return Gram(sq or [], dot)


def gram_matrix(src: TensorSource, vectors: Callable[[TensorInputs], Sequence[torch.Tensor]]) -> torch.Tensor:
    """The float64 matrix ``G[i, j] = <v_i, v_j>`` of the ``src.num_models`` vectors, over the stream."""
    n = src.num_models
    g = gram(src, vectors, all_pairs(n))
    out = torch.zeros(n, n, dtype=torch.float64)
    for i in range(n):
        out[i, i] = g.sq[i].cpu()
    for (i, j), v in g.dot.items():
        out[i, j] = out[j, i] = v.cpu()
    return out


def cosine(g: Gram, pair: Pair, min_norm_product: float) -> float:
    """``<v_i, v_j> / max(||v_i|| ||v_j||, min_norm_product)`` clamped to ``[-1, 1]`` (whole-tensor sums)."""
    i, j = pair
    norm_product = float(g.sq[i]) ** 0.5 * float(g.sq[j]) ** 0.5
    return max(-1.0, min(1.0, float(g.dot[pair]) / max(norm_product, min_norm_product)))
