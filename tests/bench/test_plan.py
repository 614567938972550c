import pytest

from mergelab.bench.run import GRIDS, LAMBDA_MEAN, LAMBDA_SUM, PeakMemory, plan_method, resolve_methods
from mergelab.errors import MergeLabError


def test_simple_average_is_linear_with_equal_weights_and_nothing_to_tune():
    plan = plan_method("linear", 3)
    assert plan.default == {"weight": [1.0, 1.0, 1.0]} and plan.grid == [plan.default]


def test_grids_follow_the_methods_parameters():
    ta = plan_method("task_arithmetic", 4)
    assert sorted(g["lambda"] for g in ta.grid) == sorted(LAMBDA_SUM)  # sums task vectors: small lambda
    ties = plan_method("ties", 4)  # averages agreeing entries: lambda around 1, and a density axis
    assert {g["lambda"] for g in ties.grid} == set(LAMBDA_MEAN)
    assert {g["density"] for g in ties.grid} == set(GRIDS["density"])
    assert all(g["weight"] == [1.0] * 4 for g in ties.grid)
    assert ties.default == {"weight": [1.0] * 4, "lambda": 1.0, "density": 1.0}  # registry defaults, stated


def test_methods_that_cannot_merge_the_suite_say_why():
    assert "at most 1" in plan_method("slerp", 8).reason
    assert plan_method("slerp", 8).default is None


def test_resolve_methods_expands_all_and_rejects_unknown():
    names = resolve_methods(["linear,ties", "ties"])
    assert names == ["linear", "ties"]
    assert "task_arithmetic" in resolve_methods(["all"])
    with pytest.raises(MergeLabError, match="unknown method"):
        resolve_methods(["tiez"])


def test_peak_memory_sees_a_large_allocation():
    import torch

    with PeakMemory() as mem:
        x = torch.ones(64 * 2**20 // 4)  # 64 MiB
        x += 1
        import time
        time.sleep(0.05)
    assert mem.mib > 32


def test_slow_and_inapplicable_methods_are_explained():
    doge = plan_method("doge_ta", 8)
    assert doge.grid == [doge.default] and "optimisation" in doge.reason
    mwa = plan_method("mwa", 8)
    assert mwa.default is None and "one training run" in mwa.reason


def test_grid_overrides_per_parameter_and_per_method():
    grids = {"lambda": (0.4,), "ties.lambda": (1.0, 2.0), "density": (0.2,)}
    assert [g["lambda"] for g in plan_method("task_arithmetic", 3, grids).grid] == [0.4]
    ties = plan_method("ties", 3, grids)
    assert [(g["lambda"], g["density"]) for g in ties.grid] == [(1.0, 0.2), (2.0, 0.2)]
