"""Pool-scaling experiment pieces (tune/scale.py) on the miniature bench."""

import argparse
import json

import pytest

from mergelab.tune.scale import build_pool, plot, worker

pytestmark = pytest.mark.filterwarnings("ignore")


def test_pool_order_worker_and_plot(prepared, tmp_path):
    suite, cache, base, root = prepared
    out = tmp_path / "scale"
    pool = build_pool(suite, cache, ["sentiment"], ["syllables"], 1, out, base=str(base), log=lambda s: None)
    assert [m["kind"] for m in pool] == ["relevant", "other task", "shuffled labels"]
    assert all((out / "pool").joinpath(m["path"].split("/")[-1]).is_file() for m in pool)
    (out / "pool.json").write_text(json.dumps(pool))
    results = []
    for method, gran in (("fw", "task"), ("ada", "layer")):
        for size in (1, 3):
            args = argparse.Namespace(threads=1, suite=str(suite.source), cache=str(cache.root), base=str(base),
                                      pool=str(out / "pool.json"), size=size, targets="sentiment", seed=0,
                                      method=method, examples=4, iterations=2, step_size=1.0, steps=2, lr=1e-2,
                                      granularity=gran)
            r = worker(args)
            assert r["size"] == size and len(r["pool"]) == size
            assert 0 <= r["mean_accuracy"] <= 1 and r["peak_rss_mib"] > 0
            results.append(r)
    fw3 = [r for r in results if r["method"] == "fw" and r["size"] == 3][0]
    assert abs(sum(fw3["coefficients"].values()) - 1) < 1e-9  # a convex combination of the pool + base
    plot(results, out / "p.png")
    assert (out / "p.png").stat().st_size > 1000
