"""mergekit's L1 rescale of sparsified task vectors: the one home of the rescale factor.

mergekit 0.1.5 (``sparsify.rescaled_masked_tensor`` with ``RescaleNorm.l1``, PR #245) multiplies each
masked task vector by ``||tau_i||_1 / ||m_i * tau_i||_1`` over the *whole tensor*, and skips the
rescale (factor 1) where either norm is below 1e-7. Used by ``ties`` (``rescale: true``), ``dare_*``,
``breadcrumbs*`` and ``della*`` under ``semantics: mergekit``; the papers' own rescales (DARE's
``1/density``, DELLA's ``1/p_ij``) are elementwise and live with the drop
(:func:`mergelab.methods.transforms.drop`).

The sums: a tensor in one chunk is summed in float32 as mergekit sums it; a chunked tensor adds the
float32 sums of its chunks in float64 (the chunks' boundaries change the rounding of a float32 sum;
float64 keeps the result independent of them to the last bit of float32 in practice). The fused
kernels sum in float64 (:func:`mergelab.methods.fused.masked_l1_sums`). Every factor is then applied
as a float32 number.
"""

from __future__ import annotations

from typing import Callable

import torch

from mergelab.methods.inputs import deltas_of
from mergelab.methods.registry import TensorInputs, TensorSource

EPS = 1e-7


def l1_factor(before: float, after: float) -> float:
    """``before / after`` (the L1 norms of a task vector before and after its mask), or 1 where either
    is below 1e-7, as in mergekit."""
    return 1.0 if before < EPS or after < EPS else float(before / after)


def l1_rescale_factors(src: TensorSource, masked: Callable[[TensorInputs], torch.Tensor]) -> list:
    """The L1 rescale factor per model over the whole tensor, summed chunk by chunk (float32 sums of
    each chunk, added in float64). ``masked(chunk)`` returns the masked task vectors ``[n, *chunk]``."""
    before = torch.zeros(src.num_models, dtype=torch.float64)
    after = torch.zeros(src.num_models, dtype=torch.float64)
    for c in src.chunks():
        d = deltas_of(c)
        before += d.abs().reshape(d.shape[0], -1).sum(1).double().cpu()
        after += masked(c).abs().reshape(d.shape[0], -1).sum(1).double().cpu()
    return [l1_factor(b, a) for b, a in zip(before.tolist(), after.tolist())]


def exact_l1_factors(src: TensorSource, masked: Callable[[TensorInputs], torch.Tensor]) -> list:
    """The L1 rescale factors of :func:`l1_rescale_factors`, but for a tensor in one chunk each model's
    norms are summed over its whole task vector and divided in float32, as mergekit computes them, so
    the factors agree with mergekit's bit for bit."""
    if src.num_chunks != 1:
        return l1_rescale_factors(src, masked)
    (c,) = list(src.chunks())
    d = deltas_of(c)
    m = masked(c)
    out = []
    for i in range(d.shape[0]):
        before = d[i].abs().sum()
        after = m[i].abs().sum()
        out.append(1.0 if bool(before < EPS) or bool(after < EPS) else float(before / after))
    return out
