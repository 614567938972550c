"""mergekit's ``tokenizer: {tokens: ...}`` (per-token embedding sources; mergekit 0.1.5 ``PermutedVocabulary``)
on the tiny trained experts that added ``<calc>`` and ``<rev>``. Oracles written here from mergekit's
rules: a configured token keeps every model's own row when all have it and ``force`` is off; otherwise the
models lacking it (with ``force``: all of them) take the source's row (zero, a model's row of the token, or
a model's row of another token by string or id); a token no tokenizer has is added to the output
tokenizer. Every other row is the plain ``union`` merge's, bit for bit."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import yaml

from tests.conftest import run_cli
from tests.parity.mergekit_runner import load_tensors

EMBED = "model.embed_tokens.weight"
W = 0.7


def _merge(tmp_path, fam, name, capsys, **extra):
    recipe = {"merge_method": "task_arithmetic", "base_model": str(fam["base"]), "dtype": "float32",
              "models": [{"model": str(fam[e]), "parameters": {"weight": W}} for e in ("calc", "rev")], **extra}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return run_cli(["merge", path, "-o", tmp_path / name, "--quiet"], capsys)


def test_token_sources_follow_mergekits_rules(token_experts, tmp_path, capsys):
    from transformers import AutoTokenizer

    fam = token_experts
    n = len(AutoTokenizer.from_pretrained(str(fam["base"])))
    base, calc, rev = (load_tensors(fam[k])[EMBED] for k in ("base", "calc", "rev"))
    hello = 100
    shared = AutoTokenizer.from_pretrained(str(fam["base"])).convert_ids_to_tokens(hello)  # a token all models have
    tokens = {
        "<calc>": {"source": {"kind": "zero"}},                                           # base and rev lack it
        "<rev>": {"source": {"kind": "model_token", "model": str(fam["base"]), "token_id": 7}, "force": True},
        "<new>": {"source": {"kind": "model_token", "model": str(fam["rev"]), "token": "<rev>"}},  # in no model
        shared: {"source": {"kind": "zero"}},                             # every model has it, no force: own rows
    }
    code, out, err = _merge(tmp_path, fam, "tokens", capsys, tokenizer={"source": "union", "tokens": tokens})
    assert code == 0, err
    code, out, err = _merge(tmp_path, fam, "plain", capsys, tokenizer_source="union")
    assert code == 0, err
    got, plain = load_tensors(tmp_path / "tokens")[EMBED], load_tensors(tmp_path / "plain")[EMBED]
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "tokens"))
    assert tok.convert_tokens_to_ids(["<calc>", "<rev>", "<new>"]) == [n, n + 1, n + 2] and got.shape[0] == n + 3
    assert json.loads((tmp_path / "tokens" / "config.json").read_text())["vocab_size"] == n + 3

    def ta(b, c, r):  # task arithmetic of the three models' rows for one token
        return b + W * (c - b) + W * (r - b)

    zero = torch.zeros_like(base[0])
    torch.testing.assert_close(got[n], ta(zero, calc[n], zero), rtol=0, atol=1e-6)  # calc keeps its own
    assert torch.equal(got[n + 1], base[7])     # forced: every model takes base's row 7
    assert torch.equal(got[n + 2], rev[n])      # no model has it: all take rev's <rev> row
    assert torch.equal(got[:n], plain[:n])      # `shared` (configured, all have it) and the rest: unchanged
    assert torch.equal(got[hello], plain[hello]) and not torch.equal(got[hello], zero)
    record = json.loads((tmp_path / "tokens" / "mergelab.json").read_text())["vocabulary"]
    assert record["token_rules"]["<rev>"] == {"source": {"kind": "model_token", "model": str(fam["base"]),
                                                         "token_id": 7}, "force": True}
    assert record["tokens"] == n + 3  # the output tokenizer's size, kept beside the rules


def test_bad_token_sources_write_nothing(token_experts, tmp_path, capsys):
    fam = token_experts
    m = str(fam["calc"])
    cases = [
        ({"<x>": {"source": str(tmp_path / "elsewhere")}}, "is not one of the recipe's models"),
        ({"<x>": {"source": {"kind": "model_token", "model": m, "token": "a", "token_id": 3}}},
         "exactly one of 'token' and 'token_id'"),
        ({"<x>": {"source": {"kind": "model_token", "model": m, "token_id": 10**6}}}, "out of range for model"),
        ({"<x>": {"source": {"kind": "model_token", "model": m, "token": "<nope>"}}}, "is not in the vocabulary"),
        ({"<x>": {"source": {"kind": "mean"}}}, "expected a model path"),
        ({"<x>": {"force": True}}, "'source' is required"),
        ({"<x>": {"source": {"kind": "zero"}, "force": "yes"}}, "expected true or false"),
    ]
    for i, (tokens, needle) in enumerate(cases):
        out = tmp_path / f"bad{i}"
        code, stdout, stderr = _merge(tmp_path, fam, f"bad{i}", capsys, tokenizer={"source": "union", "tokens": tokens})
        text = " ".join((stdout + stderr).split())
        assert code == 2 and text.startswith("error:") and "Traceback" not in text, text
        assert needle in text, (needle, text)
        assert not out.exists() and not Path(str(out) + ".partial").exists()


def test_a_token_source_lacking_the_tensor_fails_at_planning(token_experts, untied_token_experts, tmp_path, capsys):
    """A token whose source model lacks a vocabulary tensor the merge reads (a tied model asked for an untied
    output's `lm_head` row) is refused at planning, naming the token, the model and the tensor; nothing is
    written at -o (the check used to run only while the merge was writing)."""
    tied, untied = token_experts, untied_token_experts
    # passthrough ignores base_model: the output (and its lm_head) is the untied expert's, the tied base is
    # only a token source
    recipe = {"merge_method": "passthrough", "base_model": str(tied["base"]), "dtype": "float32",
              "models": [{"model": str(untied["calc"])}],
              "tokenizer": {"source": "union", "tokens": {
                  "<x>": {"source": {"kind": "model_token", "model": str(tied["base"]), "token_id": 7}}}}}
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    out = tmp_path / "out"
    code, stdout, stderr = run_cli(["merge", path, "-o", out, "--quiet"], capsys)
    text = " ".join((stdout + stderr).split())
    assert code == 2 and "error:" in text and "Traceback" not in text, text
    assert f"tokenizer.tokens['<x>'] takes its row from model '{tied['base']}'" in text, text
    assert "no tensor 'lm_head.weight'" in text, text
    assert not out.exists() and not Path(str(out) + ".partial").exists()
    # planning (a dry run reads no tensor) finds it: before, only the merge's read of lm_head did
    code, stdout, stderr = run_cli(["merge", path, "-o", out, "--dry-run"], capsys)
    text = " ".join((stdout + stderr).split())
    assert code == 2 and "no tensor 'lm_head.weight' (its head is tied to its embedding)" in text, text
    assert not out.exists() and not Path(str(out) + ".partial").exists()
