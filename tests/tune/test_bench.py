"""The tuned-methods runner on a miniature of the bench (tiny random BERT, three small tasks)."""

import json

import pytest

from mergelab.tune.bench import METHODS, TunedSettings, run_tuned_bench

pytestmark = pytest.mark.filterwarnings("ignore")


def test_every_tuned_method_writes_a_row_with_its_data_use(prepared):
    suite, cache, base, root = prepared
    settings = TunedSettings(regmean_examples=8, regmean_alphas=(0.5,), ada_examples=8, ada_steps=2,
                             expert_examples=2, expert_epochs=1, fw_examples=8, fw_iterations=2, batch_size=4)
    report = run_tuned_bench(suite, cache, list(METHODS), root / "out", base=str(base), settings=settings,
                             references=False, log=lambda s: None)
    rows = {r["method"]: r for r in report["rows"]}
    assert set(rows) == set(METHODS)
    for name, r in rows.items():
        assert r["status"] == "ok", r
        assert r["data"]["split"] in ("train", "validation", "test")
        assert r["data"]["test_time"] == (name == "adamerging_tta")
        assert set(r["metrics"]["accuracy"]) == {"sentiment", "syllables"}
        assert r["merge_seconds"] > 0
    assert "test-time adaptation" in rows["adamerging_tta"]["name"]
    assert rows["fw_hard"]["data"]["labels_used"] is True
    # the frozen word embeddings are recognised and left alone
    assert report["frozen_tensors"] == ["embeddings.word_embeddings.weight"]
    md = (root / "out" / "report.md").read_text()
    assert "AdaMerging (layer-wise, test-time adaptation)" in md
    assert json.loads((root / "out" / "report.json").read_text())["rows"][0]["method"] == METHODS[0]


def test_bench_run_hook_reuses_its_runner(prepared):
    """What `bench run` would call for a tuned method name: rows in its format, from its own runner."""
    from mergelab.bench.run import BenchRunner
    from mergelab.tune.bench import TunedBench

    suite, cache, base, root = prepared
    runner = BenchRunner(suite, cache, ["sentiment", "syllables"], [], str(base), 0, lambda s: None)
    rows = TunedBench.from_runner(runner, TunedSettings(fw_examples=4, fw_iterations=1, batch_size=4)).run("fw_hard")
    assert rows[0]["status"] == "ok" and rows[0]["kind"] == "merge"
    assert set(rows[0]["metrics"]["accuracy"]) == {"sentiment", "syllables"}
    with pytest.raises(Exception, match="unknown tuned method"):
        TunedBench.from_runner(runner).run("nope")
