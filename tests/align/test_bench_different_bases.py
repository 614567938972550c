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
    named = {"model A", "model B", "ensemble", "average", "weight matching + average", "activation matching + average",
             "PLeaS w=1", "PLeaS w=2", "PLeaS-free w=1", "PLeaS-free w=2"}  # the rows, at widths 1 and 2
    for key, rows in report["results"].items():
        assert named <= set(rows), (key, named - set(rows))
        if "ResNet" not in key:  # the MLPs and the plain conv net
            assert {"ZipIt (both hidden layers zipped)", "ZipIt partial (first layer zipped)"} <= set(rows), key
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


def test_pleas_free_inputs_are_another_domain():
    """PLeaS-free's calibration: photo patches standardised like the digits, not digits (no image shared with the
    training or test set), and of the digits' shape."""
    import torch

    from mergelab.align.bench import load_digits_data

    d = load_digits_data()
    other = d.other_domain
    assert other.shape == (1000, d.x_train.shape[1])
    near = torch.cdist(other, torch.cat([d.x_train, d.x_test])).min(1).values
    assert float(near.min()) > 1e-3
