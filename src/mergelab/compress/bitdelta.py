"""BitDelta (Liu et al., arXiv 2402.10193): a task-vector matrix stored as its signs and one scale.

``delta ~= alpha * sign(delta)`` with ``sign(0) = +1`` (the reference code stores the bit ``delta >= 0``)
and ``alpha = mean |delta|``, the scale that minimises ``||delta - alpha * sign(delta)||_F`` (squared
error ``||delta||^2 - N * alpha^2`` for N entries). The optional scale distillation of the paper (a few
hundred calibration steps on logits) is not implemented: ``alpha`` is the closed-form initial value.
Bits are packed with :func:`mergelab.compress.quant.pack_bits` (1 bit, LSB first, row-major); storage is
``ceil(N / 8)`` bytes plus a 4-byte float32 scale.
"""

from __future__ import annotations

from typing import Tuple

import torch

from mergelab.compress.quant import pack_bits, unpack_bits


def encode(delta: torch.Tensor) -> Tuple[torch.Tensor, float]:
    """Packed sign bits (uint8) and the float32 scale ``mean |delta|`` (computed in float64)."""
    alpha = float(delta.to(torch.float64).abs().mean()) if delta.numel() else 0.0
    return pack_bits((delta >= 0).to(torch.uint8), 1), float(torch.tensor(alpha, dtype=torch.float32))


def decode(bits: torch.Tensor, alpha: float, shape: tuple) -> torch.Tensor:
    """float32 ``alpha * (2b - 1)`` of shape ``shape``."""
    n = 1
    for s in shape:
        n *= s
    b = unpack_bits(bits, 1, n).to(torch.float32)
    return (alpha * (2.0 * b - 1.0)).reshape(shape)
