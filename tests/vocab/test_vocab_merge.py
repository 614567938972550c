"""``tokenizer_source: base | union | MODEL`` on tiny trained Llama experts that added task tokens (issue 18).

The invariant of the issue: on prompts made only of shared tokens, the merge with the added tokens
gives the logits of the same merge done without them (experts stripped of their added rows), and
every tensor but the vocabulary ones is bit-equal to it. Row rules are checked against oracles
written here from mergekit 0.1.5's ``PermutedVocabulary`` rules.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from tests.conftest import run_cli
from tests.parity.mergekit_runner import load_tensors

EMBED = "model.embed_tokens.weight"
HEAD = "lm_head.weight"
PROMPTS = ["12 + 7 = 19", "hello world merge model"]


def _recipe(tmp_path: Path, fam: dict, name: str, experts=("calc", "rev"), **extra) -> Path:
    recipe = {"merge_method": "task_arithmetic", "base_model": str(fam["base"]), "dtype": "float32",
              "models": [{"model": str(fam[e]), "parameters": {"weight": 0.7}} for e in experts], **extra}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def _merge(tmp_path, fam, name, capsys, **extra) -> Path:
    out = tmp_path / name
    code, stdout, stderr = run_cli(["merge", _recipe(tmp_path, fam, name, **extra), "-o", out, "--quiet"], capsys)
    assert code == 0, f"{name}: exit {code}\n{stdout}\n{stderr}"
    return out


def _logits(folder: Path, tok_folder: Path) -> torch.Tensor:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tok_folder))
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    batch = tok(PROMPTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        return model(**batch).logits


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_union_on_shared_tokens_equals_the_merge_without_added_tokens(tied, request, tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    fam = request.getfixturevalue("token_experts" if tied else "untied_token_experts")
    union = _merge(tmp_path, fam, "union", capsys, tokenizer_source="union")
    plain = _merge(tmp_path, fam, "plain", capsys, experts=("calc_stripped", "rev_stripped"))
    base_tok = AutoTokenizer.from_pretrained(str(fam["base"]))
    n = len(base_tok)
    tok = AutoTokenizer.from_pretrained(str(union))
    assert len(tok) == n + 2 and tok.convert_tokens_to_ids(["<calc>", "<rev>"]) == [n, n + 1]
    assert all(tok.convert_tokens_to_ids(t) == i for t, i in base_tok.get_vocab().items())
    assert json.loads((union / "config.json").read_text())["vocab_size"] == n + 2
    u, p = load_tensors(union), load_tensors(plain)
    vocab_names = [EMBED] + ([] if tied else [HEAD])
    assert (HEAD in u) is (not tied) and sorted(u) == sorted(p)
    for k in u:
        if k in vocab_names:
            assert u[k].shape[0] == n + 2 and torch.equal(u[k][:n], p[k]), k
        else:
            assert torch.equal(u[k], p[k]), k
    # A token one expert added is in no other model: every input gets that expert's row, and a task
    # arithmetic of equal rows returns it exactly (mergekit's rule: "present in exactly one model").
    for name, token, row in (("calc", "<calc>", n), ("rev", "<rev>", n + 1)):
        e = load_tensors(fam[name])
        for k in vocab_names:
            assert torch.equal(u[k][row], e[k][n]), (k, token)
    lu, lp = _logits(union, union), _logits(plain, fam["base"])
    assert lu.shape[-1] == n + 2 and lp.shape[-1] == n
    torch.testing.assert_close(lu[..., :n], lp, rtol=0, atol=1e-5)
    model = AutoModelForCausalLM.from_pretrained(str(union), dtype=torch.float32).eval()
    ids = tok(["<calc> 12 + 7 ="], return_tensors="pt").input_ids
    assert ids[0, 1].item() == n  # the added token is one token of the output tokenizer
    gen = model.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=tok.pad_token_id)
    assert gen.shape[1] == ids.shape[1] + 3
    manifest = json.loads((union / "mergelab.json").read_text())
    assert manifest["vocabulary"]["rows"] == n + 2 and manifest["config_updates"]["vocab_size"] == n + 2


def test_base_and_model_sources(token_experts, tmp_path, capsys):
    from transformers import AutoTokenizer

    fam = token_experts
    n = len(AutoTokenizer.from_pretrained(str(fam["base"])))
    # base: the experts' added rows are dropped; the result is the stripped merge, bit for bit
    base = _merge(tmp_path, fam, "base_src", capsys, tokenizer_source="base")
    plain = _merge(tmp_path, fam, "plain", capsys, experts=("calc_stripped", "rev_stripped"))
    b, p = load_tensors(base), load_tensors(plain)
    assert sorted(b) == sorted(p) and all(torch.equal(b[k], p[k]) for k in b)
    assert len(AutoTokenizer.from_pretrained(str(base))) == n
    # MODEL: calc's tokenizer; <calc> is calc's row, rev's <rev> is gone
    calc = _merge(tmp_path, fam, "calc_src", capsys, tokenizer_source=str(fam["calc"]))
    c, e = load_tensors(calc), load_tensors(fam["calc"])
    tok = AutoTokenizer.from_pretrained(str(calc))
    assert len(tok) == n + 1 and "<rev>" not in tok.get_vocab()
    assert c[EMBED].shape[0] == n + 1 and torch.equal(c[EMBED][:n], p[EMBED]) and torch.equal(c[EMBED][n], e[EMBED][n])
    # tokenizer: {pad_to_multiple_of} rounds the rows up; padding rows get the mean token row (mergekit)
    padded = _merge(tmp_path, fam, "padded", capsys, tokenizer={"source": "union", "pad_to_multiple_of": 64})
    d = load_tensors(padded)
    rows = -(-(n + 2) // 64) * 64
    assert d[EMBED].shape[0] == rows and json.loads((padded / "config.json").read_text())["vocab_size"] == rows
    assert len(AutoTokenizer.from_pretrained(str(padded))) == n + 2
    # every input's padding rows are its own mean token row; task arithmetic of those
    ins = [load_tensors(fam[k])[EMBED] for k in ("base", "calc", "rev")]
    aligned = []
    for i, t in enumerate(ins):
        calc_row = ins[1][n] if i != 1 else t[n]
        rev_row = ins[2][n] if i != 2 else t[n]
        full = torch.cat([t[:n], calc_row[None], rev_row[None]])
        aligned.append(torch.cat([full, full.mean(0, keepdim=True).expand(rows - n - 2, -1)]))
    expect = aligned[0] + 0.7 * (aligned[1] - aligned[0]) + 0.7 * (aligned[2] - aligned[0])
    torch.testing.assert_close(d[EMBED], expect, rtol=0, atol=1e-6)


def test_missing_tokens_rules():
    """A token some models lack: ``base`` (mergekit's) and ``mean``, against rows written by hand."""
    from mergelab.vocab import OutputVocab, aligned_rows

    # output ids: 0 all three; 1 base+m1; 2 m1+m2; 3 m2 only; 4 nobody; 5 padding
    perms = [torch.tensor([0, 1, -1, -1, -1, -1]), torch.tensor([1, 0, 2, -1, -1, -1]),
             torch.tensor([0, -1, 1, 2, -1, -1])]
    mask = torch.tensor([True, True, True, True, True, False])
    out = OutputVocab("union", None, {}, 6, perms, mask, [2, 3, 3], None)
    x = [torch.tensor([[1., 2.], [3., 4.]]), torch.tensor([[5., 6.], [7., 8.], [9., 10.]]),
         torch.tensor([[11., 12.], [13., 14.], [15., 16.]])]
    for rule in ("base", "mean"):
        r = aligned_rows(out, x, base=0, missing_tokens=rule)
        assert torch.equal(r[0][0], x[0][0]) and torch.equal(r[1][0], x[1][1]) and torch.equal(r[2][0], x[2][0])
        assert torch.equal(r[1][1], x[1][0]) and torch.equal(r[0][1], x[0][1])
        fill1 = x[0][1] if rule == "base" else (x[0][1] + x[1][0]) / 2
        assert torch.equal(r[2][1], fill1)
        fill2 = (x[1][2] + x[2][1]) / 2  # the base lacks it: the mean either way
        assert torch.equal(r[0][2], fill2) and torch.equal(r[1][2], x[1][2]) and torch.equal(r[2][2], x[2][1])
        assert all(torch.equal(m[3], x[2][2]) for m in r)  # one model has it: its row everywhere
        assert all(torch.equal(m[4], torch.zeros(2)) for m in r)
        assert all(torch.allclose(m[5], m[:5].mean(0)) for m in r)


def test_bad_vocabulary_inputs_are_clear_errors(token_experts, tmp_path, capsys):
    fam = dict(token_experts)
    notok = tmp_path / "rev_no_tokenizer"
    notok.mkdir()
    for f in fam["rev"].iterdir():
        if not f.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy2(f, notok / f.name)
    fam["rev_no_tok"] = notok
    cases = {
        "union_missing": (dict(experts=("calc", "rev_no_tok"), tokenizer_source="union"),
                          ["tokenizer_source: union needs every model's tokenizer", str(notok)]),
        "base_rows_differ": (dict(experts=("calc", "rev_no_tok"), tokenizer_source="base"),
                             ["has no tokenizer and", "embedding rows", str(notok)]),
        "not_a_model": (dict(tokenizer_source=str(tmp_path / "elsewhere")),
                        ["tokenizer_source:", "is not 'base', 'union' or one of the recipe's models"]),
        "tokens_block": (dict(tokenizer={"source": "union", "tokens": {"<x>": {"source": str(fam["calc"])}}}),
                         ["tokenizer.tokens['<x>']", "does not have the token"]),
    }
    for name, (extra, words) in cases.items():
        out = tmp_path / name
        code, stdout, stderr = run_cli(["merge", _recipe(tmp_path, fam, name, **extra), "-o", out], capsys)
        text = " ".join((stdout + stderr).split())
        assert code == 2 and text.startswith("error:") and "Traceback" not in text, (name, text)
        for w in words:
            assert w in text, (name, w, text)
        assert not out.exists() and not Path(str(out) + ".partial").exists(), name


def test_a_padded_vocabulary_keeps_its_rows(token_experts, tmp_path, capsys):
    """mergekit #425: an embedding padded beyond its tokenizer (Qwen2.5: 152064 rows, 151665 tokens) must not
    be cut to the tokenizer's length. Base and experts padded to 320 rows for 300 tokens: ``base`` keeps
    320 rows, and so does ``union`` (whose two added tokens take ids 300 and 301 inside the padding)."""
    from safetensors.torch import save_file

    fam = dict(token_experts)
    n = load_tensors(fam["base"])[EMBED].shape[0]
    for name in ("base", "calc_stripped", "rev_stripped"):
        folder = tmp_path / f"{name}_padded"
        shutil.copytree(fam[name], folder)
        t = load_tensors(folder)
        g = torch.Generator().manual_seed(len(name))
        t[EMBED] = torch.cat([t[EMBED], torch.randn(20, t[EMBED].shape[1], generator=g)])
        save_file(t, str(folder / "model.safetensors"), metadata={"format": "pt"})
        cfg = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**cfg, "vocab_size": n + 20}))
        fam[f"{name}_padded"] = folder
    padded = {"base": fam["base_padded"], "calc": fam["calc_stripped_padded"], "rev": fam["rev_stripped_padded"]}
    out = _merge(tmp_path, padded, "base_padded_src", capsys, tokenizer_source="base")
    assert load_tensors(out)[EMBED].shape[0] == n + 20
    assert json.loads((out / "config.json").read_text())["vocab_size"] == n + 20
    mixed = {"base": fam["base_padded"], "calc": fam["calc"], "rev": fam["rev_stripped_padded"]}
    out = _merge(tmp_path, mixed, "union_padded", capsys, tokenizer_source="union")
    u, calc = load_tensors(out), load_tensors(fam["calc"])
    assert u[EMBED].shape[0] == n + 20 and torch.equal(u[EMBED][n], calc[EMBED][n])


