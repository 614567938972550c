"""``bench compress`` end to end on trained tiny experts (2 test examples, one pack size)."""

from __future__ import annotations

import json

from mergelab.compress.bench import bench_compress, lowrank_fraction_for


def test_lowrank_fraction_matches_bytes():
    tensors = {"a": {"module": "attention", "shape": [32, 32]}, "m": {"module": "mlp", "shape": [64, 32]},
               "e": {"module": "embedding", "shape": [300, 32]}}
    per_unit = 32 * (4 + 2 * 64) + 32 * (4 + 2 * 96)
    assert lowrank_fraction_for(tensors, per_unit // 4) == per_unit // 4 / per_unit
    assert lowrank_fraction_for(tensors, 10 * per_unit) == 1.0


def test_bench_compress_writes_table_json_and_png(trained, tmp_path):
    base, experts = trained
    rep = bench_compress(base, {"arithmetic": experts[0]}, tmp_path, limit=2, levels=(("graft-m", 0.8, 0.25),),
                         log=lambda m: None)
    saved = json.loads((tmp_path / "compress.json").read_text())
    assert saved["experts"]["arithmetic"]["rows"] == json.loads(json.dumps(rep["experts"]["arithmetic"]["rows"]))
    rows = {r["label"]: r for r in rep["experts"]["arithmetic"]["rows"]}
    assert set(rows) == {"graft-m", "lowrank@graft-m", "bitdelta"}
    # the low-rank baseline is matched to the GraftLLM pack's matrix bytes (rank rounding: within 35%)
    g, lr = rows["graft-m"]["matrix_bytes"], rows["lowrank@graft-m"]["matrix_bytes"]
    assert 0.65 * g <= lr <= 1.35 * g
    assert all(0.0 <= r["accuracy"] <= 1.0 for r in rows.values())
    assert "| arithmetic | graft-m | graft |" in (tmp_path / "compress.md").read_text()
    assert (tmp_path / "compress.png").read_bytes()[:4] == b"\x89PNG"
