"""`mergelab routed bench` on a miniature prepared bench, and bad input for the routed commands."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.tune.conftest import prepared  # noqa: F401  (tiny BERT, three small tasks, experts trained 1 epoch)

pytestmark = pytest.mark.filterwarnings("ignore")


def cli(*args, timeout=300):
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    return subprocess.run([sys.executable, "-m", "mergelab.cli", "routed", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, env=env)


def test_every_routed_method_writes_a_row_with_sizes_and_cost(prepared):  # noqa: F811
    import mergelab.routed as routed
    from mergelab.routed.bench import METHODS, RoutedSettings, run_routed_bench

    suite, cache, base, root = prepared
    settings = RoutedSettings(twin_epochs=3, wemoe_steps=2, wemoe_examples=8, wemoe_batch=4, eval_batch=16)
    out = root / "routed-out"
    report = run_routed_bench(suite, cache, list(METHODS), out, base=str(base), settings=settings,
                              references=True, log=lambda s: None)
    rows = {r.get("method", r["name"]): r for r in report["rows"]}
    assert rows["individual"]["kind"] == "reference"
    for name in METHODS:
        r = rows[name]
        assert r["status"] == "ok", r
        assert r["kind"] == "routed" and set(r["metrics"]["accuracy"]) == {"sentiment", "syllables"}
        s = r["sizes"]
        assert s["extra_bytes"] > 0 and s["total_bytes"] == s["one_model_bytes"] + s["extra_bytes"]
        assert s["experts_bytes"] == 2 * s["one_model_bytes"]
        assert r["inference"]["linear_macs_vs_one_model"] >= 1.0
        assert (out / "models" / name / "routed.json").is_file()
        assert r["data"]["test_time"] == (name == "wemoe_tta")
    assert rows["emr"]["inference"]["task_id_needed"] is True
    assert rows["wemoe_tta"]["data"]["split"] == "test" and rows["twin"]["data"]["split"] == "validation"
    # EMR with per-task masks keeps more than the plain average of the experts would: with two experts and
    # full masks where they agree, each task's model is close to its expert
    assert rows["emr"]["metrics"]["mean_normalised_accuracy"] > 0.5
    md = (out / "report.md").read_text()
    assert "total / all experts" in (out / "routed.md").read_text()
    assert "WEMoE (test-time adaptation)" in md and "EMR-Merging" in md
    assert json.loads((out / "report.json").read_text())["complete"] is True
    # a second run into the same folder is refused before any work, nothing rewritten
    before = (out / "report.json").stat().st_mtime_ns
    from mergelab.errors import MergeLabError

    with pytest.raises(MergeLabError, match="exists"):
        run_routed_bench(suite, cache, ["emr"], out, base=str(base), settings=settings, log=lambda s: None)
    assert (out / "report.json").stat().st_mtime_ns == before
    # Twin-Merging's shared model from another registered method (no lambda passed to one that takes none)
    other = run_routed_bench(suite, cache, ["twin"], root / "routed-linear", base=str(base), references=False,
                             settings=RoutedSettings(twin_method="linear", twin_epochs=3, eval_batch=16),
                             log=lambda s: None)
    (row,) = [r for r in other["rows"] if r.get("method") == "twin"]
    assert row["status"] == "ok" and row["params"]["shared"] == "linear"
    shared = routed.load(root / "routed-linear" / "models" / "twin").manifest
    assert shared["shared_method"] == "linear" and shared["shared_params"] == {}


class Run:
    def __init__(self, code, stderr):
        self.returncode, self.stderr = code, stderr


def test_bad_input_clear_errors_nothing_written(prepared, tmp_path, capsys):  # noqa: F811
    from mergelab.cli import main

    def cli_in(*args):  # in-process: each subprocess costs seconds of imports
        capsys.readouterr()
        try:
            main(["routed", *map(str, args)])
            code = 0
        except SystemExit as e:
            code = e.code
        return Run(code, capsys.readouterr().err)

    suite, cache, base, root = prepared
    p = cli("bench", "--methods", "emr,moe", "--out", tmp_path / "a")  # one real process: exit status, no traceback
    assert p.returncode != 0 and "unknown routed method(s) ['moe']" in p.stderr and "Traceback" not in p.stderr
    p = cli_in("bench", "--methods", "twin", "--twin-density", "0", "--out", tmp_path / "b")
    assert p.returncode != 0 and "--twin-density must be in (0, 1]" in p.stderr
    p = cli_in("bench", "--methods", "twin", "--twin-ranks", "8,x", "--out", tmp_path / "b")
    assert p.returncode != 0 and "--twin-ranks: 'x' is not an integer" in p.stderr
    p = cli_in("bench", "--methods", "twin", "--twin-ranks", "8,8", "--out", tmp_path / "b")
    assert p.returncode != 0 and "--twin-ranks must be distinct integers >= 1" in p.stderr
    p = cli_in("bench", "--methods", "twin", "--twin-rank", "4", "--twin-ranks", "8,16", "--out", tmp_path / "b")
    assert p.returncode != 0 and "give one of them" in p.stderr
    p = cli_in("bench", "--methods", "twin", "--twin-method", "tie", "--out", tmp_path / "b")
    assert p.returncode != 0 and "unknown method 'tie'" in p.stderr and "'ties'" in p.stderr
    p = cli_in("bench", "--methods", "wemoe", "--wemoe-batch", "0", "--out", tmp_path / "b")
    assert p.returncode != 0 and "--wemoe-batch >= 1" in p.stderr
    # emr: experts of another shape, a missing folder, an existing output
    from transformers import BertConfig, BertModel

    other = BertModel(BertConfig(vocab_size=50, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                                 intermediate_size=16))
    other.save_pretrained(str(tmp_path / "other"))
    expert = cache.expert_dir("sentiment")
    p = cli_in("emr", base, expert, tmp_path / "other", "-o", tmp_path / "c")
    assert p.returncode != 0 and "Traceback" not in p.stderr
    assert "has shape" in p.stderr or "lacks tensor" in p.stderr, p.stderr
    p = cli_in("emr", base, tmp_path / "missing", "-o", tmp_path / "d")
    assert p.returncode != 0 and "missing" in p.stderr and "config.json" in p.stderr
    (tmp_path / "e").mkdir()
    p = cli_in("emr", base, expert, "-o", tmp_path / "e")
    assert p.returncode != 0 and "exists" in p.stderr
    assert sorted(x.name for x in tmp_path.iterdir()) == ["e", "other"]
    assert list((tmp_path / "e").iterdir()) == []