@pytest.mark.parametrize("rule", ["base", "mean"])
def test_missing_tokens_rule_end_to_end(rule, token_experts, tmp_path, capsys):
    """``<calc>`` is in the base and ``calc2`` but not ``rev``: ``rev`` gets the base's row (``base``) or the
    mean of the base's and calc2's (``mean``); task arithmetic then gives b + w(r - b) + w(c2 - b)."""
    from tests.vocab.conftest import token_in_base_family

    fam = token_in_base_family(token_experts, tmp_path)
    extra = {"tokenizer_source": "union", **({"missing_tokens": rule} if rule == "mean" else {})}
    out = _merge(tmp_path, fam, f"rule_{rule}", capsys, experts=("rev", "calc2"), **extra)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(out))
    i = tok.convert_tokens_to_ids("<calc>")
    b = load_tensors(fam["base"])[EMBED][-1]
    c2 = load_tensors(fam["calc2"])[EMBED][-1]
    r = b if rule == "base" else (b + c2) / 2
    expect = b + 0.7 * (r - b) + 0.7 * (c2 - b)
    torch.testing.assert_close(load_tensors(out)[EMBED][i], expect, rtol=0, atol=1e-6)
    assert json.loads((out / "mergelab.json").read_text())["vocabulary"]["missing_tokens"] == rule


