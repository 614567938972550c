"""`mergelab bench scale --suite llmmix` on a tiny base: three experts, k in {2, 3}, two methods; the
table is checked against values recomputed from each run's per-example records."""

import json

import pytest
from typer.testing import CliRunner

from mergelab.bench.cli import app
from mergelab.llmmix.finetune import FinetuneConfig
from mergelab.llmmix.prepare import prepare
from mergelab.llmmix.scale import expert_order, findings
from tests.llmmix.test_run import save_base

SIZES = {"train": 32, "validation": 6, "test": 8}
EXAMPLES = "train=32,validation=6,test=8"
TASKS = ["language_id", "refusal", "string_ops"]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("llmscale")
    save_base(root / "base-tiny" / "final")
    cfg = FinetuneConfig(steps=100, batch_size=8, lr=3e-3, checkpoint_every=1000, threads=1, eval_limit=3,
                         replay_batch=0)
    prepare("tiny", root, cfg, tasks=TASKS, multitask=False, sizes=SIZES, progress=False, log=lambda s: None)
    return root


def _verdict(gaps, min_effect=0.02):
    """The findings' rule worked out here: gaps under two points are no difference."""
    if all(abs(g) < min_effect for g in gaps):
        return "no clear difference"
    up = [g >= min_effect for g in gaps]
    return "reproduced" if all(up) else "partly reproduced" if any(up) else "not reproduced"


def _acc(bits):
    return bits.count("1") / len(bits)


def test_scale_study_end_to_end(prepared, tmp_path):
    out = tmp_path / "scale"
    res = CliRunner().invoke(app, ["scale", "--suite", "llmmix", "--sizes", "tiny", "--experts", "3,2",
                                   "--methods", "average,task_arithmetic", "--held-out", "letter_count",
                                   "--grid", "lambda=0.5,1.0", "--examples", EXAMPLES, "--threads", "1",
                                   "--cache", str(prepared), "--out", str(out)])
    assert res.exit_code == 0, res.output
    for f in ("scale.json", "scale.md", "scale.png"):
        assert (out / f).is_file() and (out / f).stat().st_size > 0, f
    study = json.loads((out / "scale.json").read_text())
    assert study["complete"] and study["experts"] == [2, 3] and study["methods"] == ["linear", "task_arithmetic"]
    # one fixed seeded order, independent of how the tasks were listed; the sets are nested
    order = study["order"]["tiny"]
    assert sorted(order) == sorted(TASKS) and order == expert_order(list(reversed(TASKS)), 0)
    res_by = {(r["k"], r["method"]): r for r in study["results"]}
    assert set(res_by) == {(k, m) for k in (2, 3) for m in ("linear", "task_arithmetic")}
    e2, e3 = res_by[(2, "linear")]["experts"], res_by[(3, "linear")]["experts"]
    assert e2 == order[:2] and e3 == order and e3[:2] == e2
    md = (out / "scale.md").read_text()
    for (k, method), r in res_by.items():
        rep = json.loads((out / "tiny" / f"k{k}" / "report.json").read_text())
        assert rep["merge_tasks"] == r["experts"] and rep["held_out"] == ["letter_count"]
        rows = {x["name"]: x for x in rep["rows"]}
        # linear has no grid (default row); task arithmetic's lambda was tuned on validation
        name = "simple average (default)" if method == "linear" else "task arithmetic (tuned)"
        assert r["row"] == name
        row, expert = rows[name], rows["individual"]["correct"]
        norm = [_acc(row["correct"][t]) / _acc(expert[t]) for t in r["experts"] if _acc(expert[t]) > 0]
        assert norm, "no expert learnt its task; normalised accuracy is undefined"
        assert r["mean_normalised_accuracy"] == pytest.approx(sum(norm) / len(norm))
        assert r["mean_held_out_accuracy"] == pytest.approx(_acc(row["correct"]["letter_count"]))
        if method == "task_arithmetic":
            best = max(row["search"], key=lambda s: s["validation_mean_accuracy"])
            assert r["params"]["lambda"] == best["params"]["lambda"]
        line = (f"| tiny | {k} | {method} | {r['variant']} |")
        cells = [x for x in md.splitlines() if x.startswith(line)]
        assert len(cells) == 1
        assert f"| {100 * sum(norm) / len(norm):.1f} | {100 * _acc(row['correct']['letter_count']):.1f} |" in cells[0]
    # the findings: one size cannot show the size effects; the expert-count one is computed
    verdicts = {f["finding"]: f["verdict"] for f in study["findings"]}
    assert verdicts["larger base merges better"] == "not enough sizes"
    assert verdicts["methods' differences shrink with scale"] == "not enough sizes"
    held2 = sum(res_by[(2, m)]["mean_held_out_accuracy"] for m in ("linear", "task_arithmetic")) / 2
    held3 = sum(res_by[(3, m)]["mean_held_out_accuracy"] for m in ("linear", "task_arithmetic")) / 2
    assert verdicts["more experts help held-out generalisation"] == _verdict([held3 - held2])
    assert "## Findings of the paper" in md and "not enough sizes" in md and "more experts help held-out" in md
    # --resume reads the complete reports back instead of merging again; the study is the same
    args = ["scale", "--suite", "llmmix", "--sizes", "tiny", "--experts", "3,2", "--methods", "average,task_arithmetic",
            "--held-out", "letter_count", "--grid", "lambda=0.5,1.0", "--examples", EXAMPLES, "--threads", "1",
            "--cache", str(prepared), "--out", str(out)]
    res = CliRunner().invoke(app, args + ["--resume"])
    assert res.exit_code == 0, res.output
    assert res.output.count("scale: reusing") == 2 and "validation" not in res.output
    assert json.loads((out / "scale.json").read_text())["results"] == study["results"]
    # a report measured on other task data or other experts is rerun, not reused; one written before experts
    # were fingerprinted is checked on its task data only
    k2, k3 = out / "tiny" / "k2" / "report.json", out / "tiny" / "k3" / "report.json"
    r2, r3 = json.loads(k2.read_text()), json.loads(k3.read_text())
    assert r2["experts_fingerprint"] and r2["suite_fingerprint"]
    k2.write_text(json.dumps({**r2, "experts_fingerprint": "0" * 16}))
    k3.write_text(json.dumps({k: v for k, v in r3.items() if k != "experts_fingerprint"}))
    res = CliRunner().invoke(app, args + ["--resume"])
    assert res.exit_code == 0, res.output
    assert res.output.count("scale: reusing") == 1 and f"reusing {k3}" in res.output
    assert json.loads(k2.read_text())["experts_fingerprint"] == r2["experts_fingerprint"]  # rerun, rewritten
    k3.write_text(json.dumps({**r3, "suite_fingerprint": "x" + r3["suite_fingerprint"][1:]}))
    res = CliRunner().invoke(app, args + ["--resume"])
    assert res.exit_code == 0 and res.output.count("scale: reusing") == 1 and f"reusing {k2}" in res.output
    res = CliRunner().invoke(app, [a if a != "lambda=0.5,1.0" else "lambda=0.5" for a in args] + ["--resume"])
    assert res.exit_code == 0 and "scale: reusing" not in res.output  # another grid: rerun


