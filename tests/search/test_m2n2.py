"""M2N2's pieces against values worked out by hand, and `mergelab m2n2` end to end: rounds of several
children, a killed run resumed to the uninterrupted result, bad input refused before any work."""

import json

import numpy as np
import pytest
import torch
import yaml

from mergelab.search.m2n2 import attraction, crossover, shared_fitness
from tests.conftest import run_cli
from tests.search.conftest import config


def test_fitness_sharing():
    S = np.array([[1, 1, 0, 1], [1, 1, 0, 0], [0, 0, 1, 0]], dtype=float)
    f, Sh = shared_fitness(S, 1.0)
    # examples 0, 1 solved by two models: half credit each; 2 and 3 by one model alone: full credit
    assert f.tolist() == [0.5 + 0.5 + 1.0, 0.5 + 0.5, 1.0]
    f0, _ = shared_fitness(S, 0.0)  # alpha 0: a plain GA on summed scores
    assert f0.tolist() == [3.0, 2.0, 1.0]
    assert shared_fitness(np.zeros((2, 3)), 1.0)[0].tolist() == [0.0, 0.0]  # z = 0 is read as 1


def test_attraction_prefers_the_complement():
    S = np.array([[1, 1, 0, 0], [0, 0, 1, 1], [1, 0, 1, 0], [1, 1, 0, 0]], dtype=float)
    _, Sh = shared_fitness(S, 1.0)
    a = attraction(Sh, 0)
    assert int(np.argmax(a)) == 1 and a[0] == 0.0 and a[3] == 0.0
    assert a[1] == pytest.approx(Sh[1, 2] + Sh[1, 3])


def test_crossover_endpoints_and_split():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(50, generator=g), torch.randn(50, generator=g)
    assert torch.allclose(crossover(x, y, 50, 0.0), x, atol=1e-6)
    assert torch.allclose(crossover(x, y, 50, 1.0), y, atol=1e-5)
    # split 20, w = 1: the first 20 coordinates come from y, the rest from x
    c = crossover(x, y, 20, 1.0)
    assert torch.allclose(c[:20], y[:20], atol=1e-5) and torch.allclose(c[20:], x[20:], atol=1e-6)
    # w = 0.5 everywhere: SLERP's midpoint, sin(W/2)/sin(W) (x + y)
    omega = torch.arccos((x / x.norm()) @ (y / y.norm()))
    assert torch.allclose(crossover(x, y, 0, 0.5), torch.sin(omega / 2) / torch.sin(omega) * (x + y), atol=1e-5)


def test_crossover_does_not_depend_on_torch_threads():
    # a child made in a driver with 1 or 2 torch threads must be the same bits (workers 1 vs 2)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(1_000_003, generator=g), torch.randn(1_000_003, generator=g)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = crossover(x, y, 400_000, 0.3)
        torch.set_num_threads(2)
        two = crossover(x, y, 400_000, 0.3)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)


def test_m2n2_end_to_end(family, tmp_path):
    cfg = config(family, method="linear")
    cfg["search"] = {"steps": 3, "seed": 2, "alpha": 1.0}
    path = tmp_path / "m2n2.yaml"
    path.write_text(yaml.safe_dump(cfg))
    code, _, _ = run_cli(["m2n2", path, "-o", tmp_path / "out", "--quiet"])
    assert code == 0
    hist = json.loads((tmp_path / "out" / "history.json").read_text())
    assert len(hist["steps"]) == 3 and len(hist["evaluations"]) == 2 + 3
    assert len(hist["archive_mean_scores"]) == 2  # the archive keeps its size
    assert all(0 < e["fitness"] <= 1 for e in hist["evaluations"])
    assert (tmp_path / "out" / "best" / "config.json").is_file()
    for s in hist["steps"]:
        assert sorted(s["parents"]) == [0, 1]  # two members: the partner is the other one