def test_rows_are_matched_by_token_string_not_by_index(token_experts, tmp_path, capsys):
    """``rev`` re-saved with a tokenizer that gives four shared tokens other ids, its embedding rows moved
    with them (the same model): a ``union`` merge with it is bit for bit the merge with the original ``rev``.
    Matching rows by index would mix the swapped tokens' rows."""
    from safetensors.torch import save_file
    from transformers import AutoTokenizer

    fam = dict(token_experts)
    shuffled = tmp_path / "rev_shuffled"
    shutil.copytree(fam["rev"], shuffled)
    tj = json.loads((shuffled / "tokenizer.json").read_text())
    vocab = tj["model"]["vocab"]
    added = {t["content"] for t in tj.get("added_tokens", [])}
    tok = AutoTokenizer.from_pretrained(str(fam["rev"]))
    used = [i for i in dict.fromkeys(tok(PROMPTS[1]).input_ids) if tok.convert_ids_to_tokens(i) not in added][:2]
    others = [i for t, i in sorted(vocab.items(), key=lambda kv: -kv[1]) if t not in added and i not in used][:2]
    perm = list(range(load_tensors(fam["rev"])[EMBED].shape[0]))  # new id -> old id
    for i, j in zip(used, others):
        perm[i], perm[j] = j, i
    by_id = {i: t for t, i in vocab.items()}
    for new, old in enumerate(perm):
        if old in by_id and new != old:
            vocab[by_id[old]] = new
    (shuffled / "tokenizer.json").write_text(json.dumps(tj))
    state = load_tensors(fam["rev"])
    state[EMBED] = state[EMBED][torch.tensor(perm)].contiguous()
    save_file(state, str(shuffled / "model.safetensors"), metadata={"format": "pt"})
    new_ids = AutoTokenizer.from_pretrained(str(shuffled))(PROMPTS[1]).input_ids
    assert new_ids != tok(PROMPTS[1]).input_ids and [perm[i] for i in new_ids] == tok(PROMPTS[1]).input_ids
    fam["rev_shuffled"] = shuffled
    want = load_tensors(_merge(tmp_path, fam, "union_rev", capsys, tokenizer_source="union"))
    got = load_tensors(_merge(tmp_path, fam, "union_shuffled", capsys, experts=("calc", "rev_shuffled"),
                              tokenizer_source="union"))
    assert sorted(got) == sorted(want) and all(torch.equal(got[k], want[k]) for k in want)
    # without a tokenizer source the rows are merged by index, and the swapped tokens' rows come out mixed
    by_index = load_tensors(_merge(tmp_path, fam, "by_index", capsys, experts=("calc", "rev_shuffled"),
                                   vocab_policy="common_submatrix"))
    assert not torch.equal(by_index[EMBED][used], want[EMBED][used])
