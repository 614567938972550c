"""`mergelab demo` (the README's main job) on a tiny base: experts really learn their tasks, the recipes
merge them as written, every merged folder loads and generates, and the table has every row."""

import dataclasses
import json

import pytest
import torch
from rich.console import Console

from mergelab.demo import DemoConfig, run_demo
from tests.llmmix.test_run import save_base

TASKS = ("language_id", "refusal")  # tasks a tiny Llama learns in 150 steps (test_run.py); the base scores 0
CFG = DemoConfig(tasks=TASKS, size="tiny", steps=150, lr=3e-3, batch_size=8, train_examples=32, test_examples=16,
                 eval_limit=2, threads=1, answers=2)
LABELS = ["base", "expert: language_id", "expert: refusal", "task arithmetic", "TIES", "TSV-M"]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    save_base(root / "base")
    log = root / "log.txt"
    with open(log, "w") as f:
        res = run_demo(root / "work", root / "cache", CFG, base_dir=root / "base",
                       console=Console(file=f, width=200), progress=False)
    return root, res, log.read_text()


def test_experts_learn_their_task_and_every_model_is_scored(demo):
    root, res, out = demo
    assert list(res.accuracy) == LABELS
    for label in LABELS:
        assert set(res.accuracy[label]) == set(TASKS)
        assert label in out  # a row of the printed table
    acc = res.accuracy
    for t, other in (TASKS, TASKS[::-1]):
        # each expert learnt its own task: better than the base there, and better there than on the other task
        assert acc[f"expert: {t}"][t] > acc["base"][t] and acc[f"expert: {t}"][t] > acc[f"expert: {t}"][other], acc
    assert acc["expert: refusal"]["refusal"] >= 0.25, acc  # the harmful half is a fixed answer: learnt
    assert res.base_source == "given" and sorted(res.merges) == ["task_arithmetic", "ties", "tsv"]
    rec = json.loads((root / "work" / "demo.json").read_text())
    assert rec["accuracy"] == res.accuracy and rec["config"]["tasks"] == list(TASKS)
    prep = json.loads((root / "cache" / "experts-tiny" / "prepare.json").read_text())
    assert prep["base_source"] == "given" and sorted(prep["models"]) == sorted(TASKS)  # no multi-task model
    assert len(res.answers) == 2 and {a["task"] for a in res.answers} == set(TASKS)
    assert all(set(a["predictions"]) == set(LABELS) for a in res.answers)


def test_recipes_merge_as_written(demo):
    """Task arithmetic with the demo's lambda (0.7) and weights 1: merged = base + 0.7 * the sum of the task
    vectors (an oracle computed here from the folders' tensors); the TIES recipe names the experts."""
    from safetensors.torch import load_file

    root, res, _ = demo
    base = load_file(str(root / "base" / "model.safetensors"))
    experts = [load_file(str(res.experts[t] / "model.safetensors")) for t in TASKS]
    ta = load_file(str(res.merges["task_arithmetic"] / "model.safetensors"))
    for name, b in base.items():
        want = b + 0.7 * sum(e[name] - b for e in experts)
        torch.testing.assert_close(ta[name], want, rtol=1e-6, atol=1e-6)
    recipe = (root / "work" / "recipes" / "ties.yaml").read_text()
    assert "merge_method: ties" in recipe and str(res.experts["refusal"]) in recipe and "density: 0.5" in recipe


def test_merged_folders_load_and_generate(demo):
    """Every merged folder loads with transformers and generates; its row of the table is its exact-match
    accuracy, recomputed here from fresh greedy generations and the tasks' answers."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mergelab.llmmix.generate import greedy_generate
    from mergelab.llmmix.tasks import build_task

    _, res, _ = demo
    labels = {"task_arithmetic": "task arithmetic", "ties": "TIES", "tsv": "TSV-M"}
    for method, folder in res.merges.items():
        model = AutoModelForCausalLM.from_pretrained(folder).eval()
        tok = AutoTokenizer.from_pretrained(folder)
        for name in TASKS:
            task = build_task(name, seed=0, sizes=CFG.sizes())
            test = task.split("test")[:CFG.test_examples]
            preds = greedy_generate(model, tok, [e.prompt for e in test], max_new_tokens=task.max_new_tokens)
            right = sum(" ".join(p.split()) == " ".join(e.answer.split()) for p, e in zip(preds, test))
            assert res.accuracy[labels[method]][name] == pytest.approx(right / len(test)), (method, name)
            a = next(a for a in res.answers if a["task"] == name)
            assert a["predictions"][labels[method]] == preds[[e.prompt for e in test].index(a["prompt"])]


def test_second_run_reuses_the_experts(demo, tmp_path):
    root, res, _ = demo
    stamp = {t: (res.experts[t] / "model.safetensors").stat().st_mtime_ns for t in TASKS}
    with open(tmp_path / "log.txt", "w") as f:
        again = run_demo(tmp_path / "work", root / "cache", dataclasses.replace(CFG, methods=("ties",)),
                         base_dir=root / "base", console=Console(file=f, width=200), progress=False)
    assert {t: (again.experts[t] / "model.safetensors").stat().st_mtime_ns for t in TASKS} == stamp
    assert "already prepared" in (tmp_path / "log.txt").read_text()
    for t in TASKS:
        assert again.accuracy[f"expert: {t}"] == res.accuracy[f"expert: {t}"]


def test_cli_refuses_a_held_out_task(tmp_path, capsys):
    from tests.conftest import run_cli

    code, out, err = run_cli(["demo", "--tasks", "language_id,letter_count", "--workdir", tmp_path / "w",
                              "--cache", tmp_path / "c"], capsys)
    assert code == 2 and "letter_count held out" in err and "Traceback" not in err
    assert not (tmp_path / "w").exists() and not (tmp_path / "c").exists()


def test_default_base_is_the_shipped_one(tmp_path, monkeypatch):
    """Without --base the demo fine-tunes from the base shipped in the package, whatever the cache holds."""
    import mergelab.llmmix.prepare as prep
    from mergelab.llmmix.pretrain import shipped_base

    seen = {}

    class Stop(Exception):
        pass

    def fake_prepare(size, root, cfg, base_dir=None, **kw):
        seen.update(size=size, base=base_dir, root=root, steps=cfg.steps)
        raise Stop

    monkeypatch.setattr(prep, "prepare", fake_prepare)
    monkeypatch.setenv("MERGELAB_CACHE", str(tmp_path))
    with pytest.raises(Stop):
        run_demo(tmp_path / "w", console=Console(file=open(tmp_path / "log.txt", "w")))
    assert seen == {"size": "3m", "base": shipped_base("3m"), "root": tmp_path / "demo", "steps": 100}
