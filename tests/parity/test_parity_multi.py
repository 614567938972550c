"""A multi-stage file through ``mergekit-multi`` (mergekit 0.1.5) and ``mergelab merge -I``: the same
intermediate and final tensors. Runs when ``MERGEKIT_PYTHON`` (or ``MERGEKIT_YAML``) names mergekit's venv."""

from __future__ import annotations

import subprocess

import yaml

from mergelab.synthetic import make_llama_family
from tests.parity.mergekit_runner import MERGEKIT_YAML, NEEDS_MERGEKIT_CLI, assert_same_tensors, mergelab_cmd

pytestmark = NEEDS_MERGEKIT_CLI


def test_multi_stage_parity(tmp_path):
    multi = MERGEKIT_YAML.parent / "mergekit-multi"
    assert multi.is_file(), f"{multi} does not exist"
    base, e0, e1, e2 = (str(p) for p in make_llama_family(
        tmp_path / "family", experts=3, hidden=32, layers=2, intermediate=64, vocab=96, dtype="float32", seed=11,
        zero_fraction=0.5))
    docs = [
        # The final stage first: order comes from the dependencies, not the file.
        {"merge_method": "linear", "dtype": "float32",
         "models": [{"model": "blend", "parameters": {"weight": 0.7}}, {"model": e2, "parameters": {"weight": 0.3}}]},
        {"name": "blend", "merge_method": "task_arithmetic", "base_model": base, "dtype": "float32",
         "models": [{"model": "agents", "parameters": {"weight": 0.8}}, {"model": e1, "parameters": {"weight": 0.4}}]},
        {"name": "agents", "merge_method": "ram", "base_model": base, "dtype": "float32",
         "models": [{"model": e0}, {"model": e1}, {"model": e2}]},
    ]
    recipe = tmp_path / "multi.yaml"
    recipe.write_text(yaml.safe_dump_all(docs, sort_keys=False))
    mk, ml = tmp_path / "mk", tmp_path / "ml"
    for cmd in ([str(multi), str(recipe), "--intermediate-dir", str(mk / "inter"), "--out-path", str(mk / "out"),
                 "--quiet"],
                mergelab_cmd() + ["merge", str(recipe), "-o", str(ml / "out"), "-I", str(ml / "inter"), "-q"]):
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        assert res.returncode == 0, f"{' '.join(cmd)}:\n{res.stdout[-2000:]}\n{res.stderr[-3000:]}"
    for part in ("inter/agents", "inter/blend", "out"):
        stats = assert_same_tensors(mk / part, ml / part, max_ulp=1.0)
        assert stats["tensors"] == 21, (part, stats)