def _write(tmp_path, cfg, name="m2n2.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def batched(family, tmp_path_factory):
    """An uninterrupted run with two children per round: 5 children in rounds of 2, 2 and 1."""
    root = tmp_path_factory.mktemp("m2n2-batched")
    cfg = config(family, method="linear")
    cfg["search"] = {"steps": 5, "seed": 4, "batch_size": 2, "archive_size": 3, "save_best_at": [4]}
    path = _write(root, cfg)
    code, _, _ = run_cli(["m2n2", path, "-o", root / "full", "--quiet"])
    assert code == 0
    return path, root / "full", json.loads((root / "full" / "history.json").read_text())


def test_rounds_of_children(batched):
    _, out, hist = batched
    assert hist["batch_size"] == 2 and hist["rounds"] == 3
    assert [s["round"] for s in hist["steps"]] == [1, 1, 2, 2, 3]
    assert [e["kind"] for e in hist["evaluations"]] == ["seed", "seed"] + ["child"] * 5
    # archive_size 3 from two experts: the first child is added, later ones replace
    assert hist["steps"][0]["replaced"] is None and len(hist["archive_mean_scores"]) == 3
    # both children of round 1 are drawn from the two-member archive: parents among 0 and 1
    assert all(sorted(s["parents"]) == [0, 1] for s in hist["steps"][:2])
    assert hist["best_at"]["4"]["mean_score"] == max(e["fitness"] for e in hist["evaluations"][:4])
    assert (out / "best-at-4" / "config.json").is_file() and (out / "state.pkl").is_file()


def test_killed_run_resumes_to_the_same_result(batched, tmp_path):
    from mergelab.search.m2n2 import run_m2n2

    path, full_out, full = batched
    out = tmp_path / "killed"

    def kill(rnd):
        if rnd == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_m2n2(path, out, log=lambda s: None, on_round=kill)
    assert len(json.loads((out / "history.json").read_text())["steps"]) == 4
    code, _, _ = run_cli(["m2n2", path, "-o", out, "--resume", "--quiet"])
    assert code == 0
    resumed = json.loads((out / "history.json").read_text())
    for key in ("steps", "evaluations", "best", "best_at", "archive_mean_scores"):
        drop = {"seconds"}
        strip = (lambda v: [{k: e[k] for k in e if k not in drop} for e in v]) if isinstance(resumed[key], list) \
            and resumed[key] and isinstance(resumed[key][0], dict) else (lambda v: v)
        assert strip(resumed[key]) == strip(full[key]), key
    assert (out / "best" / "model.safetensors").read_bytes() == (full_out / "best" / "model.safetensors").read_bytes()

    # a larger --steps continues the finished run; the archive it rebuilds must match the saved digests
    code, _, _ = run_cli(["m2n2", path, "-o", out, "--resume", "--steps", "6", "--quiet"])
    assert code == 0
    more = json.loads((out / "history.json").read_text())
    assert len(more["steps"]) == 6 and more["steps"][-1]["round"] == 4 and more["steps"][:5] == resumed["steps"]


def test_task_mean_weighs_tasks_not_examples():
    from types import SimpleNamespace

    from mergelab.errors import MergeLabError
    from mergelab.search.fitness import FitnessSpec

    def task(name, n):
        return SimpleNamespace(name=name, split=lambda split: list(range(n)))

    spec = FitnessSpec([task("a", 3), task("b", 1)])
    scores = [1, 1, 0, 0]  # a: 2/3, b: 0; pooled 2/4
    assert spec.example_counts() == [3, 1]
    assert spec.task_mean(scores) == pytest.approx((2 / 3 + 0) / 2)
    spec.weights = {"b": 3.0}
    assert spec.task_mean(scores) == pytest.approx((2 / 3 + 3 * 0) / 4)
    spec.limit = 2  # the first 2 of a's 3 examples
    assert spec.example_counts() == [2, 1] and spec.task_mean([1, 0, 1]) == pytest.approx((1 / 2 + 3 * 1) / 4)
    with pytest.raises(MergeLabError, match="4 per-example scores for tasks of \\[2, 1\\] examples"):
        spec.task_mean(scores)


def test_best_by_task_mean_reports_another_member_of_the_same_search(batched, tmp_path):
    import pickle

    path, _, pooled = batched
    cfg = yaml.safe_load(path.read_text())
    cfg["fitness"]["weights"] = {"refusal": 4}  # tasks of 6 examples each: pooled and task means differ
    cfg["search"]["best_by"] = "task_mean"
    out = tmp_path / "out"
    code, _, _ = run_cli(["m2n2", _write(tmp_path, cfg), "-o", out, "--quiet"])
    assert code == 0
    hist = json.loads((out / "history.json").read_text())
    # the search itself is unchanged: same parents, splits, ratios, replacements and child scores
    assert hist["steps"] == pooled["steps"]
    assert [e["fitness"] for e in hist["evaluations"]] == [e["fitness"] for e in pooled["evaluations"]]

    def oracle(row):  # language_id's 6 examples first, weight 1; refusal's 6, weight 4
        return (np.mean(row[:6]) + 4 * np.mean(row[6:])) / 5

    rows = pickle.loads((out / "state.pkl").read_bytes())["rows"]
    assert len(rows[0]) == 12
    assert hist["archive_task_means"] == pytest.approx([oracle(r) for r in rows])
    assert hist["archive_mean_scores"] == pytest.approx([np.mean(r) for r in rows])
    best = int(np.argmax([oracle(r) for r in rows]))
    assert best != int(np.argmax([np.mean(r) for r in rows]))  # the two views disagree on this archive
    assert hist["best"] == {"member": best, "mean_score": pytest.approx(np.mean(rows[best])),
                            "task_mean": pytest.approx(oracle(rows[best])), "by": "task_mean"}
    assert hist["best_at"]["4"]["by"] == "task_mean"
    assert hist["best_at"]["4"]["task_mean"] == max(e["task_mean"] for e in hist["evaluations"][:4])
    # best_by may change on resume (it does not change the search): the pooled view of the same archive
    cfg["search"]["best_by"] = "pooled"
    code, _, _ = run_cli(["m2n2", _write(tmp_path, cfg), "-o", out, "--resume", "--quiet"])
    assert code == 0
    again = json.loads((out / "history.json").read_text())
    assert again["steps"] == hist["steps"] and again["best"]["by"] == "pooled"
    assert again["best"]["member"] == int(np.argmax([np.mean(r) for r in rows])) != best
    assert again["best"]["task_mean"] == pytest.approx(oracle(rows[again["best"]["member"]]))


def test_bad_input_fails_before_any_work(family, tmp_path, capsys):
    def bad(search, *extra, resume_into=None):
        cfg = config(family, method="linear")
        cfg["search"] = search
        path = _write(tmp_path, cfg)
        out = resume_into or tmp_path / "out"
        code, stdout, stderr = run_cli(["m2n2", path, "-o", out, "--quiet", *extra], capsys)
        assert code == 2, stdout + stderr
        assert "Traceback" not in stderr and (resume_into is not None or not out.exists())
        return " ".join(stderr.split())

    assert "search.batch_size: expected an integer >= 1, got 0" in bad({"batch_size": 0})
    assert "search.batch_size: expected an integer >= 1, got 'two'" in bad({"batch_size": "two"})
    assert "search.batch_size: expected an integer >= 1, got True" in bad({"batch_size": True})
    assert "search.steps: expected an integer >= 1, got 0" in bad({"steps": 0})
    assert "--steps: expected an integer >= 1, got 0" in bad({}, "--steps", "0")
    assert "search.archive_size: expected an integer >= 2, got 1" in bad({"archive_size": 1})
    assert "search.alpha: expected a number >= 0, got -1" in bad({"alpha": -1})
    assert "search.best_by: expected one of ['pooled', 'task_mean'], got 'mean'" in bad({"best_by": "mean"})
    assert "search: unknown key(s) ['popsize']" in bad({"popsize": 4})
    assert "--workers must be at least 1, got 0" in bad({}, "--workers", "0")
    assert "--threads must be at least 1, got 0" in bad({}, "--threads", "0")
    assert "no Ray cluster answers at 127.0.0.1:9" in bad({}, "--ray", "127.0.0.1:9")
    assert "holds no search state" in bad({}, "--resume", resume_into=tmp_path / "empty")


def test_resume_with_another_config_is_refused(batched, family, tmp_path, capsys):
    import shutil

    from tests.search.test_evolve import snapshot

    path, full_out, _ = batched
    out = tmp_path / "out"
    shutil.copytree(full_out, out)
    before = snapshot(out)
    cfg = yaml.safe_load(path.read_text())

    def refused(change, command="m2n2"):
        c = json.loads(json.dumps(cfg))
        change(c)
        resume = [] if command == "map" else ["--resume"]
        code, stdout, stderr = run_cli([command, _write(tmp_path, c, "other.yaml"), "-o", out, "--quiet", *resume],
                                       capsys)
        assert code == 2, stdout + stderr
        assert "Traceback" not in stderr and snapshot(out) == before
        return " ".join(stderr.split())

    assert "another config (search.alpha: 1.0 there, 0.5 now; search.seed: 4 there, 5 now)" in \
        refused(lambda c: c["search"].update(alpha=0.5, seed=5))
    assert "search.batch_size: 2 there, 1 now" in refused(lambda c: c["search"].update(batch_size=1))
    a, b = cfg["genome"]["models"]
    assert f'genome.models[1]: "{b}" there, "{a}" now' in refused(lambda c: c["genome"].update(models=[b, a]))
    assert "fitness.split: \"validation\" there, \"test\" now" in refused(lambda c: c["fitness"].update(split="test"))
    assert "holds an M2N2 run (mergelab m2n2), not an evolve search (mergelab evolve)" in \
        refused(lambda c: c.update(search={"max_evals": 4}), command="evolve")
    # MAP has no --resume: a folder holding a search is refused without --overwrite
    def to_map(c):
        c["genome"].update(merge_method="task_arithmetic", base_model=str(family.base), parameters=["weight"])
        c["search"] = {}

    assert "exists and is not empty; pass --overwrite" in refused(to_map, command="map")


def test_every_step_follows_competition_attraction_and_replacement(batched):
    """The batched run (archive of 3 grown from the 2 experts, rounds of 2 children), step by step against
    the paper's rules worked out here: the first parent drawn in proportion to the shared fitness
    ``f_i = sum_j S_ij / (sum_i S_ij)^alpha``, the second in proportion to the attraction
    ``sum_j max(0, S^_kj - S^_p1,j)`` (itself excluded), then split ~ U{0..D-1}, w ~ U(0, 1), all from
    ``default_rng(seed)`` in that order, both children of a round from the archive at its start; each
    child scored, then added while the archive is below its size, else put in place of the member with
    the lowest shared fitness (archive and child) unless the child has it."""
    from safetensors.torch import load_file

    from mergelab.search.candidate import read_config
    from mergelab.search.fitness import make_scorer
    from mergelab.search.m2n2 import crossover

    path, _, hist = batched
    cfg = yaml.safe_load(path.read_text())
    alpha, seed, size = 1.0, cfg["search"]["seed"], cfg["search"]["archive_size"]
    torch.set_num_threads(1)  # as the run's evaluator
    scorer = make_scorer(read_config({**cfg, "search": {}}).fitness)
    states = [{k: v.float() for k, v in load_file(f"{m}/model.safetensors").items()}
              for m in cfg["genome"]["models"]]
    names = sorted(states[0])

    def flat(state):
        return torch.cat([state[k].reshape(-1) for k in names])

    def scores(vec):
        parts = torch.split(vec, [states[0][k].numel() for k in names])
        return np.asarray(scorer.example_scores({k: p.reshape(states[0][k].shape).clone()
                                                 for k, p in zip(names, parts)}), dtype=float)

    def fitness(S):
        z = S.sum(0) ** alpha
        Sh = S / np.where(z == 0, 1.0, z)
        return Sh.sum(1), Sh

    archive = [flat(s) for s in states]
    rows = [scores(v) for v in archive]
    D = archive[0].numel()
    rng = np.random.default_rng(seed)
    steps = iter(hist["steps"])
    for batch in (2, 2, 1):
        f, Sh = fitness(np.array(rows))
        drawn = []
        for _ in range(batch):
            p1 = int(rng.choice(len(f), p=f / f.sum()))
            a = np.maximum(0.0, Sh - Sh[p1]).sum(1)
            a[p1] = 0.0
            p2 = int(rng.choice(len(a), p=a / a.sum()))
            drawn.append((p1, p2, int(rng.integers(0, D)), float(rng.uniform(0.0, 1.0))))
        children = [crossover(archive[p1], archive[p2], split, w) for p1, p2, split, w in drawn]
        for (p1, p2, split, w), child in zip(drawn, children):
            step = next(steps)
            assert (step["parents"], step["split"], step["w"]) == ([p1, p2], split, w)
            s = scores(child)
            assert step["child_mean_score"] == pytest.approx(s.mean(), rel=1e-9)
            f_all, _ = fitness(np.vstack(rows + [s]))
            if len(archive) < size:
                assert step["replaced"] is None
                archive.append(child)
                rows.append(s)
            elif f_all[-1] > f_all[:-1].min():
                weakest = int(np.argmin(f_all[:-1]))
                assert step["replaced"] == weakest
                archive[weakest], rows[weakest] = child, s
            else:
                assert step["replaced"] == "child is the weakest"
    assert next(steps, None) is None
    assert hist["archive_mean_scores"] == pytest.approx([r.mean() for r in rows], rel=1e-9)
    # the run went through all three outcomes of an insertion: added, replaced a member, rejected
    assert {type(s["replaced"]) for s in hist["steps"]} == {type(None), int, str}
