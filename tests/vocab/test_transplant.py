"""``mergelab transplant-tokenizer`` (mergekit-tokensurgeon's orthogonal matching pursuit), issue 18."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from tests.conftest import run_cli
from tests.parity.mergekit_runner import load_tensors

EMBED = "model.embed_tokens.weight"


def test_omp_recovers_a_sparse_combination():
    from mergelab.vocab.transplant import omp

    g = torch.Generator().manual_seed(0)
    atoms = torch.randn(50, 64, generator=g)
    target = 0.5 * atoms[3] - 2.0 * atoms[17] + 1.25 * atoms[40]
    idx, c = omp(target[None], atoms, k=3)
    assert sorted(idx[0].tolist()) == [3, 17, 40]
    got = dict(zip(idx[0].tolist(), c[0].tolist()))
    assert got == pytest.approx({3: 0.5, 17: -2.0, 40: 1.25}, abs=1e-5)
    with pytest.raises(Exception, match="needs at least 51 shared tokens"):
        omp(target[None], atoms, k=51)


def test_transplant_copies_shared_rows_and_reconstructs_a_combination(token_experts, tmp_path, capsys):
    """MODEL is the base; DONOR is the ``rev`` expert with its embedding mapped by an invertible W
    (D = E W) and ``<rev>``'s row set to an exact combination of shared tokens' rows in that space, so
    its transplanted row must be the same combination of MODEL's rows."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    fam = token_experts
    base = load_tensors(fam["base"])
    e = base[EMBED]
    n, h = e.shape
    donor = tmp_path / "donor"
    shutil.copytree(fam["rev"], donor)
    d = load_tensors(donor)
    g = torch.Generator().manual_seed(1)
    w = torch.randn(h, h, generator=g) / h ** 0.5 + torch.eye(h)
    tok = AutoTokenizer.from_pretrained(str(donor))
    a, b, c = 50, 120, 200  # three shared tokens
    combo = 0.5 * e[a] - 2.0 * e[b] + e[c]
    d[EMBED] = torch.cat([e @ w, (combo @ w)[None]])
    save_file(d, str(donor / "model.safetensors"), metadata={"format": "pt"})

    out = tmp_path / "out"
    code, stdout, stderr = run_cli(["transplant-tokenizer", fam["base"], "--donor", donor, "-o", out, "--k", str(h)],
                                   capsys)
    assert code == 0, stdout + stderr
    assert f"{n} tokens copied, 1 approximated" in " ".join(stdout.split())
    t = load_tensors(out)
    assert "lm_head.weight" not in t and t[EMBED].shape == (n + 1, h)  # tied stays tied
    assert torch.equal(t[EMBED][:n], e)  # every shared token: MODEL's row, exactly
    torch.testing.assert_close(t[EMBED][n], combo, rtol=0, atol=1e-4)
    assert all(torch.equal(t[k], base[k]) for k in base if k != EMBED)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["vocab_size"] == n + 1 and cfg["tie_word_embeddings"] is True
    out_tok = AutoTokenizer.from_pretrained(str(out))
    assert out_tok.get_vocab() == tok.get_vocab()
    model = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    ids = out_tok(["<rev> abc ->"], return_tensors="pt").input_ids
    gen = model.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=out_tok.pad_token_id)
    assert gen.shape[1] == ids.shape[1] + 3


def test_transplant_bad_input(token_experts, tmp_path, capsys):
    fam = token_experts
    notok = tmp_path / "no_tokenizer"
    notok.mkdir()
    for f in fam["rev"].iterdir():
        if not f.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy2(f, notok / f.name)
    for name, args, words in (
        ("no_tok", [fam["base"], "--donor", notok], ["the donor", "has no tokenizer", str(notok)]),
        ("big_k", [fam["base"], "--donor", fam["rev"], "--k", "100000"], ["--k 100000 is more than the"]),
    ):
        out = tmp_path / name
        code, stdout, stderr = run_cli(["transplant-tokenizer", *args, "-o", out], capsys)
        text = " ".join((stdout + stderr).split())
        assert code == 2 and text.startswith("error:") and "Traceback" not in text, text
        assert all(w in text for w in words), (words, text)
        assert not out.exists() and not Path(str(out) + ".partial").exists()
