"""Per-row round-to-nearest quantisation of singular vectors and bit packing of the codes.

The quantiser is the per-channel "symmetric" grid of GPTQ's ``Quantizer`` (``sym=True``, ``mse=False``),
as GraftLLM's Adaptive-Compression uses it (read for facts only): for ``b`` bits ``maxq = 2^b - 1``, one
scale per row ``scale = 2 * max|x| / maxq``, the zero point in the middle of the grid
``zero = (maxq + 1) / 2``, codes ``q = clamp(round(x / scale) + zero, 0, maxq)`` and values
``scale * (q - zero)``. GraftLLM runs GPTQ (error feedback from calibration activations) on that grid;
mergelab's seed rounds to nearest without calibration data (documented in docs/methods.md).

Codes are packed LSB first: element ``j`` of a row-major flat array of ``b``-bit codes occupies bits
``(j * b) % 8 ...`` of byte ``(j * b) // 8`` (``b`` in 1, 2, 4, 8 divides 8, so no code straddles bytes).
"""

from __future__ import annotations

from typing import Tuple

import torch

from mergelab.errors import MergeLabError

PACKED_BITS = (1, 2, 4, 8)
FLOAT_BITS = 16  # a band kept as float16, not quantised


def check_bits(bits: int) -> None:
    if bits not in PACKED_BITS + (FLOAT_BITS,):
        raise MergeLabError(f"unsupported bit width {bits}: expected one of 2, 4, 8 (quantised) or 16 (float16)")


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack non-negative integer ``codes`` (< 2**bits) into a flat uint8 tensor, LSB first."""
    if bits not in PACKED_BITS:
        raise MergeLabError(f"pack_bits: bits must be one of {PACKED_BITS}, got {bits}")
    flat = codes.reshape(-1).to(torch.uint8)
    per = 8 // bits
    pad = (-flat.numel()) % per
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    groups = flat.view(-1, per).to(torch.int32)
    shifts = torch.arange(per, dtype=torch.int32, device=flat.device) * bits
    return (groups << shifts).sum(1).to(torch.uint8)


def unpack_bits(packed: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: the first ``numel`` codes as uint8."""
    per = 8 // bits
    shifts = torch.arange(per, dtype=torch.int32, device=packed.device) * bits
    mask = (1 << bits) - 1
    codes = (packed.to(torch.int32).unsqueeze(1) >> shifts) & mask
    return codes.reshape(-1)[:numel].to(torch.uint8)


def quantize_rows(x: torch.Tensor, bits: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Codes (uint8, same shape as ``x``) and one float16 scale per row of the 2-D ``x`` (see module doc).

    The scale is rounded to float16 before the codes are computed, so that dequantising with the
    stored scale is exactly what was encoded."""
    maxq = (1 << bits) - 1
    zero = (maxq + 1) // 2
    xmax = x.abs().amax(dim=1).to(torch.float32)
    scale = (2.0 * xmax / maxq).to(torch.float16)
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)  # an all-zero row: any scale decodes to 0
    s = scale.to(torch.float32).unsqueeze(1)
    q = torch.clamp(torch.round(x.to(torch.float32) / s) + zero, 0, maxq).to(torch.uint8)
    return q, scale


def dequantize_rows(codes: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """float32 values ``scale * (q - zero)`` of :func:`quantize_rows`' output."""
    zero = (1 << bits) // 2
    return scale.to(torch.float32).unsqueeze(1) * (codes.to(torch.float32) - zero)
