"""The different-bases benchmark in miniature (seconds): its files, and the identities its rows obey."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("sklearn")


def test_bench_quick(tmp_path):
    from mergelab.align.bench import run

    report = run(tmp_path, quick=True, datasets=("digits",), log=lambda line: None)
    assert {p.name for p in tmp_path.iterdir()} == {"report.json", "report.md", "accuracy_vs_width.png"}
    assert json.loads((tmp_path / "report.json").read_text())["results"] == report["results"]
    for key in ("digits / shared / hidden 16", "digits / disjoint / hidden 16"):
        res = {r: v["mean"] for r, v in report["results"][key].items()}
        # at full width PLeaS is the ensemble exactly
        assert res["PLeaS w=2"] == res["ensemble"], key
        assert res["model A"] > 0.3 and res["model B"] > 0.3
    dis = {r: v["mean"] for r, v in report["results"]["digits / disjoint / hidden 16"].items()}
    assert dis["ensemble"] == pytest.approx((dis["model A"] + dis["model B"]) / 2)
