"""The random numbers of merge methods: one stream per (seed, tensor, chunk, model, purpose).

Randomness is keyed by what it is for, never by the order tensors are processed in, so results do
not depend on order, threads or device. A stream's 64-bit key is a hash of its names
(:func:`stream_seed`); its numbers are SplitMix64's (Steele, Lea & Flood, "Fast Splittable
Pseudorandom Number Generators", OOPSLA 2014; the generator behind Java's ``SplittableRandom``):
output ``k`` of the stream keyed ``key`` is ``mix64(key + (k + 1) * GAMMA)`` modulo ``2**64``, where
``mix64`` is David Stafford's "variant 13" of MurmurHash3's 64-bit finaliser (the constants below).

Word ``j`` (a uint32, one per tensor entry) is the low half of output ``j // 2`` for even ``j`` and
the high half for odd ``j``: the order in which a little-endian machine reads the 64-bit outputs
as 32-bit words. Because output ``k`` is a function of ``k`` alone, any range of a stream can be
drawn on its own: the fused CPU kernels (:mod:`mergelab.methods._fused_kernels`) draw each block's
words inside the loop that uses them, on any thread, and :func:`stream_words` draws the same words
with numpy for the tensor code.
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np

GAMMA = np.uint64(0x9E3779B97F4A7C15)  # 2**64 / golden ratio, odd
MIX1 = np.uint64(0xBF58476D1CE4E5B9)
MIX2 = np.uint64(0x94D049BB133111EB)
SHIFT1, SHIFT2, SHIFT3 = np.uint64(30), np.uint64(27), np.uint64(31)

_BLOCK = 1 << 15  # 64-bit outputs per numpy block: its temporaries stay in the L2 cache


def stream_seed(*parts: Any) -> int:
    """A 63-bit key derived from ``parts`` (seed, tensor name, chunk, model, purpose)."""
    digest = hashlib.blake2b("\x1f".join(str(p) for p in parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def stream_words(key: int, start: int, n: int) -> np.ndarray:
    """Words ``start .. start + n - 1`` (uint32) of the stream keyed ``key``."""
    first, stop = start // 2, (start + n + 1) // 2
    out = np.empty(stop - first, np.uint64)
    tmp = np.empty(min(_BLOCK, stop - first), np.uint64)
    key64 = np.uint64(key)
    for a in range(first, stop, _BLOCK):
        b = min(stop, a + _BLOCK)
        z, t = out[a - first:b - first], tmp[:b - a]
        np.multiply(np.arange(a + 1, b + 1, dtype=np.uint64), GAMMA, out=z)
        z += key64
        np.right_shift(z, SHIFT1, out=t)
        z ^= t
        z *= MIX1
        np.right_shift(z, SHIFT2, out=t)
        z ^= t
        z *= MIX2
        np.right_shift(z, SHIFT3, out=t)
        z ^= t
    skip = start - 2 * first
    return out.view(np.uint32)[skip:skip + n]