def test_scale_refuses_more_experts_than_prepared(prepared, tmp_path):
    res = CliRunner().invoke(app, ["scale", "--sizes", "tiny", "--experts", "2,4", "--methods", "linear",
                                   "--cache", str(prepared), "--out", str(tmp_path / "o")])
    assert res.exit_code != 0 and "3 experts prepared" in str(res.exception)
    assert not (tmp_path / "o" / "scale.json").exists()


def test_findings_from_numbers():
    def r(size, k, method, norm, held):
        return {"size": size, "k": k, "method": method, "mean_normalised_accuracy": norm,
                "mean_held_out_accuracy": held}

    results = [r("s", 2, "a", 0.6, 0.2), r("s", 4, "a", 0.5, 0.3), r("s", 2, "b", 0.8, 0.2), r("s", 4, "b", 0.7, 0.3),
               r("l", 2, "a", 0.9, 0.4), r("l", 4, "a", 0.8, 0.3), r("l", 2, "b", 0.9, 0.4), r("l", 4, "b", 0.9, 0.3)]
    f = {x["finding"]: x for x in findings(results, ["s", "l"], [2, 4], ["a", "b"])}
    # mean normalised: s (0.6+0.5+0.8+0.7)/4 = 0.65 < l 0.875
    assert f["larger base merges better"]["verdict"] == "reproduced"
    assert f["larger base merges better"]["numbers"] == pytest.approx({"s": 0.65, "l": 0.875})
    # held-out: s 0.2 -> 0.3 (up), l 0.4 -> 0.3 (down)
    assert f["more experts help held-out generalisation"]["verdict"] == "partly reproduced"
    # spread: s |0.55 - 0.75| = 0.2, l |0.85 - 0.9| = 0.05
    assert f["methods' differences shrink with scale"]["verdict"] == "reproduced"
    assert f["methods' differences shrink with scale"]["numbers"] == pytest.approx({"s": 0.2, "l": 0.05})
    f = {x["finding"]: x for x in findings(results, ["l", "s"], [2, 4], ["a", "b"])}
    assert f["larger base merges better"]["verdict"] == "not reproduced"


