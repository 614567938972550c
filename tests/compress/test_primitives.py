"""Low-rank, quantisation and BitDelta primitives against oracles worked out here (numpy / by hand)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mergelab.compress import bitdelta
from mergelab.compress.lowrank import check_rank_choice, energy_rank, relative_error, truncated_svd
from mergelab.compress.quant import dequantize_rows, pack_bits, quantize_rows, unpack_bits
from mergelab.errors import MergeLabError


def test_energy_rank_matches_cumulative_oracle():
    s = torch.tensor([4.0, 2.0, 1.0, 1.0, 0.0])
    # energies 16, 4, 1, 1 of 22: cumulative 16/22=.727, 20/22=.909, 21/22=.955, 1
    assert energy_rank(s, 0.5) == 1
    assert energy_rank(s, 0.727) == 1
    assert energy_rank(s, 0.73) == 2
    assert energy_rank(s, 0.9) == 2
    assert energy_rank(s, 0.95) == 3
    assert energy_rank(s, 1.0) == 4  # the numerical rank: the zero singular value is never kept
    assert energy_rank(torch.zeros(3), 0.9) == 0


def test_energy_one_gives_numerical_rank_of_low_rank_matrix():
    g = torch.Generator().manual_seed(0)
    m = torch.randn(20, 3, generator=g) @ torch.randn(3, 15, generator=g)
    assert truncated_svd(m, energy=1.0).rank == np.linalg.matrix_rank(m.numpy())


def test_truncation_error_is_eckart_young():
    g = torch.Generator().manual_seed(1)
    m = torch.randn(12, 9, generator=g)
    s = np.linalg.svd(m.double().numpy(), compute_uv=False)
    for k in (1, 4, 9, 20):
        f = truncated_svd(m, rank=k)
        assert f.rank == min(k, 9)
        expected = np.sqrt((s[f.rank:] ** 2).sum() / (s ** 2).sum())
        assert relative_error(m, f.dense()) == pytest.approx(expected, abs=1e-5)


@pytest.mark.parametrize("rank,energy", [(None, None), (2, 0.5), (0, None), (-1, None), (1.5, None),
                                         (None, 0.0), (None, 1.01), (None, -0.2)])
def test_rank_choice_errors(rank, energy):
    with pytest.raises(MergeLabError, match="--rank|--energy"):
        check_rank_choice(rank, energy)


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_pack_roundtrip_and_bit_order(bits):
    g = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, 1 << bits, (37,), generator=g, dtype=torch.int64).to(torch.uint8)
    packed = pack_bits(codes, bits)
    assert packed.numel() == -(-37 * bits // 8)
    assert torch.equal(unpack_bits(packed, bits, 37), codes)
    # LSB first: element j sits at bits (j*b) % 8 of byte (j*b) // 8
    j = 5
    byte = int(packed[(j * bits) // 8])
    assert (byte >> ((j * bits) % 8)) & ((1 << bits) - 1) == int(codes[j])


def test_quantize_grid_by_hand():
    # 2 bits: maxq 3, zero 2, scale 2*max|x|/3; row [1.5, -1.5, 0.5, -0.2]: scale 1.0
    x = torch.tensor([[1.5, -1.5, 0.5, -0.2], [0.0, 0.0, 0.0, 0.0]])
    q, scale = quantize_rows(x, 2)
    assert scale[0].item() == 1.0
    # round(x / 1) + 2 clamped to [0, 3]: 1.5 -> round(1.5)=2 -> 4 -> 3; -1.5 -> -2 -> 0; 0.5 -> 0 -> 2; -0.2 -> 2
    assert q[0].tolist() == [3, 0, 2, 2]
    assert dequantize_rows(q, scale, 2)[0].tolist() == [1.0, -2.0, 0.0, 0.0]
    assert dequantize_rows(q, scale, 2)[1].tolist() == [0.0] * 4  # an all-zero row decodes to zeros


def test_quantize_error_shrinks_with_bits():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(8, 64, generator=g)
    errs = [float((dequantize_rows(*quantize_rows(x, b), b) - x).norm()) for b in (2, 4, 8)]
    assert errs[0] > errs[1] > errs[2]


def test_bitdelta_scale_and_error_identity():
    d = torch.tensor([[0.5, -0.25, 0.0], [1.0, -2.0, 0.75]])
    bits, alpha = bitdelta.encode(d)
    assert alpha == pytest.approx(4.5 / 6)
    rec = bitdelta.decode(bits, alpha, (2, 3))
    assert rec[0, 2].item() == pytest.approx(alpha)  # sign(0) -> +1
    assert torch.equal(torch.sign(rec), torch.where(d >= 0, 1.0, -1.0))
    err2 = float(((d - rec) ** 2).sum())
    assert err2 == pytest.approx(float((d ** 2).sum()) - d.numel() * alpha ** 2, rel=1e-6)
