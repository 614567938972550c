"""``tokenizer_source`` against mergekit 0.1.5 on the trained experts with added tokens (issue 18).

mergekit orders the union's appended tokens by ``set`` order, mergelab by the recipe's, so the
vocabulary tensors are compared row by row **by token string** (padding rows by index); every other
tensor must be bit-equal, and both outputs' tokenizers must hold the same tokens.
"""

from __future__ import annotations

import json

import pytest
import torch

from tests.conftest import run_cli
from tests.parity.mergekit_runner import NEEDS_MERGEKIT, load_tensors, run_configs, write_configs
from tests.vocab.conftest import token_in_base_family

pytestmark = NEEDS_MERGEKIT

VOCAB = ("model.embed_tokens.weight", "lm_head.weight")


def _config(fam, method="task_arithmetic", **extra):
    params = {"weight": 0.7} if method != "ties" else {"weight": 0.7, "density": 0.6}
    return {"merge_method": method, "base_model": str(fam["base"]), "dtype": "float32",
            "models": [{"model": str(fam[e]), "parameters": dict(params)} for e in ("calc", "rev")], **extra}


def test_tokenizer_sources_give_mergekits_rows(token_experts, untied_token_experts, tmp_path, capsys):
    from transformers import AutoTokenizer

    tied, untied = token_experts, untied_token_experts
    linear = _config(untied, "linear", tokenizer_source="union")
    del linear["base_model"]  # no base: tokens only some models have take the mean (mergekit's rule)
    cases = {  # one mergekit process for all
        "tied_union": _config(tied, tokenizer_source="union"),
        "tied_base": _config(tied, tokenizer_source="base"),
        "tied_union_pad": _config(tied, tokenizer={"source": "union", "pad_to_multiple_of": 64}),
        "untied_union": _config(untied, tokenizer_source="union"),
        "untied_union_linear_no_base": linear,
        "untied_model": _config(untied, tokenizer_source=str(untied["rev"])),
        # the base has a token one model lacks: mergekit's rule is missing_tokens: base
        "tied_token_in_base": {**_config(tied, tokenizer_source="union"), "base_model": str(tied["calc"]),
                               "models": [{"model": str(m), "parameters": {"weight": 0.7}}
                                          for m in (tied["rev"], token_in_base_family(tied, tmp_path)["calc2"])]},
    }
    shared = AutoTokenizer.from_pretrained(str(tied["base"])).convert_ids_to_tokens(100)
    cases["tied_union_tokens"] = _config(tied, tokenizer={"source": "union", "tokens": {  # mergekit's per-token sources
        "<calc>": {"source": {"kind": "zero"}},
        "<rev>": {"source": {"kind": "model_token", "model": str(tied["base"]), "token_id": 7}, "force": True},
        "<new>": {"source": {"kind": "model_token", "model": str(tied["rev"]), "token": "<rev>"}},
        shared: {"source": {"kind": "zero"}}}})
    # (with source: base, mergekit adds the tokens to the base's own tokenizer object and then fails on the
    # base's permutation, KeyError; mergelab adds them to a copy: not comparable, so union here)
    cases["untied_union_tokens"] = _config(untied, tokenizer={"source": "union", "tokens": {
        "<calc>": {"source": str(untied["calc"])},
        shared: {"source": {"kind": "model_token", "model": str(untied["rev"]), "token": "<rev>"}, "force": True}}})
    paths = write_configs(cases, tmp_path)
    run_configs(paths, tmp_path, threads=torch.get_num_threads())
    for case, path in paths.items():
        out_ml, out_mk = tmp_path / "mergelab" / case, tmp_path / "mergekit" / case
        code, stdout, stderr = run_cli(["merge", path, "-o", out_ml, "--quiet"], capsys)
        assert code == 0, f"{case}: {stdout}\n{stderr}"
        mk, ml = load_tensors(out_mk), load_tensors(out_ml)
        assert sorted(mk) == sorted(ml), case
        tok_mk = AutoTokenizer.from_pretrained(str(out_mk)).get_vocab()
        tok_ml = AutoTokenizer.from_pretrained(str(out_ml)).get_vocab()
        assert set(tok_mk) == set(tok_ml), (case, set(tok_mk) ^ set(tok_ml))
        cfg_mk, cfg_ml = (json.loads((o / "config.json").read_text()) for o in (out_mk, out_ml))
        assert cfg_mk["vocab_size"] == cfg_ml["vocab_size"], case
        for name in mk:
            a, b = mk[name], ml[name]
            assert a.shape == b.shape and a.dtype == b.dtype, (case, name, a.shape, b.shape)
            if name not in VOCAB:
                assert torch.equal(a, b), (case, name)
                continue
            ids_mk = torch.tensor([tok_mk[t] for t in tok_mk])
            ids_ml = torch.tensor([tok_ml[t] for t in tok_mk])
            assert torch.equal(a[ids_mk], b[ids_ml]), (case, name, (a[ids_mk] - b[ids_ml]).abs().max())
            pad = torch.ones(a.shape[0], dtype=torch.bool)
            pad[ids_mk] = False
            # padding rows: mean rows computed in another order, to float32 rounding
            torch.testing.assert_close(a[pad], b[pad], rtol=0, atol=1e-6)
