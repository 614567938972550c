"""Ray, started here with two CPUs (one session for the module): the Ray executor writes the local
executor's bytes, and a search's results (evolve, M2N2) do not depend on the number of workers."""

import json

import pytest
import yaml

from tests.conftest import run_cli
from tests.search.conftest import config

ray = pytest.importorskip("ray")
pytest.importorskip("cma")


@pytest.fixture(scope="module", autouse=True)
def ray_session():
    # On a heavily loaded machine Ray's raylet can give up waiting for its agent's port file after 15 s
    # (ray-project/ray#65983): try again.
    for attempt in range(3):
        try:
            ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
            break
        except Exception:
            ray.shutdown()
            if attempt == 2:
                raise
    yield
    ray.shutdown()


def files(folder):
    """The output's files but the model card and manifest (they name the output folder and timings)."""
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.name not in ("mergelab.json", "README.md")}


@pytest.mark.parametrize("method", ["dare_ties", "task_arithmetic"])
def test_ray_executor_writes_the_local_bytes(family, tmp_path, method):
    recipe = {"merge_method": method, "base_model": str(family.base), "seed": 7,
              "models": [{"model": str(e), "parameters": {"weight": w, "density": 0.6}}
                         for e, w in zip(family.experts, (0.7, 0.4))]}
    if method == "task_arithmetic":
        for m in recipe["models"]:
            del m["parameters"]["density"]
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    common = ["--shard-size", "60KB", "--quiet"]
    assert run_cli(["merge", path, "-o", tmp_path / "local", *common])[0] == 0
    assert run_cli(["merge", path, "-o", tmp_path / "ray", "--executor", "ray", "--workers", "2", *common])[0] == 0
    local, distributed = files(tmp_path / "local"), files(tmp_path / "ray")
    shards = [n for n in local if n.endswith(".safetensors")]
    assert len(shards) >= 4  # several shards, so both workers write some
    assert local.keys() == distributed.keys()
    for name in local:
        assert local[name] == distributed[name], name
    manifest = json.loads((tmp_path / "ray" / "mergelab.json").read_text())
    per_worker = manifest["reports"]["(ray workers)"]["per_worker"]
    assert len(per_worker) == 2 and sorted(s for w in per_worker for s in w["shards"]) == sorted(shards)


def test_search_does_not_depend_on_the_number_of_workers(family, tmp_path):
    from mergelab.search.evolve import evolve

    cfg = config(family, max_evals=4, popsize=2)
    keys = ("genes", "fitness", "digest")
    runs = {}
    # one worker (this process) and two Ray actors
    for label, kw in (("in-process", {}), ("ray-2", {"workers": 2})):
        hist = evolve(cfg, tmp_path / label, log=lambda s: None, **kw)
        runs[label] = [{k: e[k] for k in keys} for e in hist["evaluations"]]
        assert hist["workers"] == (kw.get("workers") or 1)
    assert runs["ray-2"] == runs["in-process"]
    assert len(runs["ray-2"]) == 4


def test_m2n2_does_not_depend_on_the_number_of_workers(family, tmp_path):
    from mergelab.search.m2n2 import run_m2n2

    cfg = config(family, method="linear")
    cfg["search"] = {"steps": 4, "seed": 5, "batch_size": 2, "archive_size": 3}
    runs = {}
    for label, kw in (("in-process", {}), ("ray-2", {"workers": 2})):
        hist = run_m2n2(cfg, tmp_path / label, log=lambda s: None, **kw)
        assert hist["workers"] == (kw.get("workers") or 1)
        runs[label] = (hist["steps"], [e["fitness"] for e in hist["evaluations"]], hist["archive_mean_scores"],
                       (tmp_path / label / "best" / "model.safetensors").read_bytes())
    assert runs["ray-2"] == runs["in-process"]
    assert [s["round"] for s in runs["ray-2"][0]] == [1, 1, 2, 2]


def test_ray_executor_refuses_unreachable_cluster(family, tmp_path, capsys):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"merge_method": "linear", "models": [
        {"model": str(e), "parameters": {"weight": 1.0}} for e in family.experts]}))
    code, _, err = run_cli(["merge", path, "-o", tmp_path / "o", "--executor", "ray", "--ray", "127.0.0.1:9"], capsys)
    assert code == 2 and "no Ray cluster answers at 127.0.0.1:9" in err and not (tmp_path / "o").exists()
