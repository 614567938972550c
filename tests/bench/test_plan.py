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
    # A fresh anonymous mapping, written page by page, always adds to resident memory; a torch tensor may
    # instead reuse memory that an earlier test freed but the allocator kept resident.
    import mmap
    import time

    size = 64 * 2**20
    with PeakMemory() as mem:
        block = mmap.mmap(-1, size)
        for offset in range(0, size, mmap.PAGESIZE):
            block[offset] = 1
        time.sleep(0.05)
        block.close()
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


def test_grid_value_a_parameter_does_not_allow_is_an_error_naming_it():
    with pytest.raises(MergeLabError, match=r"--grid density: 1\.5 is not a valid 'density' for method 'ties'"):
        plan_method("ties", 3, {"density": (0.2, 1.5)})
    with pytest.raises(MergeLabError, match="'ties.density'"):
        plan_method("ties", 3, {"density": (-0.1,)})
    # built-in values outside a method's range are simply not searched
    assert plan_method("ties", 3).grid


def test_grid_over_the_limit_is_an_error_not_a_cut():
    from mergelab.bench.run import MAX_GRID

    five = tuple(0.1 * i for i in range(1, 6))
    with pytest.raises(MergeLabError, match=r"'ties' would search 25 settings \(5 lambda x 5 density\), more than 24"):
        plan_method("ties", 3, {"lambda": five, "density": five})
    four = five[:4]
    plan = plan_method("ties", 3, {"lambda": four, "density": four[:3] + (0.9, 0.95)})
    assert len(plan.grid) == 20 <= MAX_GRID
    assert len({(g["lambda"], g["density"]) for g in plan.grid}) == 20


def test_grid_keys_must_name_a_parameter_of_a_method_in_the_run():
    from mergelab.bench.run import check_grid_keys

    check_grid_keys({"lambda": (1.0,), "ties.density": (0.2,)}, ["ties", "linear"])
    with pytest.raises(MergeLabError, match="no method in this run .* has a parameter 'lamda'"):
        check_grid_keys({"lamda": (1.0,)}, ["ties", "linear"])
    with pytest.raises(MergeLabError, match="method 'dare_ties' is not in this run"):
        check_grid_keys({"dare_ties.density": (0.2,)}, ["ties"])
    with pytest.raises(MergeLabError, match="method 'linear' has no parameter 'density'"):
        check_grid_keys({"linear.density": (0.2,)}, ["ties", "linear"])


@pytest.mark.parametrize("grid, message", [
    ("lamda=0.3", "no method in this run (linear, ties) has a parameter 'lamda'"),
    ("density=0.2,2", "--grid density: 2.0 is not a valid 'density' for method 'ties'"),
])
def test_bench_run_refuses_a_bad_grid_before_any_work(mini_suite, tmp_path, grid, message):
    from typer.testing import CliRunner

    from mergelab.bench.cli import app as bench_app

    res = CliRunner().invoke(bench_app, ["run", "--suite", str(mini_suite), "--cache", str(tmp_path / "cache"),
                                         "--out", str(tmp_path / "out"), "-m", "linear,ties", "--grid", grid])
    assert res.exit_code != 0 and isinstance(res.exception, MergeLabError)
    assert message in str(res.exception)
    assert not (tmp_path / "out").exists()
