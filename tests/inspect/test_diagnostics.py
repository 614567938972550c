"""The pure statistics and the interpretation, on in-memory tensors."""

import json

import pytest
import torch

from mergelab.inspect.diagnostics import (GroupStats, TaskVectorStats, chunk_stats, interpret,
                                          layer_ranges)


def stats(base, *taus, **kw):
    return chunk_stats(torch.tensor(base), torch.tensor(taus), **kw)


def test_chunk_stats_two_models_by_hand():
    # tau_1 = [3, -4, 0, 0], tau_2 = [0, 4, -1, 0]: norms 5 and sqrt(17), dot -16
    s = stats([1.0, 1.0, 1.0, 1.0], [3.0, -4.0, 0.0, 0.0], [0.0, 4.0, -1.0, 0.0])
    assert s.norms == pytest.approx([5.0, 17 ** 0.5])
    assert s.cosine[0][1] == pytest.approx(-16 / (5 * 17 ** 0.5))
    assert s.mean_cosine == pytest.approx(-16 / (5 * 17 ** 0.5))
    # only coordinate 1 has two non-zero entries, and they disagree
    assert (s.conflicts, s.overlap, s.chance_conflicts) == (1, 1, 0.5)
    assert s.conflict_rate == 0.25 and s.conflict_in_overlap == 1.0 and s.conflict_vs_chance == 2.0
    assert s.zeros.tolist() == [2, 2] and s.base_sumsq == 4.0


def test_conflict_needs_opposite_signs_zeros_abstain():
    # three models at one coordinate each column: (+,+,0) agree; (+,0,-) conflict; (0,0,-) alone;
    # (-,-,-) agree; (+,-,+) conflict
    s = stats([0.0] * 5, [1.0, 1.0, 0.0, -1.0, 1.0], [2.0, 0.0, 0.0, -2.0, -1.0], [0.0, -1.0, -1.0, -3.0, 1.0])
    assert s.conflicts == 2
    assert s.overlap == 4
    # chance: c = 2, 2, 3, 3 -> 1/2 + 1/2 + 3/4 + 3/4
    assert s.chance_conflicts == pytest.approx(2.5)


def test_near_zero_is_relative_to_the_base_weight():
    s = stats([10.0, 10.0, -10.0, 0.0], [0.01, 0.02, -0.01, 0.0], rtol=1e-3)
    # |tau| <= 1e-3 * |base| = 0.01: yes, no, yes, yes (exact zero)
    assert s.near_zero.tolist() == [3] and s.zeros.tolist() == [1]
    assert s.near_zero_share == [0.75]


def test_trimmed_conflicts_use_the_given_thresholds():
    base = [0.0] * 3
    t1, t2 = [1.0, -0.1, 2.0], [-1.0, 0.2, -0.05]
    s = stats(base, t1, t2, thresholds=[0.5, 0.5])
    assert s.conflicts == 3
    # kept: t1 -> [1, 0, 2], t2 -> [-1, 0, 0]: only coordinate 0 still conflicts
    assert (s.trimmed_conflicts, s.trimmed_overlap) == (1, 1)


def test_one_model_has_no_conflict_numbers():
    s = stats([1.0, 2.0], [1.0, -1.0])
    assert s.conflict_rate is None and s.overlap_rate is None and s.conflict_vs_chance is None
    assert s.cosine == [[1.0]] and s.mean_cosine is None


def test_pooling_adds_up_and_rejects_other_model_counts():
    a = stats([1.0, 1.0], [1.0, 0.0], [-1.0, 0.0])
    b = stats([1.0, 1.0], [0.0, 2.0], [0.0, 2.0])
    p = TaskVectorStats.pool([a, b], 2)
    assert p.numel == 4 and p.conflicts == 1 and p.overlap == 2
    assert p.gram.tolist() == [[5.0, 3.0], [3.0, 5.0]]
    with pytest.raises(ValueError):
        a + stats([1.0], [1.0])
    json.dumps(p.to_dict(), allow_nan=False)


def test_layer_ranges():
    assert layer_ranges([0, 1, 2, 5, 7, 8]) == "0-2, 5, 7-8"
    assert layer_ranges([3]) == "3"
    assert layer_ranges([]) == ""


