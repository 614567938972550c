"""Parity of ``ram`` and ``ramplus_tl`` with mergekit 0.1.5 (set ``MERGEKIT_PYTHON`` to its venv's python).

Method level: one subprocess runs mergekit's own ``merge_tensors`` on small float32 tensors whose task
vectors are exactly zero on part of the entries (so unique, shared and unchanged entries all occur), and
mergelab must give the same tensors bit for bit, whole and in row chunks. Command line: the same recipe
through ``mergekit-yaml`` and ``mergelab merge`` on tiny float32 Llama checkpoints (30% of each
expert's task vector is zero), every tensor equal.
"""

from __future__ import annotations

import pytest
import torch

from tests.methods.mergekit_family_util import run
from tests.parity.mergekit_runner import NEEDS_MERGEKIT, assert_same_tensors, merge_tensors, run_both

pytestmark = NEEDS_MERGEKIT


def _inputs():
    g = torch.Generator().manual_seed(42)
    t = {}
    for key, shape, zero in (("m", (24, 20), 0.5), ("v", (33,), 0.3), ("sparse", (16, 16), 0.9)):
        base = torch.randn(*shape, generator=g)
        t[f"{key}.base"] = base
        for i in range(4):
            keep = torch.rand(*shape, generator=g) >= zero
            t[f"{key}.{i}"] = base + 0.01 * torch.randn(*shape, generator=g) * keep
    # Changes right at epsilon and tiny ones: |tau| <= 1e-5 is inactive.
    b = t["v.base"].clone()
    t["v.tiny"] = b + torch.where(torch.arange(33) % 2 == 0, torch.full((33,), 5e-6), torch.full((33,), 2e-5))
    return t


CASES = [
    ("ram-2", "ram", "m", ["m.0", "m.1"], {}),
    ("ram-4", "ram", "m", ["m.0", "m.1", "m.2", "m.3"], {}),
    ("ram-1", "ram", "v", ["v.0"], {}),
    ("ram-eps", "ram", "m", ["m.0", "m.1", "m.2"], {"epsilon": 0.005}),
    ("ram-tiny", "ram", "v", ["v.0", "v.tiny", "v.1"], {}),
    ("ram-sparse", "ram", "sparse", ["sparse.0", "sparse.1", "sparse.2"], {}),
    ("rp-default", "ramplus_tl", "m", ["m.0", "m.1", "m.2"], {}),
    ("rp-strong", "ramplus_tl", "m", ["m.0", "m.1", "m.2", "m.3"], {"r": 0.7, "alpha": 2.5}),
    ("rp-sparse", "ramplus_tl", "sparse", ["sparse.0", "sparse.1", "sparse.2"], {"r": 0.3, "alpha": 5.0}),
    ("rp-tiny", "ramplus_tl", "v", ["v.0", "v.tiny"], {"r": 1.5, "alpha": 1.0, "epsilon": 1e-4}),
    ("rp-1", "ramplus_tl", "v", ["v.1"], {"r": 0.2}),
]


@pytest.fixture(scope="module")
def mergekit_results(tmp_path_factory):
    t = _inputs()
    cases = [{"id": cid, "method": m, "tensors": [f"{key}.base"] + models, "parameters": p}
             for cid, m, key, models, p in CASES]
    return t, merge_tensors(t, cases, tmp_path_factory.mktemp("ram"))


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_method_parity(mergekit_results, case):
    t, mk = mergekit_results
    cid, method, key, models, params = case
    base = t[f"{key}.base"]
    ours = run(method, base, [t[m] for m in models], params)
    expected = mk[cid]
    assert torch.equal(ours, expected), f"{cid}: {int((ours != expected).sum())} entries differ, " \
                                        f"max {float((ours - expected).abs().max()):.3g}"
    assert not torch.equal(expected, base)
    if base.dim() >= 1 and base.shape[0] > 3:
        assert torch.equal(run(method, base, [t[m] for m in models], params, chunks=3), expected)


@pytest.mark.slow
@pytest.mark.parametrize("method,params", [("ram", {}), ("ramplus_tl", {"r": 0.5, "alpha": 0.8})])
def test_cli_parity(tmp_path, method, params):
    from mergelab.synthetic import make_llama_family

    paths = make_llama_family(tmp_path / "family", experts=3, hidden=32, layers=2, intermediate=64, vocab=96,
                              dtype="float32", seed=3, zero_fraction=0.5)
    recipe = {"merge_method": method, "base_model": str(paths[0]),
              "models": [{"model": str(p)} for p in paths[1:]], "dtype": "float32"}
    if params:
        recipe["parameters"] = params
    out_mk, out_ml = run_both(recipe, tmp_path)
    stats = assert_same_tensors(out_mk, out_ml, max_ulp=0.0)
    assert stats["exactly_equal"] == stats["values"], stats
