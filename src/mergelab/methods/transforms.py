"""Composable transforms on task vectors (the task-arithmetic family as one pipeline).

A :class:`TaskVectors` holds the stacked task vectors ``deltas`` (shape ``[n, *chunk]``, float32), the
per-model ``weights`` (shape ``[n]``), and, once elected, the ``sign`` to agree with. Each transform is
a function ``TaskVectors -> TaskVectors``; :func:`chain` composes them the way optax chains gradient
transformations, and :func:`combine` turns the result into one merged delta::

    ties      = chain(trim(cuts), weigh(w), elect_sign(), disjoint(divisor="weight"))
    dare_ties = chain(drop(masks, rescale="l1"), weigh(w), elect_sign(), disjoint(normalize=False))

Every transform is usable on its own and is tested on its own. Trim cuts and masks are computed
outside (see :mod:`mergelab.methods.select`; the election and the mean are
:mod:`mergelab.methods.consensus`) so that the same transform serves a per-tensor trim, a
whole-model trim and a chunked tensor alike.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Optional, Sequence

import torch

from mergelab.methods.consensus import agreement_mask, disjoint_mean, elected_sign
from mergelab.methods.select import as_cut, zero_outside

Transform = Callable[["TaskVectors"], "TaskVectors"]


@dataclass(frozen=True)
class TaskVectors:
    """Stacked task vectors and what the pipeline has decided about them so far."""

    deltas: torch.Tensor
    weights: torch.Tensor
    sign: Optional[torch.Tensor] = None

    @classmethod
    def from_models(
        cls, base: torch.Tensor, models: Sequence[torch.Tensor], weights: Optional[Sequence[float]] = None
    ) -> "TaskVectors":
        """Task vectors tau_i = theta_i - theta_0, with unit weights unless given."""
        # Subtract straight into the stacked buffer: no per-model temporaries, no stacking copy.
        deltas = torch.empty((len(models),) + tuple(base.shape), dtype=base.dtype, device=base.device)
        for i, m in enumerate(models):
            torch.sub(m, base, out=deltas[i])
        w = [1.0] * len(models) if weights is None else list(weights)
        return cls(deltas, torch.tensor(w, dtype=deltas.dtype, device=deltas.device))

    def expand(self, per_model: torch.Tensor) -> torch.Tensor:
        """Reshape a ``[n]`` tensor to broadcast against ``deltas``."""
        return per_model.reshape((-1,) + (1,) * (self.deltas.dim() - 1))


def chain(*transforms: Transform) -> Transform:
    """Compose transforms left to right."""

    def run(tv: TaskVectors) -> TaskVectors:
        for t in transforms:
            tv = t(tv)
        return tv

    return run


def trim(cuts: Sequence, offset: int = 0) -> Transform:
    """Keep the entries each model's :class:`~mergelab.methods.select.Cut` keeps (TIES "trim"): those
    with ``|tau_i| > t_i``, and those equal to ``t_i`` before the cut's flat index; a plain threshold
    keeps every entry ``>=`` it. ``offset`` is the flat index of the chunk's first entry.

    Cuts come from :mod:`mergelab.methods.select`, over a tensor or the whole model.
    """

    def run(tv: TaskVectors) -> TaskVectors:
        deltas = tv.deltas.clone()
        for i, c in enumerate(cuts):
            zero_outside(deltas[i], as_cut(c), offset)
        return replace(tv, deltas=deltas)

    return run


def drop(keep_masks: torch.Tensor, rescale: Optional[str], keep_prob: Optional[Sequence[float]] = None,
         l1_scale: Optional[Sequence[float]] = None) -> Transform:
    """Apply DARE-style keep masks ``[n, *chunk]`` (1 keeps, 0 drops) and rescale what is kept.

    ``rescale``: ``None`` (drop only), ``"inverse"`` (multiply by ``1/keep_prob[i]``, the DARE paper's
    unbiased rescale; a mask of per-element probabilities may be given as ``keep_prob`` tensors), or
    ``"l1"`` (mergekit: multiply by ``l1_scale[i] = ||tau_i||_1 / ||m_i * tau_i||_1``, computed over the
    whole tensor by the caller so that chunking does not change it).
    """

    def run(tv: TaskVectors) -> TaskVectors:
        kept = tv.deltas * keep_masks  # a fresh buffer: the rescales below work in place
        if rescale is None:
            return replace(tv, deltas=kept)
        if rescale == "inverse":
            if isinstance(keep_prob, torch.Tensor):
                return replace(tv, deltas=kept.div_(keep_prob))
            p = torch.tensor([float(x) for x in keep_prob], dtype=kept.dtype, device=kept.device)
            return replace(tv, deltas=kept.div_(tv.expand(p)))
        if rescale == "l1":
            s = torch.tensor([float(x) for x in l1_scale], dtype=kept.dtype, device=kept.device)
            return replace(tv, deltas=kept.mul_(tv.expand(s)))
        raise ValueError(f"unknown rescale {rescale!r}")

    return run


def weigh() -> Transform:
    """Multiply each task vector by its weight (mergekit applies weights before the sign election)."""

    def run(tv: TaskVectors) -> TaskVectors:
        return replace(tv, deltas=tv.deltas * tv.expand(tv.weights))

    return run


def elect_sign(tie_sign: float = 1.0) -> Transform:
    """Elect the sign of each coordinate by mass: ``sign(sum_i tau_i)`` (TIES "elect").

    Where the sum is exactly zero the sign is ``tie_sign``: ``+1`` in mergekit; the TIES reference
    uses the sign of the total elected mass over the whole model (see :mod:`mergelab.methods.consensus`).
    """

    def run(tv: TaskVectors) -> TaskVectors:
        return replace(tv, sign=elected_sign(tv.deltas.sum(dim=0), tie_sign))

    return run


def agreement(tv: TaskVectors) -> torch.Tensor:
    """1 where a task vector entry is non-zero and has the elected sign, else 0."""
    return agreement_mask(tv.deltas, tv.sign)


def disjoint_merge(tv: TaskVectors, normalize: bool = True, divisor: str = "weight") -> torch.Tensor:
    """Sum (or mean) of the entries that agree with the elected sign (TIES "disjoint merge"); see
    :func:`mergelab.methods.consensus.disjoint_mean` for the divisors."""
    return disjoint_mean(tv.deltas, tv.sign, tv.weights, normalize, divisor)


def linear_combine(tv: TaskVectors, normalize: bool = False) -> torch.Tensor:
    """Sum of the (already weighted) task vectors, divided by the summed weights if ``normalize``.

    A summed weight with ``|sum w| < 1e-8`` divides by 1 (mergekit).
    """
    merged = tv.deltas.sum(dim=0)
    if not normalize:
        return merged
    div = tv.weights.sum()
    if div.abs() < 1e-8:
        return merged
    return merged / div