def test_findings_instruct_variant_and_minimum_effect():
    def r(size, k, method, norm, held):
        return {"size": size, "k": k, "method": method, "mean_normalised_accuracy": norm,
                "mean_held_out_accuracy": held}

    # 3m at k=2,4; 3m-instruct only at k=2 (fewer experts prepared): compared on the k=2 cells alone
    results = [r("3m", 2, "a", 0.50, 0.10), r("3m", 2, "b", 0.40, 0.10), r("3m", 4, "a", 0.10, 0.11),
               r("3m", 4, "b", 0.10, 0.11), r("3m-instruct", 2, "a", 0.60, 0.30), r("3m-instruct", 2, "b", 0.50, 0.20)]
    f = {x["finding"]: x for x in findings(results, ["3m", "3m-instruct"], [2, 4], ["a", "b"])}
    inst = f["instruction-tuned base merges better"]
    assert inst["verdict"] == "reproduced" and inst["numbers"]["3m"]["cells"] == 2
    assert inst["numbers"]["3m"]["mean_normalised_accuracy"] == pytest.approx([0.45, 0.55])
    assert inst["numbers"]["3m"]["mean_held_out_accuracy"] == pytest.approx([0.10, 0.25])
    # the variant is not a size: one plain size cannot show the size findings
    assert f["larger base merges better"]["verdict"] == "not enough sizes"
    assert f["methods' differences shrink with scale"]["verdict"] == "not enough sizes"
    # held-out: 3m 0.10 -> 0.11 is one point (below two): no difference; 3m-instruct has one k only
    assert f["more experts help held-out generalisation"]["verdict"] == "not enough data"
    f = {x["finding"]: x for x in findings(results[:4], ["3m"], [2, 4], ["a", "b"])}
    assert f["more experts help held-out generalisation"]["verdict"] == "no clear difference"
    assert f["instruction-tuned base merges better"]["verdict"] == "not enough sizes"
    # a gap under two points between the bases is no difference either
    close = results[:4] + [r("3m-instruct", 2, "a", 0.51, 0.1), r("3m-instruct", 2, "b", 0.41, 0.1)]
    f = {x["finding"]: x for x in findings(close, ["3m", "3m-instruct"], [2, 4], ["a", "b"])}
    assert f["instruction-tuned base merges better"]["verdict"] == "no clear difference"


def test_scale_variant_with_fewer_experts_merges_the_same_subsets(tmp_path, monkeypatch):
    """The expert order is drawn over every size's prepared tasks: a variant with only the first two
    prepared merges the same pair at k=2, and asking it for k=4 names what is missing."""
    import mergelab.llmmix.run as llmrun
    from mergelab.llmmix.scale import run_scale

    tasks = ["t1", "t2", "t3", "t4"]
    order = expert_order(tasks, 0)
    (tmp_path / "experts-s").mkdir()
    (tmp_path / "experts-s" / "prepare.json").write_text(json.dumps({"tasks": tasks}))
    (tmp_path / "experts-s-instruct").mkdir()
    (tmp_path / "experts-s-instruct" / "prepare.json").write_text(
        json.dumps({"tasks": [order[1]], "models": {order[0]: {}, "multitask": {}}}))
    calls = []

    def fake(methods, out, size, root, merge_tasks=None, held_out=None, **kw):
        calls.append((size, list(merge_tasks)))
        return {"held_out": [], "rows": []}

    monkeypatch.setattr(llmrun, "run_llmmix", fake)
    run_scale(["s", "s-instruct"], [2], ["linear"], tmp_path / "o", tmp_path, log=lambda s: None)
    assert calls == [("s", order[:2]), ("s-instruct", order[:2])]
    with pytest.raises(Exception, match="2 experts prepared for size s-instruct, --experts asks for 3"):
        run_scale(["s", "s-instruct"], [2, 3], ["linear"], tmp_path / "o2", tmp_path, log=lambda s: None)
    # two prepared, but not the first two of the order: named, with the command that makes them
    (tmp_path / "experts-s-instruct" / "prepare.json").write_text(json.dumps({"tasks": [order[1], order[3]]}))
    with pytest.raises(Exception, match="missing") as e:
        run_scale(["s", "s-instruct"], [2], ["linear"], tmp_path / "o2", tmp_path, log=lambda s: None)
    assert order[0] in str(e.value) and f"--size s-instruct --tasks {order[0]}" in str(e.value)
    assert not (tmp_path / "o2").exists()


