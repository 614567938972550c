"""Fusion of several models' next-token distributions and the fusion loss (FuseLLM, arXiv:2401.10491, 3.3-3.4).

Each candidate ``k`` (a source model, or the target's own starting distribution) has, per training
sequence, a cross-entropy ``CE_k`` of its predictions against the gold tokens and a distribution ``P_k``
per step (already carried onto the target's vocabulary by :mod:`mergelab.fuse.align`).

* **MinCE**: per sequence, the ``P_k`` of the candidate with the lowest ``CE_k`` (the reference's
  ``distill_greater_as_gt``: the largest reward ``exp(-CE)``).
* **AvgCE**: ``sum_k w_k P_k`` with ``w = softmax(exp(-CE))`` over the candidates, the softmax taken over
  the rewards ``exp(-CE_k)`` and not over ``-CE_k`` (the reference's ``distill_weighted_as_gt``).

The target is trained on ``L = lambda * L_CLM + (1 - lambda) * L_fuse`` (the paper's equation 4 and the
reference's ``lm_loss_weight``; the paper uses ``lambda = 0.9``; ``lambda = 1`` is plain causal-LM
training), with ``L_fuse`` the cross-entropy ``-sum_v P(v) log Q(v)`` of the student ``Q`` to the fused
distribution (``loss: ce``, the paper's), or ``KL(P || Q)`` (``loss: kl``), averaged over the sequence
positions that carry a fused distribution.
"""

from __future__ import annotations

import math
from typing import List, Sequence

FUSIONS = ("min_ce", "avg_ce")
LOSSES = ("ce", "kl")


def min_ce_index(ces: Sequence[float]) -> int:
    """The candidate MinCE takes: the lowest cross-entropy (the first on a tie)."""
    return min(range(len(ces)), key=lambda k: (ces[k], k))


def avg_ce_weights(ces: Sequence[float]) -> List[float]:
    """AvgCE's weights: ``softmax(exp(-CE_k))`` over the candidates."""
    r = [math.exp(-c) for c in ces]
    m = max(r)
    e = [math.exp(x - m) for x in r]
    s = sum(e)
    return [x / s for x in e]


def fusion_weights(fusion: str, ces: Sequence[float]) -> List[float]:
    """Per-candidate weights of one sequence: one-hot on MinCE's choice, or AvgCE's softmax."""
    if fusion == "min_ce":
        k = min_ce_index(ces)
        return [1.0 if i == k else 0.0 for i in range(len(ces))]
    if fusion == "avg_ce":
        return avg_ce_weights(ces)
    raise ValueError(f"fusion {fusion!r}: expected one of {', '.join(FUSIONS)}")


def fusion_loss(log_q, target, loss: str = "ce"):
    """Mean over rows of ``-sum P log Q`` (``ce``) or ``sum P (log P - log Q)`` (``kl``); ``log_q`` and
    ``target`` are ``[N, V]`` (``target`` rows are distributions)."""
    import torch

    if loss == "ce":
        per = -(target * log_q).sum(-1)
    elif loss == "kl":
        log_p = torch.where(target > 0, target.clamp_min(1e-30).log(), torch.zeros_like(target))
        per = (target * (log_p - log_q)).sum(-1)
    else:
        raise ValueError(f"loss {loss!r}: expected one of {', '.join(LOSSES)}")
    return per.mean() if per.numel() else log_q.sum() * 0.0
