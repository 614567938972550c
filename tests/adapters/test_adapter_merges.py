"""Merges that stay adapters (issue 16 item 2): output: {format: peft, combine: cat | svd | knots}.

Oracles: the dense merge of the same recipe without ``output:`` (mergelab's ordinary path, itself
checked against PEFT's merge_and_unload in test_adapted_inputs.py), and the Eckart-Young error
written out in the test from numpy's SVD."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from mergelab.adapters import knots_align
from mergelab.errors import RecipeError
from mergelab.io.peft_adapter import read_lora
from mergelab.merge import merge

from .helpers import load_base, peft_dense, random_adapter, state_of

peft = pytest.importorskip("peft")


@pytest.fixture(scope="module")
def fam(tmp_path_factory):
    from mergelab.synthetic import make_llama_family

    root = tmp_path_factory.mktemp("adapter_merges")
    base = make_llama_family(root, experts=0, hidden=32, layers=2, intermediate=64, vocab=64)[0]
    ads = [random_adapter(base, root / "a1", seed=21, r=4, alpha=8),
           random_adapter(base, root / "a2", seed=22, r=8, alpha=16, use_rslora=True,
                          rank_pattern={"layers.0.mlp.down_proj": 2},
                          targets=["q_proj", "v_proj", "down_proj", "o_proj"])]
    return base, ads, root


def _recipe(base, ads, method, weights, output=None, **params):
    rec = {"merge_method": method, "base_model": str(base), "dtype": "float32", "parameters": params,
           "models": [{"model": f"{base}+{a}", "parameters": {"weight": w}} for a, w in zip(ads, weights)]}
    if output:
        rec["output"] = output
    return rec


def _deltas(adapter_folder):
    ad = read_lora(adapter_folder)
    assert all(m.scale == 1.0 for m in ad.modules.values())
    return {m.weight_name: (m.B.double() @ m.A.double()) for m in ad.modules.values()}


def _dense_delta(base, folder):
    b, d = state_of(base), state_of(folder)
    return {k: (d[k].double() - b[k].double()) for k in b}


def test_cat_equals_dense_merge_and_loads_in_peft(fam, tmp_path):
    base, ads, _ = fam
    dense = merge(_recipe(base, ads, "task_arithmetic", [0.7, -0.4], **{"lambda": 0.9}), tmp_path / "dense").out
    out = merge(_recipe(base, ads, "task_arithmetic", [0.7, -0.4], {"format": "peft", "combine": "cat"},
                        **{"lambda": 0.9}), tmp_path / "cat").out
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["r"] == 12 and cfg["use_rslora"] is False  # 4 + 8: ranks add up
    assert cfg["rank_pattern"]["model.layers.0.mlp.down_proj"] == 6  # 4 + 2
    assert cfg["rank_pattern"]["model.layers.0.self_attn.o_proj"] == 8  # only the second adapter has it
    ours, want = _deltas(out), _dense_delta(base, dense)
    for name, d in want.items():
        got = ours.get(name, torch.zeros_like(d))
        assert torch.allclose(got, d, rtol=0, atol=1e-6 * max(1.0, float(d.abs().max()))), name
    from peft import PeftModel

    merged = PeftModel.from_pretrained(load_base(base), str(out)).merge_and_unload().state_dict()
    dstate = state_of(dense)
    for k, v in dstate.items():
        torch.testing.assert_close(merged[k], v, rtol=0, atol=2e-6)
    modules = json.loads((out / "mergelab.json").read_text())["modules"]
    assert modules["model.layers.1.self_attn.q_proj"] == {"rank": 12, "relative_error": 0.0}


@pytest.mark.parametrize("method,params", [("ties", {"density": 0.5}), ("task_arithmetic", {})])
def test_svd_equals_dense_within_reported_error(fam, tmp_path, method, params):
    base, ads, _ = fam
    dense = merge(_recipe(base, ads, method, [1.0, 0.6], **params), tmp_path / "dense").out
    out = merge(_recipe(base, ads, method, [1.0, 0.6], {"format": "peft", "combine": "svd", "rank": 3}, **params),
                tmp_path / "svd").out
    report = json.loads((out / "mergelab.json").read_text())["modules"]
    ours, want = _deltas(out), _dense_delta(base, dense)
    assert set(ours) == {k for k, d in want.items() if d.abs().max() > 0}
    for name, got in ours.items():
        d = want[name]
        s = np.linalg.svd(d.numpy(), compute_uv=False)
        eckart_young = np.sqrt((s[3:] ** 2).sum() / (s ** 2).sum())
        rep = report[name[:-len(".weight")]]
        assert rep["rank"] == 3
        assert rep["relative_error"] == pytest.approx(eckart_young, rel=1e-3, abs=1e-6)
        actual = float((got - d).norm() / d.norm())
        assert actual == pytest.approx(eckart_young, rel=1e-3, abs=1e-5)
    assert max(r["relative_error"] for r in report.values()) > 0.05  # rank 3 < the delta's rank: it truncates


def test_svd_with_full_rank_is_exact(fam, tmp_path):
    base, ads, _ = fam
    dense = merge(_recipe(base, ads, "task_arithmetic", [1.0, 1.0]), tmp_path / "dense").out
    out = merge(_recipe(base, ads, "task_arithmetic", [1.0, 1.0], {"format": "peft", "combine": "svd", "rank": 12}),
                tmp_path / "svd").out
    want = _dense_delta(base, dense)
    for name, got in _deltas(out).items():
        assert float((got - want[name]).norm() / want[name].norm()) < 1e-5


def test_knots_alignment_identity(fam):
    _, ads, _ = fam
    mods = [read_lora(a).modules["model.layers.1.self_attn.q_proj"] for a in ads]
    U, blocks = knots_align(mods)
    assert U.shape[1] == 12  # 4 + 8 independent directions
    torch.testing.assert_close(U.t() @ U, torch.eye(12, dtype=torch.float64), rtol=0, atol=1e-10)
    for m, R in zip(mods, blocks):
        torch.testing.assert_close(U @ R, m.scale * m.B.double() @ m.A.double(), rtol=0, atol=1e-10)


def test_knots_identical_adapters_give_the_adapter(fam, tmp_path):
    """TIES over two identical aligned blocks (density 1) keeps them: the disjoint mean is the block."""
    base, ads, _ = fam
    out = merge(_recipe(base, [ads[0], ads[0]], "ties", [1.0, 1.0], {"format": "peft", "combine": "knots", "rank": 4},
                        density=1.0), tmp_path / "k").out
    ad0 = read_lora(ads[0])
    got = _deltas(out)
    for m in ad0.modules.values():
        torch.testing.assert_close(got[m.weight_name], m.scale * m.B.double() @ m.A.double(), rtol=0, atol=1e-6)
    report = json.loads((out / "mergelab.json").read_text())["modules"]
    assert all(r["relative_error"] < 1e-6 and r["aligned_rank"] == 4 for r in report.values())


def test_knots_ties_reports_truncation(fam, tmp_path):
    base, ads, _ = fam
    out = merge(_recipe(base, ads, "ties", [1.0, 1.0], {"format": "peft", "combine": "knots", "rank": 2}, density=0.5),
                tmp_path / "k").out
    report = json.loads((out / "mergelab.json").read_text())["modules"]
    assert all(r["rank"] == 2 and 0 < r["relative_error"] < 1 for r in report.values())


@pytest.mark.parametrize("output,method,match", [
    ({"format": "peft", "combine": "cat"}, "ties", "cat is exact only for task_arithmetic"),
    ({"format": "peft", "combine": "svd"}, "ties", "needs rank: R"),
    ({"format": "peft", "combine": "cat", "rank": 3}, "task_arithmetic", "takes no 'rank'"),
    ({"format": "peft", "combine": "knots", "rank": 3}, "della", "knots merges the aligned blocks"),
])
def test_bad_output_specs(fam, tmp_path, output, method, match):
    base, ads, _ = fam
    with pytest.raises(RecipeError, match=match):
        merge(_recipe(base, ads, method, [1.0, 1.0], output, density=0.5, epsilon=0.1), tmp_path / "o")
    assert not (tmp_path / "o").exists()


def test_model_that_is_not_an_adapter_is_refused(fam, tmp_path):
    base, ads, root = fam
    from mergelab.synthetic import make_llama_family

    rec = _recipe(base, ads, "task_arithmetic", [1.0, 1.0], {"format": "peft", "combine": "cat"})
    rec["models"].append({"model": str(base), "parameters": {"weight": 1.0}})
    rec["models"][-1]["model"] = str(make_llama_family(tmp_path, experts=1, hidden=32, layers=2, intermediate=64,
                                                       vocab=64)[1])
    with pytest.raises(RecipeError, match="is not written as .*\\+ADAPTER"):
        merge(rec, tmp_path / "o")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("combine,method", [("svd", "ties"), ("knots", "dare_ties"), ("cat", "task_arithmetic")])
def test_trained_adapters_against_dense(trained, tmp_path, combine, method):
    """PEFT-trained adapters (rsLoRA, rank and alpha patterns among them): the adapter merge's delta
    is the dense merge's within the error mergelab.json reports (0 for cat); knots against its own
    dense counterpart U R* is covered by the identities above."""
    ads = [trained.adapters["strops"], trained.adapters["arith"]]
    params = {"density": 0.7} if method != "task_arithmetic" else {}
    output = {"format": "peft", "combine": combine, **({"rank": 4} if combine != "cat" else {})}
    out = merge(_recipe(trained.base, ads, method, [1.0, 0.8], output, **params), tmp_path / "a").out
    report = json.loads((out / "mergelab.json").read_text())["modules"]
    got = _deltas(out)
    assert len(got) == 6  # 2 layers x (q, v, down)
    from peft import PeftModel

    loaded = PeftModel.from_pretrained(load_base(trained.base), str(out)).merge_and_unload().state_dict()
    b = state_of(trained.base)
    for name, d in got.items():  # PEFT loads the written adapter as mergelab wrote it
        torch.testing.assert_close(loaded[name].double() - b[name].double(), d, rtol=0, atol=1e-6)
    if combine == "knots":
        assert all(r["rank"] == 4 and 0 <= r["relative_error"] < 1 for r in report.values())
        return
    dense = merge(_recipe(trained.base, ads, method, [1.0, 0.8], **params), tmp_path / "d").out
    want = _dense_delta(trained.base, dense)
    for name, d in got.items():
        rep = report[name[:-len(".weight")]]
        assert float((d - want[name]).norm() / want[name].norm()) == pytest.approx(rep["relative_error"], abs=1e-5)


def test_cli_peft_output_and_dry_run(fam, tmp_path, capsys):
    import yaml

    from ..conftest import run_cli

    base, ads, _ = fam
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(_recipe(base, ads, "ties", [1.0, 1.0], {"format": "peft", "combine": "svd",
                                                                              "rank": 2}, density=0.5)))
    code, out, err = run_cli(["merge", path, "--dry-run"], capsys)
    assert code == 0 and "dry run: PEFT adapter from 2 adapters, 8 modules, combine svd, rank 2" in out, err
    code, out, err = run_cli(["merge", path, "-o", tmp_path / "o"], capsys)
    assert code == 0 and "into the PEFT adapter" in " ".join(out.split()), err
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["adapter_config.json", "adapter_model.safetensors",
                                                                  "mergelab.json"]
    code, _, err = run_cli(["merge", path, "-o", tmp_path / "o"], capsys)
    assert code == 2 and "already exists" in err


def _ties_oracle(blocks, weights, density, normalize):
    """mergekit 0.1.5's TIES / DARE-TIES (no drop) on a zero base, written out in numpy: per-block top-k
    trim (k = max(1, int(density * numel))), weighted deltas, sign elected by the sum (0 -> +1), sum
    of the agreeing entries, divided by the agreeing weights when ``normalize``."""
    tvs, masks_w = [], []
    for b, w in zip(blocks, weights):
        flat = np.abs(b).ravel()
        k = max(1, int(density * flat.size))
        keep = np.zeros(flat.size, bool)
        keep[np.argsort(-flat, kind="stable")[:k]] = True
        tvs.append(w * np.where(keep.reshape(b.shape), b, 0.0))
    tvs = np.stack(tvs)
    elected = np.where(tvs.sum(0) >= 0, 1.0, -1.0)
    agree = np.sign(tvs) == elected
    merged = (tvs * agree).sum(0)
    if normalize:
        div = (np.asarray(weights, dtype=np.float64)[:, None, None] * agree).sum(0)
        merged = merged / np.where(div == 0, 1.0, div)
    return merged


@pytest.mark.parametrize("method,params,normalize", [("ties", {"density": 0.5}, True),
                                                     ("dare_ties", {"density": 1.0}, False)])
def test_knots_equals_an_independent_knots_within_reported_error(trained, tmp_path, method, params, normalize):
    """KnOTS on PEFT-trained adapters against the paper's recipe written out here: each adapter's delta
    from PEFT's merge_and_unload, numpy SVD of [dW_1 | dW_2] (components above 1e-5), the aligned
    blocks merged by mergekit's TIES (or DARE-TIES at density 1: sign election and sum, nothing
    dropped), D = U R*. At the aligned rank the written adapter is D; at rank 2 it is D's best rank-2
    approximation, off by exactly the relative error mergelab.json reports."""
    ads, weights = [trained.adapters["strops"], trained.adapters["arith"]], [1.0, 0.8]
    b = state_of(trained.base)
    deltas = [{k: (v.double() - b[k].double()).numpy() for k, v in peft_dense(trained.base, a).items()} for a in ads]
    oracle = {}
    for name in b:
        present = [i for i in range(2) if np.abs(deltas[i][name]).max() > 0]
        if not present:
            continue
        cat = np.concatenate([deltas[i][name] for i in present], axis=1)
        U, S, Vh = np.linalg.svd(cat, full_matrices=False)
        keep = S > 1e-5
        inn = deltas[0][name].shape[1]
        R = S[keep, None] * Vh[keep]
        blocks = [R[:, j * inn:(j + 1) * inn] for j in range(len(present))]
        oracle[name] = U[:, keep] @ _ties_oracle(blocks, [weights[i] for i in present], params["density"], normalize)
    assert len(oracle) == 6  # 2 layers x (q, v, down): down only in strops, a one-adapter KnOTS there
    for rank in (None, 2):
        full = rank is None
        out = merge(_recipe(trained.base, ads, method, weights,
                            {"format": "peft", "combine": "knots", "rank": 64 if full else rank}, **params),
                    tmp_path / f"k{rank}").out
        report = json.loads((out / "mergelab.json").read_text())["modules"]
        got = _deltas(out)
        assert set(got) == set(oracle)
        for name, d in oracle.items():
            rep = report[name[:-len(".weight")]]
            err = float(np.linalg.norm(got[name].numpy() - d) / np.linalg.norm(d))
            if full:
                assert rep["rank"] == rep["aligned_rank"] and rep["relative_error"] < 1e-6
                assert err < 1e-5, (name, err)
            else:
                s = np.linalg.svd(d, compute_uv=False)
                eckart_young = float(np.sqrt((s[2:] ** 2).sum() / (s ** 2).sum()))
                assert rep["rank"] == 2 and eckart_young > 0.05
                assert rep["relative_error"] == pytest.approx(eckart_young, rel=1e-3)
                assert err == pytest.approx(eckart_young, rel=1e-3), name
