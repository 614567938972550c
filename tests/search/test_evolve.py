"""`mergelab evolve` end to end on tiny trained Llama experts: the written recipe reproduces the scored
tensors under `mergelab merge`, a killed search resumes to the uninterrupted result, bad input fails
before any work."""

import hashlib
import json
from pathlib import Path

import pytest
import yaml
from safetensors import safe_open

from tests.conftest import run_cli
from tests.search.conftest import SIZES, config

pytest.importorskip("cma")


def digest(folder: Path) -> str:
    """sha256 over the output's tensors in name order (name, dtype, shape, raw bytes), computed here."""
    tensors = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            for k in st.keys():
                tensors[k] = st.get_tensor(k)
    h = hashlib.sha256()
    import torch

    for name in sorted(tensors):
        t = tensors[name].contiguous()
        h.update(f"{name}|{str(t.dtype).replace('torch.', '')}|{list(t.shape)}\n".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def setup(family, tmp_path_factory):
    from mergelab.llmmix.tasks import build_task
    from mergelab.llmmix.tasks.jsonl import write_task_jsonl

    root = tmp_path_factory.mktemp("evolve")
    # one task from the suite, one from a user JSONL file (the same data the expert was trained on)
    jsonl = write_task_jsonl(build_task("refusal", seed=0, sizes=SIZES), root / "refusal.jsonl")
    cfg = config(family, layer_granularity=1, filters=["mlp"])
    cfg["fitness"] = {"suite": "llmmix", "tasks": ["language_id"], "task_files": [str(jsonl)],
                      "examples": SIZES, "metric": "loss"}
    path = root / "search.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return root, path, cfg


@pytest.fixture(scope="module")
def full_run(setup, family):
    root, path, _ = setup
    out = root / "full"
    code, _, _ = run_cli(["evolve", path, "-o", out, "--quiet"])
    assert code == 0
    return out, json.loads((out / "history.json").read_text())


def test_history_and_best(full_run):
    out, hist = full_run
    evs = hist["evaluations"]
    assert len(evs) == 6 and hist["generations"] == 2 and hist["popsize"] == 3
    assert [e["eval"] for e in evs] == list(range(1, 7))
    assert hist["genome_size"] == 2 * 2 * 2 * 2  # 2 layer groups, 2 models, 2 filter sets, weight+density
    best = max(evs, key=lambda e: e["fitness"])
    assert hist["best"]["eval"] == best["eval"] and hist["best"]["fitness"] == best["fitness"]
    for e in evs:  # fitness is the mean of the two tasks' minus answer loss
        assert set(e["tasks"]) == {"language_id", "refusal"}
        assert e["fitness"] == pytest.approx(sum(e["tasks"].values()) / 2)
        assert all(v < 0 for v in e["tasks"].values())
    assert len({e["digest"] for e in evs}) == 6  # six different merges
    assert (out / "history.png").stat().st_size > 1000
    # candidates are merged in memory: OUT holds the search's four files and no checkpoint
    assert sorted(p.name for p in out.rglob("*")) == ["best_recipe.yaml", "history.json", "history.png", "state.pkl"]


def test_best_recipe_reproduces_scored_tensors(full_run, tmp_path):
    out, hist = full_run
    recipe = yaml.safe_load((out / "best_recipe.yaml").read_text())
    assert len(recipe["slices"]) == 2 and recipe["merge_method"] == "ties"
    code, _, _ = run_cli(["merge", out / "best_recipe.yaml", "-o", tmp_path / "merged", "--quiet"])
    assert code == 0
    assert digest(tmp_path / "merged") == hist["best"]["digest"]


def test_killed_search_resumes_to_the_same_result(setup, full_run, tmp_path):
    from mergelab.search.evolve import evolve

    _, path, _ = setup
    out = tmp_path / "killed"

    def kill(gen):
        if gen == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        evolve(path, out, log=lambda s: None, on_generation=kill)
    assert len(json.loads((out / "history.json").read_text())["evaluations"]) == 3
    code, _, _ = run_cli(["evolve", path, "-o", out, "--resume", "--quiet"])
    assert code == 0
    resumed = json.loads((out / "history.json").read_text())
    _, full = full_run
    keys = ("eval", "generation", "genes", "fitness", "tasks", "digest")
    assert [{k: e[k] for k in keys} for e in resumed["evaluations"]] == \
        [{k: e[k] for k in keys} for e in full["evaluations"]]
    assert (out / "best_recipe.yaml").read_text() == (full_run[0] / "best_recipe.yaml").read_text()


def _bad(tmp_path, capsys, cfg, *extra):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "out"
    code, stdout, stderr = run_cli(["evolve", path, "-o", out, *extra], capsys)
    assert code == 2, stdout + stderr
    assert "Traceback" not in stderr and not out.exists()
    return " ".join(stderr.split())


def test_bad_input_fails_before_any_work(family, tmp_path, capsys):
    cfg = config(family, ranges={"density": [0.7, 0.3]})
    assert "genome.ranges.density: the range [0.7, 0.3] is empty" in _bad(tmp_path, capsys, cfg)
    cfg = config(family, ranges={"t": [0.0, 1.0]})
    assert "'t' is not a parameter of method 'ties'" in _bad(tmp_path, capsys, cfg)
    cfg = config(family)
    cfg["fitness"] = {"task_files": [str(tmp_path / "missing.jsonl")]}
    assert "missing.jsonl: no such task file" in _bad(tmp_path, capsys, cfg)
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"prompt": "a", "answer": "b"}\n{"prompt": "c", "answer":\n')
    cfg["fitness"] = {"task_files": [str(broken)]}
    assert "broken.jsonl line 2: not valid JSON" in _bad(tmp_path, capsys, cfg)
    cfg = config(family)
    msg = _bad(tmp_path, capsys, cfg, "--ray", "127.0.0.1:9")
    assert "--ray 127.0.0.1:9: no Ray cluster answers at 127.0.0.1:9" in msg


def snapshot(folder: Path) -> dict:
    """Every file under ``folder``: its bytes and modification time."""
    return {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(folder.rglob("*")) if p.is_file()}


def test_resume_with_another_config_is_refused(setup, full_run, tmp_path, capsys):
    import shutil

    _, _, cfg = setup
    out = tmp_path / "out"
    shutil.copytree(full_run[0], out)
    before = snapshot(out)

    def refused(change, *extra, command="evolve"):
        c = json.loads(json.dumps(cfg))
        change(c)
        path = tmp_path / "other.yaml"
        path.write_text(yaml.safe_dump(c))
        code, stdout, stderr = run_cli([command, path, "-o", out, "--resume", "--quiet", *extra], capsys)
        assert code == 2, stdout + stderr
        assert "Traceback" not in stderr and snapshot(out) == before
        return " ".join(stderr.split())

    msg = refused(lambda c: c["search"].update(seed=4))
    assert "holds a search of another config (search.seed: 3 there, 4 now)" in msg
    a, b = cfg["genome"]["models"]
    msg = refused(lambda c: c["genome"].update(models=[b, a]))
    assert f'genome.models[0]: "{a}" there, "{b}" now' in msg and f'genome.models[1]: "{b}" there, "{a}" now' in msg
    msg = refused(lambda c: c["genome"].update(layer_granularity=0))
    assert "genome.layer_granularity: 1 there, 0 now" in msg
    msg = refused(lambda c: c["fitness"].update(metric="accuracy", limit=2))
    assert 'fitness.limit: null there, 2 now; fitness.metric: "loss" there, "accuracy" now' in msg
    msg = refused(lambda c: None, "--strategy", "random")
    assert 'search.strategy: "cma" there, "random" now' in msg
    msg = refused(lambda c: c["search"].update(popsize=4), command="m2n2")  # checked before M2N2 reads search:
    assert "search: unknown key(s) ['max_evals', 'popsize']" in msg
    msg = refused(lambda c: c.update(search={"seed": 3}), command="m2n2")
    assert "holds an evolve search (mergelab evolve), not an M2N2 run (mergelab m2n2)" in msg
    # the budget is not part of the config a resume must share
    c = json.loads(json.dumps(cfg))
    c["search"]["max_evals"] = 9
    (tmp_path / "more.yaml").write_text(yaml.safe_dump(c))
    code, _, _ = run_cli(["evolve", tmp_path / "more.yaml", "-o", out, "--resume", "--quiet"])
    assert code == 0
    evs = json.loads((out / "history.json").read_text())["evaluations"]
    assert len(evs) == 9 and evs[:6] == json.loads((full_run[0] / "history.json").read_text())["evaluations"]


@pytest.mark.parametrize("method, genome", [
    ("linear", {}),
    ("task_arithmetic", {"layer_granularity": 1}),
    ("dare_ties", {"filters": ["mlp"]}),  # random drops: the recipe's seed must reproduce them
    ("slerp", {"layer_granularity": 1}),  # per group the top two models, the first as the base
    ("della", {"parameters": ["weight", "density", "epsilon", "lambda"],  # a mergelab method, a global gene
               "ranges": {"density": [0.3, 0.7], "epsilon": [0.0, 0.2], "lambda": [0.5, 1.5]}}),
])
def test_every_method_writes_a_recipe_that_merge_reproduces(family, tmp_path, capsys, method, genome):
    path = tmp_path / "search.yaml"
    path.write_text(yaml.safe_dump(config(family, method=method, max_evals=4, popsize=2, **genome)))
    code, stdout, stderr = run_cli(["evolve", path, "-o", tmp_path / "out"], capsys)
    assert code == 0, stderr
    hist = json.loads((tmp_path / "out" / "history.json").read_text())
    evs = hist["evaluations"]
    assert len(evs) == 4 and all(e["fitness"] < 0 and "error" not in e for e in evs)
    assert len({e["digest"] for e in evs}) == 4  # four different merges were scored
    # progress: one line per generation on stderr, the result on stdout
    text = " ".join(stderr.split())
    assert "generation 1: 2/4 evaluations" in text and "generation 2: 4/4 evaluations" in text
    assert f"best fitness {hist['best']['fitness']:.4f} after 4 evaluations" in " ".join(stdout.split())
    recipe = yaml.safe_load((tmp_path / "out" / "best_recipe.yaml").read_text())
    assert recipe["merge_method"] == method
    if method == "della":
        assert set(recipe["parameters"]) == {"lambda"} and 0.5 <= recipe["parameters"]["lambda"] <= 1.5
    if genome.get("layer_granularity"):
        assert len(recipe["slices"]) == 2
    code, _, stderr = run_cli(["merge", tmp_path / "out" / "best_recipe.yaml", "-o", tmp_path / "merged", "--quiet"],
                              capsys)
    assert code == 0, stderr
    assert digest(tmp_path / "merged") == hist["best"]["digest"]


def test_llmmix_fitness_scores_the_merge_as_the_bench_does(family, tmp_path):
    """A candidate's llmmix fitness, from the resident model, against the merge written by `mergelab merge`
    and loaded fresh: `accuracy` is what llmmix's evaluator (`bench run`'s) gives that folder (and the
    resident model generates what the folder's model does); `loss` is
    minus transformers' own causal-LM loss over each task's validation answers (the fine-tuning loss)."""
    import torch

    from mergelab.llmmix.generate import evaluate_model, evaluate_task, load_causal_lm
    from mergelab.llmmix.tasks import build_task
    from mergelab.llmmix.tasks.format import collate_for_training, encode_for_training
    from mergelab.search.candidate import CandidateEvaluator
    from tests.search.conftest import TASKS

    cfg = config(family, method="task_arithmetic")
    cfg["fitness"]["metric"] = "accuracy"
    ev = CandidateEvaluator(cfg)
    recipe, state = ev.merge([0.7, 0.4])
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    assert run_cli(["merge", path, "-o", tmp_path / "merged", "--quiet"])[0] == 0
    tasks = [build_task(n, seed=0, sizes=SIZES) for n in TASKS]
    got = ev.scorer.score(state)
    fresh = evaluate_model(tmp_path / "merged", tasks, split="validation")
    want = {n: r.accuracy for n, r in fresh.items()}
    assert got["tasks"] == want and got["fitness"] == pytest.approx(sum(want.values()) / 2)
    # these tiny experts answer nothing right (accuracy 0), so compare what the resident model generated
    mine = {t.name: [r["prediction"] for r in evaluate_task(ev.scorer.model, ev.scorer.tokenizer, t,
                                                            "validation").records] for t in tasks}
    assert mine == {n: [r["prediction"] for r in fresh[n].records] for n in fresh}
    assert any(p.strip() for preds in mine.values() for p in preds)

    cfg["fitness"]["metric"] = "loss"
    got = CandidateEvaluator(cfg).scorer.score(state)
    model, tok = load_causal_lm(tmp_path / "merged")
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    for task in tasks:
        batch = collate_for_training([encode_for_training(tok, e) for e in task.split("validation")], pad)
        with torch.no_grad():
            loss = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                         labels=batch["labels"]).loss
        assert got["tasks"][task.name] == pytest.approx(-float(loss), rel=1e-5)
