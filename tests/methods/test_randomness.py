"""The random words of merge methods: SplitMix64 outputs (Steele, Lea & Flood 2014), split into
32-bit words, drawable from any offset."""

import numpy as np
import pytest

from mergelab.methods.randomness import stream_seed, stream_words

M64 = (1 << 64) - 1


def splitmix64(seed, count):
    """The published algorithm (Vigna's splitmix64.c), in Python integers."""
    out = []
    x = seed
    for _ in range(count):
        x = (x + 0x9E3779B97F4A7C15) & M64
        z = x
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
        out.append(z ^ (z >> 31))
    return out


def test_known_outputs():
    # Published test values: seed 0 gives 0xE220A8397B1DCDAF first; seed 1234567 gives this sequence.
    assert splitmix64(0, 1) == [0xE220A8397B1DCDAF]
    want = [6457827717110365317, 3203168211198807973, 9817491932198370423, 4593380528125082431,
            16408922859458223821]
    assert splitmix64(1234567, 5) == want
    assert stream_words(1234567, 0, 10).view(np.uint64).tolist() == want


@pytest.mark.parametrize("key", [0, 1, 2**40 + 17, 2**63 - 1])
def test_words_are_the_halves_of_the_outputs_low_first(key):
    outputs = splitmix64(key, 9)
    words = [w for z in outputs for w in (z & 0xFFFFFFFF, z >> 32)]
    assert stream_words(key, 0, 17).tolist() == words[:17]


@pytest.mark.parametrize("start,n", [(0, 1), (1, 1), (1, 2), (3, 70_001), (70_000, 5), (2**33 + 1, 4)])
def test_any_range_is_the_slice_of_the_stream(start, n, monkeypatch):
    from mergelab.methods import randomness

    monkeypatch.setattr(randomness, "_BLOCK", 1000)  # several numpy blocks
    whole = splitmix64(99, (start + n + 1) // 2 + 1) if start < 10**6 else None
    got = stream_words(99, start, n)
    assert got.dtype == np.uint32 and got.shape == (n,)
    if whole is not None:
        words = [w for z in whole for w in (z & 0xFFFFFFFF, z >> 32)]
        assert got.tolist() == words[start:start + n]
    else:  # far offsets: against the formula for output k directly
        k0 = start // 2
        z = splitmix64((99 + k0 * 0x9E3779B97F4A7C15) & M64, 3)
        words = [w for v in z for w in (v & 0xFFFFFFFF, v >> 32)]
        assert got.tolist() == words[start - 2 * k0:start - 2 * k0 + n]


def test_words_look_uniform():
    w = stream_words(stream_seed(0, "w", 0, 0, "dare"), 0, 1 << 20)
    n = w.size
    bits = np.unpackbits(w.view(np.uint8)).reshape(n, 32).mean(0)
    assert np.all(np.abs(bits - 0.5) < 5 * 0.5 / np.sqrt(n))  # every bit fair within 5 sigma
    for p in (0.1, 0.5, 0.9):
        share = np.mean(w < np.uint32(p * 2**32))
        assert abs(share - p) < 5 * np.sqrt(p * (1 - p) / n)
    # neighbouring words (the two halves of one output, and consecutive outputs) are uncorrelated
    u = w.astype(np.float64) / 2**32 - 0.5
    for lag in (1, 2):
        assert abs(np.mean(u[:-lag] * u[lag:])) < 5 / 12 / np.sqrt(n)


def test_stream_seed_names_the_stream():
    keys = {stream_seed(0, "w", 0, 0, "dare"), stream_seed(1, "w", 0, 0, "dare"), stream_seed(0, "v", 0, 0, "dare"),
            stream_seed(0, "w", 1, 0, "dare"), stream_seed(0, "w", 0, 1, "dare"), stream_seed(0, "w", 0, 0, "della")}
    assert len(keys) == 6 and all(0 <= k < 2**63 for k in keys)
    assert stream_seed(0, "w", 0, 0, "dare") == stream_seed(0, "w", 0, 0, "dare")
