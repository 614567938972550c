"""Each task-vector transform on its own, on small tensors worked out by hand."""

import math

import pytest
import torch

from mergelab.methods.transforms import (TaskVectors, agreement, chain, disjoint_merge, drop, elect_sign,
                                         linear_combine, trim, weigh)


def tv(rows, weights=None):
    d = torch.tensor(rows, dtype=torch.float32)
    w = torch.ones(d.shape[0]) if weights is None else torch.tensor(weights, dtype=torch.float32)
    return TaskVectors(d, w)


def test_trim_keeps_entries_at_or_above_each_models_threshold():
    out = trim([2.0, 0.5])(tv([[1.0, -2.0, 3.0], [0.4, -0.5, 0.6]]))
    assert torch.equal(out.deltas, torch.tensor([[0.0, -2.0, 3.0], [0.0, -0.5, 0.6]]))


def test_trim_zero_keeps_all_and_inf_keeps_none():
    x = tv([[1.0, -2.0], [3.0, 4.0]])
    assert torch.equal(trim([0.0, 0.0])(x).deltas, x.deltas)
    assert trim([math.inf, math.inf])(x).deltas.abs().sum() == 0


def test_weigh_multiplies_each_row():
    out = weigh()(tv([[1.0, 2.0], [3.0, 4.0]], [2.0, -1.0]))
    assert out.deltas.tolist() == [[2.0, 4.0], [-3.0, -4.0]]


def test_elect_sign_by_mass_and_tie_rule():
    x = tv([[1.0, -3.0, 2.0, 0.0], [-2.0, 1.0, -2.0, 0.0]])
    assert elect_sign(1.0)(x).sign.tolist() == [-1.0, -1.0, 1.0, 1.0]
    assert elect_sign(-1.0)(x).sign.tolist() == [-1.0, -1.0, -1.0, -1.0]
    assert elect_sign(0.0)(x).sign.tolist() == [-1.0, -1.0, 0.0, 0.0]


def test_disjoint_mean_by_count_and_by_weight():
    # column 0: +1, +3, -1 -> sign + ; agreeing 1 and 3 -> count mean 2 ; weighted (w=1,2,1): (1*1+3*2)/(1+2)
    x = weigh()(tv([[1.0, 0.0], [3.0, -2.0], [-1.0, 0.0]], [1.0, 2.0, 1.0]))
    x = elect_sign(1.0)(x)
    by_count = disjoint_merge(x, normalize=True, divisor="count")
    by_weight = disjoint_merge(x, normalize=True, divisor="weight")
    summed = disjoint_merge(x, normalize=False)
    assert by_count.tolist() == pytest.approx([(1 + 6) / 2, -4.0])
    assert by_weight.tolist() == pytest.approx([(1 + 6) / 3, -4.0 / 2])
    assert summed.tolist() == pytest.approx([7.0, -4.0])


def test_zeros_never_agree():
    x = elect_sign(1.0)(tv([[0.0, 1.0], [0.0, 2.0]]))
    assert agreement(x).tolist() == [[0.0, 1.0], [0.0, 1.0]]
    # an all-zero column divides by 1, not 0
    assert disjoint_merge(x, divisor="count").tolist() == [0.0, 1.5]


def test_drop_inverse_rescale_and_l1():
    x = tv([[2.0, 4.0, -6.0, 8.0]])
    masks = torch.tensor([[1.0, 0.0, 1.0, 0.0]])
    assert drop(masks, None)(x).deltas.tolist() == [[2.0, 0.0, -6.0, 0.0]]
    assert drop(masks, "inverse", keep_prob=[0.5])(x).deltas.tolist() == [[4.0, 0.0, -12.0, 0.0]]
    l1 = 20.0 / 8.0
    out = drop(masks, "l1", l1_scale=[l1])(x).deltas
    assert out.abs().sum().item() == pytest.approx(20.0)


def test_linear_combine_normalizes_by_weight_sum():
    x = weigh()(tv([[1.0, 2.0], [3.0, 6.0]], [1.0, 3.0]))
    assert linear_combine(x, normalize=False).tolist() == [10.0, 20.0]
    assert linear_combine(x, normalize=True).tolist() == [2.5, 5.0]


def test_chain_composes_left_to_right():
    x = tv([[1.0, -5.0], [2.0, 1.0]])
    out = chain(trim([1.5, 1.5]), elect_sign())(x)
    assert out.deltas.tolist() == [[0.0, -5.0], [2.0, 0.0]]
    assert out.sign.tolist() == [1.0, -1.0]
