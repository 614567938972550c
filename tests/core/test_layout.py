"""One home per primitive (issue 14, point 8): no import cycles between the planners, and the tuners
share their result type from a module of its own rather than from one tuner's file."""

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src"


def _module(path: Path) -> str:
    return ".".join(path.relative_to(SRC).with_suffix("").parts).removesuffix(".__init__")


def _imports(path: Path) -> set:
    """Every mergelab module ``path`` imports, at module level or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("mergelab"):
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("mergelab"))
    return found


def _graph() -> dict:
    return {_module(p): _imports(p) for p in (SRC / "mergelab").rglob("*.py")}


def test_plan_and_slices_do_not_import_each_other_both_ways():
    g = _graph()
    assert "mergelab.plan" in g["mergelab.slices"]  # slices builds on the plan's types
    assert "mergelab.slices" not in g["mergelab.plan"]


def test_tuners_import_the_result_type_from_its_own_home():
    g = _graph()
    tuners = ["mergelab.tune.adamerging", "mergelab.tune.regmean_pp", "mergelab.tune.expert_merging",
              "mergelab.tune.fw_merging"]
    for t in tuners:
        assert "mergelab.tune.result" in g[t], t
        assert not (g[t] & set(tuners)), f"{t} imports another tuner: {sorted(g[t] & set(tuners))}"
    defining = [p.name for p in (SRC / "mergelab" / "tune").glob("*.py") if "class TuneResult" in p.read_text()]
    assert defining == ["result.py"]


def test_merge_build_plan_dispatches_slices_and_models(tiny_family):
    from mergelab.merge import build_plan, load_recipe, open_checkpoints

    base, experts = tiny_family
    sliced = load_recipe({"merge_method": "linear", "parameters": {"weight": 1.0}, "slices": [{"sources": [
        {"model": str(experts[0]), "layer_range": [0, 2]}, {"model": str(experts[1]), "layer_range": [0, 2]}]}]})
    plan = build_plan(sliced, open_checkpoints(sliced))
    assert plan.notes and plan.notes[-1].startswith("slices: 1 slice(s), 2 output layers")
    flat = load_recipe({"merge_method": "linear", "parameters": {"weight": 1.0}, "models": [{"model": str(e)} for e in experts[:2]]})
    plan = build_plan(flat, open_checkpoints(flat))
    assert plan.num_layers == 2 and not any(n.startswith("slices:") for n in plan.notes)