def _layers(conflicting, n=16, width=8):
    """Two models; layers in ``conflicting`` have opposite signs everywhere, the others agree."""
    groups = []
    for i in range(n):
        t1 = [1.0] * width
        t2 = [-1.0 if i in conflicting else 1.0] * width
        groups.append(GroupStats(str(i), i, stats([1.0] * width, t1, t2)))
    return groups, TaskVectorStats.pool([g.stats for g in groups], 2)


def test_interpretation_names_the_high_conflict_layers():
    groups, overall = _layers({10, 11, 12, 13, 14, 15})
    lines = interpret(overall, groups, ["a", "b"])
    assert any(line.startswith("high sign conflict in layers 10-15") for line in lines), lines


def test_interpretation_everywhere_and_low():
    groups, overall = _layers(set(range(16)))
    assert any("every layer" in line for line in interpret(overall, groups, ["a", "b"]))
    groups, overall = _layers(set())
    lines = interpret(overall, groups, ["a", "b"])
    assert any(line.startswith("low sign conflict") for line in lines)
    # identical directions: aligned, and signs agree far more than chance
    assert any("moved the same way" in line for line in lines)
    assert any("agree far more than chance" in line for line in lines)


def test_interpretation_orthogonal_opposed_imbalanced_far():
    base = [1.0] * 4
    ortho = stats(base, [1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0])
    assert any("nearly orthogonal" in line for line in interpret(ortho, [], ["a", "b"]))
    opposed = stats(base, [1.0, 1.0, 0.0, 0.0], [-1.0, -0.5, 0.0, 0.0])
    assert any("opposite directions" in line for line in interpret(opposed, [], ["a", "b"]))
    # norms 0.1 and 0.4 (ratio 4 >= 3); relative norm 0.4 / 2 = 0.2 < 0.5
    imbalanced = stats(base, [0.1, 0.0, 0.0, 0.0], [0.0, 0.4, 0.0, 0.0])
    lines = interpret(imbalanced, [], ["a", "b"])
    assert any(line.startswith("b's task vector is 4.0x longer than a's") for line in lines)
    assert not any("far from the base" in line for line in lines)
    far = stats(base, [1.0, 1.0, 1.0, 1.0], [0.01, 0.0, 0.0, 0.0])
    assert any(line.startswith("a moved far from the base") for line in interpret(far, [], ["a", "b"]))


def test_interpretation_coin_flip_signs():
    # two dense models, signs disagreeing on exactly half the coordinates: conflict = chance
    s = stats([1.0] * 4, [1.0, 1.0, 1.0, 1.0], [1.0, -1.0, 1.0, -1.0])
    assert s.conflict_vs_chance == 1.0
    assert any("as unrelated as coin flips" in line for line in interpret(s, [], ["a", "b"]))
    agree = stats([1.0] * 4, [1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 1.0, -1.0])
    assert not any("coin flips" in line for line in interpret(agree, [], ["a", "b"]))


def test_trimmed_conflicts_keep_exact_counts_when_magnitudes_tie():
    # Model 1: five entries of |tau| 1 tie at the threshold of a keep-2 trim; the cut keeps the two of
    # lowest flat index (0 and 1), as the merge does, not all five.
    from mergelab.methods.select import Cut

    base = [0.0] * 5
    t1, t2 = [1.0, -1.0, 1.0, -1.0, 1.0], [-2.0, -2.0, -2.0, -2.0, -2.0]
    s = stats(base, t1, t2, thresholds=[Cut(1.0, 2), Cut(0.0)])
    # kept t1 -> [1, -1, 0, 0, 0]: only coordinate 0 conflicts with t2, and two coordinates overlap
    assert (s.trimmed_conflicts, s.trimmed_overlap) == (1, 2)
    # a chunk starting at flat index 1 keeps only its first entry (flat index 1 < 2)
    part = chunk_stats(torch.tensor(base[1:]), torch.tensor([t1[1:], t2[1:]]),
                       thresholds=[Cut(1.0, 2), Cut(0.0)], offset=1)
    assert (part.trimmed_conflicts, part.trimmed_overlap) == (0, 1)