def test_scale_aggregates_nonzero_reports(tmp_path, monkeypatch):
    """The aggregation with non-trivial numbers (tiny merges score 0): ``run_llmmix`` is replaced by a
    stand-in whose rows carry known correctness bits; the table, the picked rows and the findings are
    checked against values worked out here from those bits."""
    import random

    import mergelab.llmmix.run as llmrun
    from mergelab.evaluate.metrics import summarise
    from mergelab.llmmix.scale import run_scale

    tasks = ["t1", "t2", "t3", "t4"]
    for size in ("s", "l"):
        (tmp_path / f"experts-{size}").mkdir()
        (tmp_path / f"experts-{size}" / "prepare.json").write_text(json.dumps({"tasks": tasks}))
    expert = {t: "11110000" for t in tasks}  # expert accuracy 0.5 on every task
    calls = []

    def bits(*key):
        rng = random.Random(repr(key))
        return "".join(rng.choice("01") for _ in range(8))

    def fake(methods, out, size, root, merge_tasks=None, held_out=None, **kw):
        calls.append((size, list(merge_tasks)))
        rows = [{"name": "individual", "kind": "reference", "status": "ok", "correct": dict(expert)}]
        for m in methods:
            for variant in (("default",) if m == "linear" else ("default", "tuned")):
                correct = {t: bits(size, len(merge_tasks), m, variant, t) for t in merge_tasks}
                held = {"h": _acc(bits(size, len(merge_tasks), m, variant, "h"))}
                rows.append({"name": f"{m} ({variant})", "method": m, "variant": variant, "status": "ok",
                             "params": {"lambda": 0.5}, "correct": correct,
                             "metrics": summarise(correct, merge_tasks, expert, held)})
        return {"held_out": ["h"], "rows": rows}

    monkeypatch.setattr(llmrun, "run_llmmix", fake)
    study = run_scale(["s", "l"], [4, 2], ["linear", "ties"], tmp_path / "o", tmp_path, log=lambda s: None)
    order = expert_order(tasks, 0)
    assert calls == [(s, order[:k]) for s in ("s", "l") for k in (2, 4)]
    md = (tmp_path / "o" / "scale.md").read_text()
    norm_by, held_by = {}, {}
    for r in study["results"]:
        variant = "default" if r["method"] == "linear" else "tuned"
        assert r["variant"] == variant
        exp_norm = sum(_acc(bits(r["size"], r["k"], r["method"], variant, t)) / 0.5 for t in order[:r["k"]]) / r["k"]
        exp_held = _acc(bits(r["size"], r["k"], r["method"], variant, "h"))
        assert r["mean_normalised_accuracy"] == pytest.approx(exp_norm)
        assert r["mean_held_out_accuracy"] == pytest.approx(exp_held)
        assert f"| {r['size']} | {r['k']} | {r['method']} | {variant} | lambda=0.5 | {100 * exp_norm:.1f} | " \
               f"{100 * exp_held:.1f} |" in md
        norm_by.setdefault(r["size"], []).append(exp_norm)
        held_by.setdefault((r["size"], r["k"]), []).append(exp_held)
    f = {x["finding"]: x for x in study["findings"]}
    mean = {s: sum(v) / len(v) for s, v in norm_by.items()}
    assert f["larger base merges better"]["verdict"] == _verdict([mean["l"] - mean["s"]])
    assert f["larger base merges better"]["numbers"] == pytest.approx(mean)
    gaps = [(sum(held_by[(s, 4)]) - sum(held_by[(s, 2)])) / 2 for s in ("s", "l")]
    assert f["more experts help held-out generalisation"]["verdict"] == _verdict(gaps)
    assert (tmp_path / "o" / "scale.png").stat().st_size > 0
