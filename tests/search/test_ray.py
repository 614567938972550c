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


@pytest.mark.parametrize("strategy", ["cma", "random"])
def test_search_does_not_depend_on_the_number_of_workers(family, tmp_path, strategy):
    from mergelab.search.evolve import evolve

    cfg = config(family, max_evals=4, popsize=2)
    cfg["search"]["strategy"] = strategy
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


def test_map_does_not_depend_on_the_number_of_workers(family, tmp_path):
    from mergelab.search.map import run_map

    cfg = config(family, method="task_arithmetic")
    cfg["search"] = {"seed": 1, "pop_size": 20, "generations": 5}
    runs = {}
    for label, kw in (("in-process", {}), ("ray-2", {"workers": 2})):
        run_map(cfg, tmp_path / label, log=lambda s: None, **kw)
        runs[label] = {name: (tmp_path / label / name).read_bytes()
                       for name in ("samples.json", "front.json", "recipe-0.yaml", "recipe-1.yaml", "recipe-2.yaml")}
    assert runs["ray-2"] == runs["in-process"]


def test_ray_auto_joins_the_running_cluster(family, tmp_path):
    """`--ray auto` in another process joins the cluster this module started (found through RAY_ADDRESS, as
    on a real cluster's nodes), one actor per CPU, and ends with the in-process run's evaluations."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    import mergelab
    from mergelab.search.evolve import evolve

    cfg = config(family, max_evals=4, popsize=2)
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(cfg))
    src = str(Path(mergelab.__file__).resolve().parents[1])
    env = dict(os.environ, RAY_ADDRESS=ray.get_runtime_context().gcs_address, HF_HUB_OFFLINE="1",
               PYTHONPATH=os.pathsep.join([src, os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-m", "mergelab", "evolve", str(path), "-o", str(tmp_path / "auto"),
                           "--ray", "auto", "--quiet"], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    hist = json.loads((tmp_path / "auto" / "history.json").read_text())
    assert hist["workers"] == 2  # --workers defaults to the cluster's CPUs (ray.init(num_cpus=2) above)
    keys = ("genes", "fitness", "digest")
    want = evolve(cfg, tmp_path / "in-process", log=lambda s: None)
    assert [{k: e[k] for k in keys} for e in hist["evaluations"]] == \
        [{k: e[k] for k in keys} for e in want["evaluations"]]


def test_ray_executor_refuses_unreachable_cluster(family, tmp_path, capsys):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"merge_method": "linear", "models": [
        {"model": str(e), "parameters": {"weight": 1.0}} for e in family.experts]}))
    code, _, err = run_cli(["merge", path, "-o", tmp_path / "o", "--executor", "ray", "--ray", "127.0.0.1:9"], capsys)
    assert code == 2 and "no Ray cluster answers at 127.0.0.1:9" in err and not (tmp_path / "o").exists()


def test_ray_auto_with_an_unreachable_ray_address_is_refused(family, tmp_path, capsys, monkeypatch):
    """`--ray auto` stands for RAY_ADDRESS when it is set: a cluster that does not answer there is refused
    before any work, by the merge and by the searches."""
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:9")
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"merge_method": "linear", "models": [
        {"model": str(e), "parameters": {"weight": 1.0}} for e in family.experts]}))
    code, _, err = run_cli(["merge", path, "-o", tmp_path / "o", "--executor", "ray", "--ray", "auto"], capsys)
    err = " ".join(err.split())
    assert code == 2 and "--ray auto (RAY_ADDRESS=127.0.0.1:9): no Ray cluster answers at 127.0.0.1:9" in err
    assert not (tmp_path / "o").exists() and not (tmp_path / "o.partial").exists() and "Traceback" not in err
    cfg = config(family, method="task_arithmetic")
    cfg["search"] = {"seed": 3}  # a search: every command accepts
    path.write_text(yaml.safe_dump(cfg))
    for command in ("evolve", "m2n2", "map"):
        code, _, err = run_cli([command, path, "-o", tmp_path / command, "--ray", "auto"], capsys)
        assert code == 2 and "no Ray cluster answers at 127.0.0.1:9" in err, (command, err)
        assert not (tmp_path / command).exists()
