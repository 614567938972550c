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


# --------------------------------------------------------------------------- fused fast paths
# The methods compute the pipeline in place with cheaper operations; they must give the same bits.

def _awkward_deltas(seed: int, n: int = 4, size: int = 4000) -> torch.Tensor:
    """Task vectors with exact zeros, exact ties in magnitude and coordinates whose sum is exactly 0."""
    g = torch.Generator().manual_seed(seed)
    d = torch.randint(-3, 4, (n, size), generator=g).float() * 0.25
    d[:, : size // 2] += torch.randn(n, size // 2, generator=g)
    d[1, -100:] = -d[0, -100:]  # pairs that cancel
    d[2:, -100:] = 0.0
    return d


@pytest.mark.parametrize("tie_sign", [1.0, -1.0, 0.0])
@pytest.mark.parametrize("normalize,divisor", [(True, "weight"), (True, "count"), (False, "weight")])
def test_consensus_merge_is_the_pipeline_bit_for_bit(tie_sign, normalize, divisor):
    from mergelab.methods.ties import consensus_merge

    for seed in range(3):
        d = _awkward_deltas(seed)
        w = torch.tensor([0.5, 1.5, -0.25, 1.0])
        expected = disjoint_merge(elect_sign(tie_sign)(weigh()(TaskVectors(d, w))), normalize, divisor)
        got = consensus_merge(weigh()(TaskVectors(d, w)).deltas.clone(), w, tie_sign, normalize, divisor)
        assert torch.equal(got, expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_zero_below_keeps_exactly_the_entries_at_or_above_the_threshold(dtype):
    from mergelab.methods.select import zero_below

    d = _awkward_deltas(7).to(dtype)
    magnitudes = d.abs().flatten().unique()
    for thr in [magnitudes[5].item(), magnitudes[-3].item(), 0.3, 1e-40, 0.0]:
        got = zero_below(d.clone(), thr)
        assert torch.equal(got, d * (d.abs() >= thr)), thr
    assert zero_below(d.clone(), math.inf).abs().sum() == 0


def test_keep_mask_is_bernoulli_and_keyed_by_seed_tensor_chunk_and_model():
    from mergelab.methods.registry import TensorInputs

    models = [torch.zeros(300, 1000), torch.zeros(300, 1000)]

    def inputs(seed=0, name="w", chunk=0):
        return TensorInputs(name=name, shape=(300, 1000), base=None, models=models, params={}, model_params=[{}, {}],
                            seed=seed, chunk=chunk)

    m = inputs().keep_mask(0, 0.3)
    assert m.dtype == torch.float32 and set(m.unique().tolist()) <= {0.0, 1.0}
    assert abs(m.mean().item() - 0.3) < 0.005  # 300k draws: 5 standard deviations is 0.004
    assert torch.equal(m, inputs().keep_mask(0, 0.3))
    for other in (inputs(seed=1).keep_mask(0, 0.3), inputs(name="v").keep_mask(0, 0.3),
                  inputs(chunk=1).keep_mask(0, 0.3), inputs().keep_mask(1, 0.3)):
        assert not torch.equal(m, other)
    assert inputs().keep_mask(0, 1.0).min() == 1 and inputs().keep_mask(0, 0.0).max() == 0
    u = inputs().rand(0)
    assert u.min() >= 0 and u.max() < 1 and abs(u.mean().item() - 0.5) < 0.005


@pytest.mark.parametrize("normalize", [False, True])
def test_task_arithmetic_is_the_pipeline_bit_for_bit(normalize):
    from mergelab.methods.registry import TensorInputs
    from mergelab.methods.task_arithmetic import task_arithmetic_merge

    g = torch.Generator().manual_seed(3)
    base = torch.randn(64, 33, generator=g)
    models = [base + 0.01 * torch.randn(64, 33, generator=g) for _ in range(3)]
    weights = [0.7, 0.2, 0.45]
    x = TensorInputs(name="w", shape=(64, 33), base=base, models=models,
                     params={"lambda": 0.6, "normalize": normalize}, model_params=[{"weight": w} for w in weights])
    merged = linear_combine(weigh()(TaskVectors.from_models(base, models, weights)), normalize=normalize)
    assert torch.equal(task_arithmetic_merge(x), base + merged * 0.6)
