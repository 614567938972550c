"""End to end on a miniature of the suite: prepare -> run -> report, and `evaluate` on the results.

Accuracy is not asserted (a tiny random model after a few steps); the report's internal consistency is.
"""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from mergelab.bench.cache import BenchCache
from mergelab.bench.cli import app as bench_app
from mergelab.evaluate.cli import app as evaluate_app
from mergelab.evaluate.metrics import accuracy
from mergelab.evaluate.tasks import load_suite

pytestmark = pytest.mark.filterwarnings("ignore")


@pytest.fixture(scope="module")
def prepared(tiny_base, mini_suite, tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    args = ["prepare", "--suite", str(mini_suite), "--cache", str(cache), "--base", str(tiny_base),
            "--epochs", "1", "--multitask-epochs", "2", "--batch-size", "16", "--lr", "1e-3", "--no-progress"]
    res = CliRunner().invoke(bench_app, args)
    assert res.exit_code == 0, res.output + repr(res.exception)
    return cache, args


@pytest.fixture(scope="module")
def report(prepared, tiny_base, mini_suite, tmp_path_factory):
    cache, _ = prepared
    out = tmp_path_factory.mktemp("out")
    res = CliRunner().invoke(bench_app, ["run", "--suite", str(mini_suite), "--cache", str(cache), "--base",
                                         str(tiny_base), "--out", str(out), "-m", "linear,ties", "-m", "slerp,regmean",
                                         "--save-models", "--grid", "lambda=0.5,1", "--grid", "density=0.1,0.5",
                                         "--grid", "alpha=0.5"])
    assert res.exit_code == 0, res.output + repr(res.exception)
    return out, json.loads((out / "report.json").read_text())


def test_prepare_writes_loadable_hf_experts_and_resumes(prepared, mini_suite):
    from transformers import AutoModelForSequenceClassification

    cache_root, args = prepared
    suite = load_suite(str(mini_suite))
    cache = BenchCache(suite, cache_root)
    for name in suite.task_names:
        info = json.loads((cache.expert_dir(name) / "expert.json").read_text())
        bits = info["tasks"][name]["test_correct"]
        assert len(bits) == len(suite.task(name).split("test"))
        assert info["tasks"][name]["test_accuracy"] == accuracy(bits)
        # a normal Hugging Face checkpoint: transformers loads it and predicts what the cache recorded
        model = AutoModelForSequenceClassification.from_pretrained(str(cache.expert_dir(name))).eval()
        assert model.config.id2label[0] == suite.task(name).labels[0]
        from transformers import AutoTokenizer
        tok = AutoTokenizer.from_pretrained(str(cache.expert_dir(name)))
        test = suite.task(name).split("test")
        with torch.no_grad():
            enc = tok([e.text for e in test], padding=True, return_tensors="pt")
            pred = model(**enc).logits.argmax(-1)
        assert "".join("1" if p == e.label else "0" for p, e in zip(pred.tolist(), test)) == bits
    mt = json.loads((cache.multitask_dir / "multitask.json").read_text())
    assert sorted(mt["tasks"]) == sorted(suite.merge_task_names)  # held-out task not trained on
    assert mt["train_config"]["epochs"] == 2
    assert mt["train"]["steps"] == sum(-(-2 * len(suite.task(t).split("train")) // 16) for t in suite.merge_task_names)
    assert (cache.pretrained_dir / "heads.safetensors").is_file()
    assert not list(cache.dir.rglob("*.partial"))
    # a second prepare finds every unit done and trains nothing
    res = CliRunner().invoke(bench_app, args)
    assert res.exit_code == 0 and "trained 0 unit(s)" in res.output
    # other settings for the same cache: refused unless rebuilt
    res = CliRunner().invoke(bench_app, args[:-1] + ["--lr", "5e-4", "--tasks", "sentiment", "--no-multitask",
                                                      "--no-progress"])
    assert res.exit_code != 0 and "other settings" in str(res.exception)


def test_report_files_exist_and_numbers_are_consistent(report):
    out, rep = report
    for name in ("report.json", "report.md", "accuracy_by_task.png", "normalised_accuracy.png",
                 "accuracy_vs_merge_time.png"):
        assert (out / name).stat().st_size > 0
    assert not list(out.glob("*.partial*"))
    tasks = rep["merge_tasks"]
    assert tasks == ["sentiment", "syllables"] and rep["held_out"] == ["name_gender"]
    rows = {r["name"]: r for r in rep["rows"]}
    expert = rows["individual"]["correct"]
    ok = [r for r in rep["rows"] if r["status"] == "ok"]
    assert {"pretrained", "individual", "multi-task training", "simple average (default)", "TIES (default)",
            "TIES (tuned)"} <= {r["name"] for r in ok}
    for row in ok:
        m = row["metrics"]
        for t in tasks:
            bits, ref = row["correct"][t], expert[t]
            assert len(bits) == rep["test_sizes"][t]
            assert m["accuracy"][t] == pytest.approx(bits.count("1") / len(bits))
            assert m["normalised_accuracy"][t] == pytest.approx(m["accuracy"][t] / rows["individual"]["metrics"]["accuracy"][t])
            direct = sum(1 for a, b in zip(ref, bits) if a == "1" and b == "0") / len(ref)
            assert m["negative_flip_rate"][t] == pytest.approx(direct)
        assert m["mean_accuracy"] == pytest.approx(sum(m["accuracy"].values()) / len(tasks))
    assert rows["individual"]["metrics"]["mean_normalised_accuracy"] == pytest.approx(1.0)
    assert rows["individual"]["metrics"]["mean_negative_flip_rate"] == 0.0
    # held-out task: scored for merges, with the same probe recipe as the pretrained reference
    assert set(rows["TIES (tuned)"]["metrics"]["held_out_accuracy"]) == {"name_gender"}
    # the tuned setting is the best one on validation, and every value tried is reported
    tuned = rows["TIES (tuned)"]
    best = max(s["validation_mean_accuracy"] for s in tuned["search"])
    chosen = [s for s in tuned["search"] if s["params"] == tuned["params"]]
    assert chosen and chosen[0]["validation_mean_accuracy"] == best
    assert [(s["params"]["lambda"], s["params"]["density"]) for s in tuned["search"]] == \
        [(0.5, 0.1), (0.5, 0.5), (1.0, 0.1), (1.0, 0.5)]  # the grid given on the command line
    assert tuned["merge_seconds"] >= 0 and "merge_peak_mib" in tuned
    # data-informed: RegMean merges from Gram matrices computed on each expert's train split
    reg = rows["regmean (tuned)"]
    assert reg["status"] == "ok" and reg["calibration"]["statistic"] == "gram"
    assert [x["params"]["alpha"] for x in reg["search"]] == [0.5] and reg["params"]["alpha"] == 0.5
    assert rows["regmean (default)"]["params"]["alpha"] == 0.1  # the registry default
    assert "simple average (tuned)" not in rows  # nothing to tune
    # slerp takes two models at most: reported as not applicable, not silently dropped
    assert rows["slerp"]["status"] == "not applicable" and "at most 1" in rows["slerp"]["reason"]
    md = (out / "report.md").read_text()
    assert "TIES (tuned)" in md and "Coefficients tried" in md and "slerp: not applicable" in md


def test_evaluate_cli_scores_the_multitask_model_like_the_report(prepared, report, tiny_base, mini_suite, tmp_path):
    cache_root, _ = prepared
    _, rep = report
    suite = load_suite(str(mini_suite))
    cache = BenchCache(suite, cache_root)
    out = tmp_path / "eval.json"
    res = CliRunner().invoke(evaluate_app, [str(cache.multitask_dir), "--suite", str(mini_suite), "--cache",
                                            str(cache_root), "--base", str(tiny_base), "--out", str(out)])
    assert res.exit_code == 0, res.output + repr(res.exception)
    got = json.loads(out.read_text())
    row = next(r for r in rep["rows"] if r["name"] == "multi-task training")
    assert got["correct"] == row["correct"]
    assert got["metrics"]["held_out_accuracy"] == pytest.approx(row["metrics"]["held_out_accuracy"])
    # an expert folder with the experts' heads scores its own task exactly as recorded
    res = CliRunner().invoke(evaluate_app, [str(cache.expert_dir("syllables")), "--suite", str(mini_suite),
                                            "--cache", str(cache_root), "--heads", "experts", "--out", str(out)])
    assert res.exit_code == 0, res.output + repr(res.exception)
    got = json.loads(out.read_text())
    assert got["correct"]["syllables"] == rep["rows"][1]["correct"]["syllables"]
    assert got["metrics"]["negative_flip_rate"]["syllables"] == 0.0


def test_evaluate_cli_on_a_saved_merge_reproduces_its_report_row(prepared, report, mini_suite, tmp_path):
    cache_root, _ = prepared
    out_dir, rep = report
    row = next(r for r in rep["rows"] if r["name"] == "TIES (tuned)")
    out = tmp_path / "eval.json"
    res = CliRunner().invoke(evaluate_app, [str(out_dir / "models" / "ties-tuned"), "--suite", str(mini_suite),
                                            "--cache", str(cache_root), "--out", str(out)])
    assert res.exit_code == 0, res.output + repr(res.exception)
    got = json.loads(out.read_text())
    assert got["heads"].startswith("experts in")
    assert got["correct"] == row["correct"]
    assert got["metrics"]["negative_flip_rate"] == pytest.approx(row["metrics"]["negative_flip_rate"])


def test_evaluate_cli_says_which_reference_is_missing(prepared, report, mini_suite, tmp_path):
    import shutil

    cache_root, _ = prepared
    suite = load_suite(str(mini_suite))
    model = tmp_path / "multitask"
    shutil.copytree(BenchCache(suite, cache_root).multitask_dir, model)  # has its own heads
    out = tmp_path / "eval.json"
    empty = tmp_path / "empty-cache"
    res = CliRunner().invoke(evaluate_app, [str(model), "--suite", str(mini_suite), "--cache", str(empty),
                                            "--out", str(out)], terminal_width=200)
    assert res.exit_code == 0, res.output + repr(res.exception)
    got = json.loads(out.read_text())
    assert set(got["metrics"]["normalised_accuracy"].values()) == {None}
    flat = " ".join(res.output.split())
    for t in suite.merge_task_names:
        assert f"no prepared expert for '{t}'" in flat
    assert "missing: normalised accuracy and negative flips need each expert's test predictions" in flat
    assert len(got["missing"]) == 1 and "mergelab bench prepare" in got["missing"][0]
    # with the experts prepared nothing is missing on the test split; on validation it says why
    res = CliRunner().invoke(evaluate_app, [str(model), "--suite", str(mini_suite), "--cache", str(cache_root),
                                            "--out", str(out)], terminal_width=200)
    assert res.exit_code == 0 and json.loads(out.read_text())["missing"] == [] and "missing:" not in res.output
    res = CliRunner().invoke(evaluate_app, [str(model), "--suite", str(mini_suite), "--cache", str(cache_root),
                                            "--split", "validation", "--out", str(out)], terminal_width=200)
    assert res.exit_code == 0, res.output + repr(res.exception)
    assert any("not computed for --split validation" in m for m in json.loads(out.read_text())["missing"])
    assert "missing: normalised accuracy" in " ".join(res.output.split())


def test_compress_textmix_experts_end_to_end(prepared, tiny_base, mini_suite, tmp_path):
    """`bench compress --suite SUITE` on textmix-style experts (issue 16 item 5): the expert row scores
    what `bench prepare` recorded for it (the encoder written out, compressed as a pack's input and read
    back with its own head), a GraftLLM pack, the low-rank pack at its bytes and BitDelta each give a
    rebuilt model's accuracy and test NLL; unknown tasks and llmmix-only options are refused."""
    cache, _ = prepared
    args = ["compress", "--suite", str(mini_suite), "--cache", str(cache), "--base", str(tiny_base),
            "--tasks", "sentiment", "--levels", "graft-m", "--out", str(tmp_path / "c")]
    res = CliRunner().invoke(bench_app, args)
    assert res.exit_code == 0, res.output + repr(res.exception)
    rep = json.loads((tmp_path / "c" / "compress.json").read_text())
    suite = load_suite(str(mini_suite))
    e = rep["experts"]["sentiment"]
    info = BenchCache(suite, cache).info(BenchCache(suite, cache).expert_dir("sentiment"))
    assert e["accuracy_expert"] == info["tasks"]["sentiment"]["test_accuracy"]
    assert e["n"] == len(suite.task("sentiment").split("test")) == 24
    rows = {r["label"]: r for r in e["rows"]}
    assert set(rows) == {"graft-m", "lowrank@graft-m", "bitdelta"}
    g, lr = rows["graft-m"]["matrix_bytes"], rows["lowrank@graft-m"]["matrix_bytes"]
    assert 0.65 * g <= lr <= 1.35 * g
    for r in rows.values():  # accuracies on 24 examples; NLL of a 2-way head: finite and positive
        assert round(r["accuracy"] * 24) == pytest.approx(r["accuracy"] * 24) and 0 < r["answer_nll"] < 10
    md = (tmp_path / "c" / "compress.md").read_text()
    assert "| sentiment | graft-m | graft |" in md and "test NLL" in md
    assert (tmp_path / "c" / "compress.png").read_bytes()[:4] == b"\x89PNG"
    for extra, msg in ((["--tasks", "nope"], "has no task 'nope'"),
                       (["--tasks", "sentiment", "--experts-dir", str(tmp_path)],
                        "--experts-dir applies to --suite llmmix")):
        res = CliRunner().invoke(bench_app, args[:7] + extra + ["--out", str(tmp_path / "bad")])
        assert res.exit_code != 0 and msg in str(res.exception), res.output + repr(res.exception)
        assert not (tmp_path / "bad").exists()
