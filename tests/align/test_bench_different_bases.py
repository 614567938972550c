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
    assert sorted(report["results"]) == sorted(f"digits / {s} / {m}" for s in ("shared", "disjoint")
                                               for m in ("hidden 16", "conv 8 channels", "ResNet 8 channels"))
    for key, rows in report["results"].items():
        res = {r: v["mean"] for r, v in rows.items()}
        # at full width PLeaS is the ensemble exactly (MLP, conv net and ResNet)
        assert res["PLeaS w=2"] == res["ensemble"], key
        assert res["model A"] > 0.3 and res["model B"] > 0.3
        if "disjoint" in key:  # both heads side by side: each model on its own task
            assert res["ensemble"] == pytest.approx((res["model A"] + res["model B"]) / 2)
    assert "activation matching + average + BN reset" in report["results"]["digits / shared / ResNet 8 channels"]
    # the MLP columns have no BN-reset rows: the table shows '-' there
    md = (tmp_path / "report.md").read_text()
    assert "| weight matching + average + BN reset | - |" in md
