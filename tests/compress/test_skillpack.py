"""SkillPacks (GraftLLM), the low-rank baseline and BitDelta on really trained tiny Llama experts:
format accounting, reconstruction identities, monotone errors, graft through the merge engine, CLI."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors import safe_open

from mergelab.compress.graft import graft
from mergelab.compress.skillpack import (PACK_JSON, PACK_TENSORS, PackCheckpoint, PackSettings, band_counts,
                                         classify, compress)
from mergelab.errors import MergeLabError
from mergelab.io.checkpoint import Checkpoint
from tests.conftest import run_cli

FP16 = ((16, 1.0),)


def _tensors(folder):
    ck = Checkpoint.open(str(folder))
    return {n: ck.read(n, dtype=torch.float32) for n in ck.tensors}


def test_band_counts_sum_to_rank():
    assert band_counts(1000, ((8, 0.02), (4, 0.18), (2, 0.80))) == [(8, 0, 20), (4, 20, 200), (2, 200, 1000)]
    for rank in (1, 2, 7, 33):
        bands = band_counts(rank, ((8, 20 / 1400), (4, 180 / 1400), (2, 1200 / 1400)))
        assert sum(stop - start for _, start, stop in bands) == rank
        assert all(b[2] == n[1] for b, n in zip(bands, bands[1:]))  # contiguous


def test_classify_llama_and_bert_names():
    assert classify("model.layers.0.self_attn.q_proj.weight", (8, 8)) == "attention"
    assert classify("model.layers.0.mlp.down_proj.weight", (8, 16)) == "mlp"
    assert classify("model.embed_tokens.weight", (100, 8)) == "embedding"
    assert classify("lm_head.weight", (100, 8)) == "head"
    assert classify("model.norm.weight", (8,)) == "other"
    assert classify("encoder.layer.0.attention.self.query.weight", (8, 8)) == "attention"
    assert classify("encoder.layer.0.intermediate.dense.weight", (16, 8)) == "mlp"
    assert classify("encoder.layer.0.output.dense.weight", (8, 16)) == "mlp"


def test_full_rank_float16_pack_rebuilds_the_expert(trained, tmp_path):
    base, (expert, _) = trained
    s = PackSettings(attn_energy=1.0, mlp_rank=1.0, attn_bands=FP16, mlp_bands=FP16, embed_density=1.0)
    res = compress(str(base), str(expert), str(tmp_path / "pack"), s)
    b, m = _tensors(base), _tensors(expert)
    ck = PackCheckpoint(str(tmp_path / "pack"), Checkpoint.open(str(base)))
    for name, e in res.tensors.items():
        delta = m[name] - b[name]
        rebuilt = ck.read(name, dtype=torch.float32) - b[name]
        if e["kind"] == "svd":
            assert e["rank"] <= e["full_rank"]
            assert float((rebuilt - delta).norm()) <= 2e-3 * float(delta.norm())  # float16 factors
        else:
            assert torch.allclose(rebuilt, delta, atol=1e-6), name
        # rows read lazily equal the rows of the whole tensor
        if rebuilt.dim() == 2 and rebuilt.shape[0] > 3:
            assert torch.allclose(ck.read(name, rows=(1, 3), dtype=torch.float32), ck.read(name, dtype=torch.float32)[1:3])


def test_pack_bytes_equal_the_stored_tensors_and_the_accounting_formula(trained, tmp_path):
    base, (expert, _) = trained
    res = compress(str(base), str(expert), str(tmp_path / "pack"), PackSettings(attn_energy=0.9))
    with safe_open(str(tmp_path / PACK_TENSORS if False else tmp_path / "pack" / PACK_TENSORS), "pt") as f:
        stored = sum(f.get_tensor(k).numel() * f.get_tensor(k).element_size() for k in f.keys())
    manifest = json.loads((tmp_path / "pack" / PACK_JSON).read_text())
    assert manifest["bytes"]["stored"] == stored == res.bytes
    assert sum(e["bytes"] for e in manifest["tensors"].values()) == stored
    for name, e in manifest["tensors"].items():
        if e["kind"] != "svd":
            continue
        out, inp = e["shape"]
        # GraftLLM's accounting: sum over bands of cols * (out + in) * bits / 8, plus the scales and S
        expected = 4 * e["rank"]
        for band in e["bands"]:
            k = band["stop"] - band["start"]
            if band["bits"] == 16:
                expected += 2 * k * (out + inp)
            else:
                expected += math.ceil(out * k * band["bits"] / 8) + math.ceil(k * inp * band["bits"] / 8)
                expected += 2 * (out + k)
        assert e["bytes"] == expected, name


def test_errors_do_not_increase_with_rank_or_bits(trained, tmp_path):
    base, (expert, _) = trained
    errs = {}
    for label, s in {
        "r.25": PackSettings(scheme="lowrank", rank=0.25),
        "r.5": PackSettings(scheme="lowrank", rank=0.5),
        "r1": PackSettings(scheme="lowrank", rank=1.0),
        "2bit": PackSettings(attn_rank=0.5, mlp_rank=0.5, attn_bands=((2, 1.0),), mlp_bands=((2, 1.0),)),
        "4bit": PackSettings(attn_rank=0.5, mlp_rank=0.5, attn_bands=((4, 1.0),), mlp_bands=((4, 1.0),)),
        "8bit": PackSettings(attn_rank=0.5, mlp_rank=0.5, attn_bands=((8, 1.0),), mlp_bands=((8, 1.0),)),
    }.items():
        res = compress(str(base), str(expert), str(tmp_path / label), s)
        errs[label] = {n: e["rel_error"] for n, e in res.tensors.items() if e["module"] in ("attention", "mlp")}
    for name in errs["r1"]:
        assert errs["r.25"][name] >= errs["r.5"][name] >= errs["r1"][name] - 1e-6
        assert errs["2bit"][name] >= errs["4bit"][name] - 1e-6 >= errs["8bit"][name] - 2e-6
        # 8-bit bands at rank 0.5 add at most 1% (relative, in quadrature) to the rank-0.5 truncation
        assert errs["8bit"][name] ** 2 <= errs["r.5"][name] ** 2 + 0.01 ** 2


def test_bitdelta_pack_is_sign_times_mean_abs(trained, tmp_path):
    base, (expert, _) = trained
    res = compress(str(base), str(expert), str(tmp_path / "bd"), PackSettings(scheme="bitdelta", embed_density=1.0))
    b, m = _tensors(base), _tensors(expert)
    ck = PackCheckpoint(str(tmp_path / "bd"), Checkpoint.open(str(base)))
    seen = 0
    for name, e in res.tensors.items():
        if e["module"] in ("attention", "mlp"):
            delta = (m[name] - b[name]).double()
            alpha = float(delta.abs().mean())
            assert e["kind"] == "sign" and e["scale"] == pytest.approx(alpha, rel=1e-6)
            expected = alpha * torch.where(delta >= 0, 1.0, -1.0).double()
            assert torch.allclose((ck.read(name, dtype=torch.float32) - b[name]).double(), expected, atol=1e-6)
            assert e["bytes"] == math.ceil(delta.numel() / 8) + 4
            seen += 1
    assert seen == 14  # 2 layers x (q, k, v, o, gate, up, down)


def test_graft_one_pack_rebuilds_and_two_packs_merge(trained, tmp_path):
    base, experts = trained
    packs = []
    for i, e in enumerate(experts):
        compress(str(base), str(e), str(tmp_path / f"p{i}"), PackSettings(attn_energy=0.95))
        packs.append(str(tmp_path / f"p{i}"))
    b = _tensors(base)
    bck = Checkpoint.open(str(base))
    deltas = [{n: PackCheckpoint(p, bck).delta(n) for n in b} for p in packs]
    graft(str(base), packs[:1], str(tmp_path / "one"))
    one = _tensors(tmp_path / "one")
    for n in b:
        assert torch.allclose(one[n], b[n] + deltas[0][n], atol=1e-6), n
    code, out, err = run_cli(["graft", base, *packs, "-o", tmp_path / "ta", "--method", "task_arithmetic",
                              "--weight", "0.7", "--weight", "0.4", "--set", "lambda=0.5"])
    assert code == 0, err
    ta = _tensors(tmp_path / "ta")
    for n in b:
        assert torch.allclose(ta[n], b[n] + 0.5 * (0.7 * deltas[0][n] + 0.4 * deltas[1][n]), atol=1e-6), n
    cfg = json.loads((tmp_path / "ta" / "config.json").read_text())
    assert cfg["model_type"] == "llama" and (tmp_path / "ta" / "tokenizer.json").exists()
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "ta"))
    assert model(torch.tensor([[0, 5, 7]])).logits.shape == (1, 3, cfg["vocab_size"])


def test_compress_cli_and_bad_inputs(trained, tmp_path, tiny_family, capsys):
    base, (expert, other) = trained
    code, out, err = run_cli(["compress", base, expert, "-o", tmp_path / "pack", "--scheme", "graft",
                              "--attn-energy", "0.9"], capsys)
    assert code == 0, err
    assert "bytes" in out and (tmp_path / "pack" / PACK_JSON).exists()
    # a model of another architecture (shapes differ): named tensor, nothing written
    code, out, err = run_cli(["compress", base, tiny_family[1][0], "-o", tmp_path / "bad"], capsys)
    assert code == 2 and "tensor '" in err and not (tmp_path / "bad").exists()
    for args, match in ((["--attn-energy", "1.5"], "--attn-energy"), (["--embed-density", "0"], "--embed-density"),
                        (["--attn-bands", "3:1"], "bit width"), (["--scheme", "zip"], "--scheme"),
                        (["--scheme", "lowrank"], "lowrank")):
        code, out, err = run_cli(["compress", base, expert, "-o", tmp_path / "bad", *args], capsys)
        assert code == 2 and match in err, (args, err)
        assert not (tmp_path / "bad").exists()
    # a pack grafted on a base it was not made against
    code, out, err = run_cli(["graft", other, tmp_path / "pack", "-o", tmp_path / "bad"], capsys)
    assert code == 2 and "base" in err and not (tmp_path / "bad").exists()
    code, out, err = run_cli(["graft", base, expert, "-o", tmp_path / "bad"], capsys)
    assert code == 2 and "not a SkillPack" in err
    # a pack is not a model folder
    with pytest.raises(MergeLabError, match="SkillPack"):
        Checkpoint.open(str(tmp_path / "pack"))
