"""``mergelab extract`` on really trained tiny Llama experts: PEFT loads the adapter on the real base;
full rank reproduces the expert; reported ranks and errors equal an independent numpy SVD; bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from mergelab.compress.extract import extract
from mergelab.errors import MergeLabError
from mergelab.io.checkpoint import Checkpoint
from tests.conftest import run_cli

peft = pytest.importorskip("peft")


def _merged_state(base, adapter):
    from transformers import AutoModelForCausalLM

    model = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(base)), str(adapter))
    return model, {k: v.detach() for k, v in model.merge_and_unload().state_dict().items()}


def _np_delta(base, expert, name, transpose=False):
    b, m = Checkpoint.open(str(base)), Checkpoint.open(str(expert))
    d = (m.read(name, dtype=torch.float32) - b.read(name, dtype=torch.float32)).double().numpy()
    return d.T if transpose else d


def test_full_rank_adapter_reproduces_the_expert_in_peft(trained, tmp_path):
    from transformers import AutoModelForCausalLM

    base, (expert, _) = trained
    res = extract(str(base), str(expert), str(tmp_path / "ad"), rank=10_000)
    model, merged = _merged_state(base, tmp_path / "ad")
    ft = AutoModelForCausalLM.from_pretrained(str(expert)).state_dict()
    assert set(merged) == set(ft)
    for k in ft:
        assert torch.allclose(merged[k], ft[k], atol=1e-6, rtol=0), k
    assert all(e["rank"] == e["full_rank"] and e["rel_error"] < 1e-5 for e in res.modules.values())
    cfg = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["use_rslora"] is False and cfg["lora_alpha"] == cfg["r"]
    assert "model.embed_tokens" in cfg["modules_to_save"] and cfg["ensure_weight_tying"] is True
    assert len(res.modules) == 14  # 2 layers x (q, k, v, o, gate, up, down)


def test_rank_and_energy_errors_equal_an_independent_svd(trained, tmp_path):
    base, (expert, _) = trained
    res = extract(str(base), str(expert), str(tmp_path / "r4"), rank=4, embeddings="skip")
    report = json.loads((tmp_path / "r4" / "mergelab.json").read_text())
    assert report["modules"] == json.loads(json.dumps(res.modules))
    assert "model.embed_tokens.weight" in report["skipped"] and "model.embed_tokens" not in report["modules_to_save"]
    for module, e in res.modules.items():
        s = np.linalg.svd(_np_delta(base, expert, module + ".weight"), compute_uv=False)
        assert e["rank"] == 4
        assert e["rel_error"] == pytest.approx(np.sqrt((s[4:] ** 2).sum() / (s ** 2).sum()), rel=1e-4, abs=1e-6)
    # PEFT's merged weight is base + the rank-4 truncation
    _, merged = _merged_state(base, tmp_path / "r4")
    q = "model.layers.1.self_attn.q_proj"
    d = _np_delta(base, expert, q + ".weight")
    u, s, vh = np.linalg.svd(d)
    trunc = (u[:, :4] * s[:4]) @ vh[:4]
    b = Checkpoint.open(str(base)).read(q + ".weight", dtype=torch.float32).double().numpy()
    assert np.abs(merged[q + ".weight"].double().numpy() - (b + trunc)).max() < 1e-5
    # embeddings skipped: PEFT's model keeps the base's
    assert torch.equal(merged["model.embed_tokens.weight"], Checkpoint.open(str(base)).read("model.embed_tokens.weight"))

    res = extract(str(base), str(expert), str(tmp_path / "e"), energy=0.8)
    cfg = json.loads((tmp_path / "e" / "adapter_config.json").read_text())
    ranks = {}
    for module, e in res.modules.items():
        s = np.linalg.svd(_np_delta(base, expert, module + ".weight"), compute_uv=False)
        cum = np.cumsum(s ** 2) / (s ** 2).sum()
        ranks[module] = int(np.searchsorted(cum, 0.8) + 1)
        assert e["rank"] == ranks[module], module
    assert cfg["r"] == max(ranks.values())
    assert cfg["rank_pattern"] == {m: r for m, r in ranks.items() if r != cfg["r"]}
    assert cfg["alpha_pattern"] == cfg["rank_pattern"]  # alpha = r: scaling 1
    _merged_state(base, tmp_path / "e")  # PEFT loads the per-module ranks


def test_embeddings_as_lora_and_cli(trained, tmp_path, capsys):
    base, (expert, _) = trained
    code, out, err = run_cli(["extract", base, expert, "-o", tmp_path / "ad", "--rank", "1000",
                              "--embeddings", "lora"], capsys)
    assert code == 0, err
    assert "model.embed_tokens: embedding, rank" in out and "mergelab.json" in out
    from transformers import AutoModelForCausalLM

    model = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(base)), str(tmp_path / "ad"))
    ids = torch.tensor([[0, 5, 9, 17, 3]])
    with torch.no_grad():  # unmerged forward: the tied head follows the embedding's LoRA
        got = model(ids).logits
        want = AutoModelForCausalLM.from_pretrained(str(expert))(ids).logits
    assert torch.allclose(got, want, atol=1e-4)
    # (PEFT's merge_and_unload would apply the shared delta twice to the tied weight: its own warning)


@pytest.mark.parametrize("policy,said", [("dense", "model.embed_tokens: embedding, kept dense (modules_to_save)"),
                                         ("skip", "model.embed_tokens: embedding, changed, skipped")])
def test_embedding_policy_is_said_in_the_output(trained, tmp_path, capsys, policy, said):
    """Issue 16 item 4: what happened to the (tied) embedding is printed, and recorded in mergelab.json."""
    base, (expert, _) = trained
    code, out, err = run_cli(["extract", base, expert, "-o", tmp_path / "ad", "--rank", "2", "--embeddings", policy],
                             capsys)
    assert code == 0, err
    assert said in " ".join(out.split())
    report = json.loads((tmp_path / "ad" / "mergelab.json").read_text())
    if policy == "dense":
        assert "model.embed_tokens" in report["modules_to_save"] and report["skipped"] == []
    else:
        assert "model.embed_tokens.weight" in report["skipped"]
        assert "model.embed_tokens" not in report["modules_to_save"]


def test_bad_inputs_are_clear_and_write_nothing(trained, tiny_family, tmp_path, capsys):
    base, (expert, _) = trained
    bad = tmp_path / "bad"
    cases = [
        (["--rank", "0"], "--rank"), (["--rank", "-3"], "--rank"), (["--energy", "0"], "--energy"),
        (["--energy", "1.5"], "--energy"), ([], "exactly one"), (["--rank", "2", "--energy", "0.5"], "exactly one"),
        (["--rank", "2", "--embeddings", "maybe"], "--embeddings"),
    ]
    for args, match in cases:
        code, out, err = run_cli(["extract", base, expert, "-o", bad, *args], capsys)
        assert code == 2 and match in err and "Traceback" not in err, (args, err)
        assert not bad.exists()
    code, out, err = run_cli(["extract", base, tiny_family[1][0], "-o", bad, "--rank", "2"], capsys)
    assert code == 2 and "tensor '" in err and not bad.exists()
    code, out, err = run_cli(["extract", base, base, "-o", bad, "--rank", "2"], capsys)
    assert code == 2 and "nothing to extract" in err and not bad.exists()
    with pytest.raises(MergeLabError, match="exists"):
        extract(str(base), str(expert), str(tmp_path), rank=2)


def test_extracted_adapter_is_a_mergelab_input(trained, tmp_path):
    """``extract`` output on a tied-embedding model (embedding kept dense, PEFT's head copy saved too) works
    as ``BASE+ADAPTER`` in a recipe: at full rank the adapted model is the expert."""
    from mergelab.io.adapted import open_model

    base, (expert, _) = trained
    extract(str(base), str(expert), str(tmp_path / "ad"), rank=10_000)
    adapted = open_model(f"{base}+{tmp_path / 'ad'}")
    ft = Checkpoint.open(str(expert))
    assert set(adapted.tensors) == set(ft.tensors)
    for name in ft.tensors:
        assert torch.allclose(adapted.read(name, dtype=torch.float32), ft.read(name, dtype=torch.float32),
                              atol=1e-6, rtol=0), name
