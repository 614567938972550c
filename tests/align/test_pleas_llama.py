"""PLeaS for Llama-layout decoders on two tiny Llamas really trained from different random initialisations
with one tokenizer (GQA: 4 query heads on 2 KV heads; tied embeddings, as the llmmix bases ship them).

Oracles, independent of the code under test: at width 2n the merged MLP is both MLPs side by side, so its
gate and up weights are A's stacked on the permuted B's and its down weight is both halves over 2 (the
least squares are exact with more calibration tokens than 2n); a permuted copy of A merged at width n is A
(its logits, through transformers), also with its attention refitted; at attention_width 2 the attention is
both models' heads side by side with o_proj halved; widths outside [n, 2n], per layer, and a different tokenizer are refused
with nothing written."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import yaml

from tests.align.conftest import run_cli

HIDDEN, INTER = 32, 64


def _train(tok, blocks: torch.Tensor, seed: int, steps: int = 60):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                      tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(seed)  # each model its own data order
    for _ in range(steps):
        batch = blocks[torch.randint(len(blocks), (16,), generator=g)]
        loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval(), float(loss.detach())


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """Two tiny Llamas trained 60 steps each from seeds 0 and 1 on the llmmix training text (about 2 s
    each), the calibration texts (about 1,500 tokens: more than the 2n = 128 inputs of down_proj) and
    held-out texts."""
    from tests.llmmix.tiny_lm import make_tokenizer, training_text

    root = tmp_path_factory.mktemp("pleas-llama")
    tok = make_tokenizer(300)
    texts = training_text()
    ids = [i for t in texts[::2] for i in tok(t + "\n")["input_ids"]]
    blocks = torch.tensor(ids[: len(ids) // 33 * 33]).reshape(-1, 33)
    dirs = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for seed in (0, 1):
            model, loss = _train(tok, blocks, seed)
            assert loss < 4.0, loss  # trained: well below ln(300) = 5.7
            d = root / f"llama-{seed}"
            model.save_pretrained(d)
            tok.save_pretrained(d)
            dirs.append(d)
    finally:
        torch.set_num_threads(threads)
    calib = root / "calib.txt"
    calib.write_text("\n".join(t.replace("\n", " ") for t in texts[::2][:80]) + "\n")
    held = [t.replace("\n", " ") for t in texts[1::2][:20]]
    return dirs[0], dirs[1], calib, held


def _state(folder):
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def _spec(folder, state):
    from mergelab.align.spec import llama_spec

    return llama_spec(json.loads((folder / "config.json").read_text()), {k: tuple(v.shape) for k, v in state.items()})


def near(got, want, rel=1e-4) -> bool:
    err = float((got - want).abs().max())
    assert err <= rel * float(want.abs().max()), err
    return True


def _logits(folder, texts):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(folder))
    enc = tok(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        out = AutoModelForCausalLM.from_pretrained(str(folder)).eval()(input_ids=enc["input_ids"],
                                                                        attention_mask=enc["attention_mask"]).logits
    return out[enc["attention_mask"].bool()]


def test_width_two_is_both_mlps_side_by_side(pair, tmp_path):
    from transformers import AutoModelForCausalLM

    from mergelab.align.api import load_model, module_inputs
    from mergelab.align.pleas import write_folder
    from mergelab.align.pleas_llama import pleas_llama
    from mergelab.align.spec import apply_permutations

    a_dir, b_dir, calib, held = pair
    r = pleas_llama(a_dir, b_dir, calib, width=2.0, attention_width=2.0)
    assert r.width == 2 * INTER and r.merged_units == 0 and r.config["intermediate_size"] == 2 * INTER
    assert r.tokens > 2 * INTER and r.tokens > 2 * HIDDEN + 1
    assert r.config["num_key_value_heads"] == 4 and r.config["num_attention_heads"] == 8 and r.config["head_dim"] == 8
    sa, sb = _state(a_dir), _state(b_dir)
    sbp = apply_permutations(sb, _spec(a_dir, sa), r.perms)
    assert any(not torch.equal(p, torch.arange(len(p))) for p in r.perms.values())  # the seeds differ
    for i in range(2):
        p = f"model.layers.{i}.mlp."
        for k in ("gate_proj", "up_proj"):
            assert near(r.state[p + k + ".weight"], torch.cat([sa[p + k + ".weight"], sbp[p + k + ".weight"]]))
        k = p + "down_proj.weight"
        assert near(r.state[k], torch.cat([sa[k], sbp[k]], 1) / 2)
        # attention at 2 x num_key_value_heads: A's KV heads (with their query groups) then the permuted B's,
        # o_proj = [O_A, O_B] / 2
        a_ = f"model.layers.{i}.self_attn."
        for k in ("q_proj", "k_proj", "v_proj"):
            assert torch.equal(r.state[a_ + k + ".weight"], torch.cat([sa[a_ + k + ".weight"], sbp[a_ + k + ".weight"]]))
        assert near(r.state[a_ + "o_proj.weight"], torch.cat([sa[a_ + "o_proj.weight"], sbp[a_ + "o_proj.weight"]], 1) / 2)
    # on held-out tokens the merged MLP is the mean of both MLPs (SwiGLU computed here, not by the code)
    name = "layers.1.mlp"
    ia = module_inputs(load_model(a_dir, "A"), held, a_dir, [name])[name]
    ib = module_inputs(load_model(b_dir, "B"), held, a_dir, [name])[name]
    z = (ia + ib[:, r.perms["res"]]) / 2

    def mlp(st):
        w = {k: st[f"model.{name}.{k}.weight"].double() for k in ("gate_proj", "up_proj", "down_proj")}
        return (torch.nn.functional.silu(z @ w["gate_proj"].T) * (z @ w["up_proj"].T)) @ w["down_proj"].T

    assert near(mlp(r.state), (mlp(sa) + mlp(sbp)) / 2)
    write_folder(r, a_dir, tmp_path / "merged", overwrite=False)
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"))
    assert model.config.intermediate_size == 2 * INTER
    assert torch.equal(model.state_dict()["model.layers.0.mlp.up_proj.weight"],
                       r.state["model.layers.0.mlp.up_proj.weight"])
    assert json.loads((tmp_path / "merged" / "pleas.json").read_text())["merged_units_per_layer"] == 0
    # the merged attention module, run by transformers, is the mean of A's and the permuted B's on any input
    models = {"m": model.eval()}
    for key, state in (("a", sa), ("b", sbp)):
        models[key] = AutoModelForCausalLM.from_pretrained(str(a_dir)).eval()
        models[key].load_state_dict(state, strict=False)
    h = torch.randn(2, 7, HIDDEN, generator=torch.Generator().manual_seed(0))
    pos = torch.arange(7)[None].expand(2, -1)
    with torch.no_grad():
        att = {k: m.model.layers[1].self_attn(h, position_embeddings=m.model.rotary_emb(h, pos), attention_mask=None)[0]
               for k, m in models.items()}
    assert near(att["m"], (att["a"] + att["b"]) / 2)


def test_permuted_copy_at_width_one_is_the_model_cli(pair, tmp_path):
    from safetensors.torch import save_file

    from mergelab.align.spec import apply_permutations, random_permutations

    a_dir, _, calib, held = pair
    sa = _state(a_dir)
    spec = _spec(a_dir, sa)
    copy_dir = tmp_path / "permuted"
    shutil.copytree(a_dir, copy_dir)
    save_file(apply_permutations(sa, spec, random_permutations(spec, torch.Generator().manual_seed(5))),
              str(copy_dir / "model.safetensors"), metadata={"format": "pt"})
    recipe = tmp_path / "r.yml"
    recipe.write_text(yaml.safe_dump({"merge_method": "pleas", "calibration": str(calib),
                                      "parameters": {"width": 1.0, "attention_width": 1.0},
                                      "models": [{"model": str(a_dir)}, {"model": str(copy_dir)}]}))
    r = run_cli("pleas", recipe, "-o", tmp_path / "merged")
    assert r.returncode == 0, r.stderr
    assert "mlp.0 64 (64 merged)" in r.stdout
    cfg = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert cfg["intermediate_size"] == INTER and cfg["num_key_value_heads"] == 2  # attention refitted at 1 x heads
    want = _logits(a_dir, held)
    assert near(_logits(tmp_path / "merged", held), want)
    # a partial width through the CLI, B the other seed's model: 2n - 96 = 32 unit pairs merged. gate and up
    # are linear in the stream, so their least squares are exact at any width: the rows are the matched
    # pairs' averages, then A's remaining rows, then the permuted B's same rows.
    recipe.write_text(yaml.safe_dump({"merge_method": "pleas", "models": [str(a_dir), str(pair[1])],
                                      "calibration": str(calib), "parameters": {"width": 96}}))
    r = run_cli("pleas", recipe, "-o", tmp_path / "merged96")
    assert r.returncode == 0, r.stderr
    record = json.loads((tmp_path / "merged96" / "pleas.json").read_text())
    assert record["intermediate_size"] == 96 and record["merged_units_per_layer"] == 32
    sbp = apply_permutations(_state(pair[1]), spec, {k: torch.tensor(v) for k, v in record["permutations"].items()})
    merged = _state(tmp_path / "merged96")
    k = "model.layers.1.self_attn.k_proj.weight"  # no attention_width: attention matched (whole heads) and averaged
    assert torch.allclose(merged[k], (sa[k] + sbp[k]) / 2)
    for k in ("model.layers.0.mlp.gate_proj.weight", "model.layers.1.mlp.up_proj.weight"):
        w, wa, wb = merged[k], sa[k], sbp[k]
        R = torch.cdist(w[32:64], wa).argmin(1)  # which of A's rows each A-only row is
        M = torch.tensor(sorted(set(range(INTER)) - set(R.tolist())))
        assert len(set(R.tolist())) == 32 and torch.equal(R, R.sort().values)
        assert near(w[32:64], wa[R]) and near(w[64:], wb[R]) and near(w[:32], (wa[M] + wb[M]) / 2)
    got = _logits(tmp_path / "merged96", held)
    assert got.shape == want.shape and float((got - want).abs().max()) > 1e-2 * float(want.abs().max())


def test_bad_widths_params_and_tokenizers_write_nothing(pair, tmp_path):
    a_dir, b_dir, calib, _ = pair
    cases = [({"width": 2.5}, f"outside the allowed range [{INTER}, {2 * INTER}]"),
             ({"width": INTER - 1}, "outside the allowed range"),
             ({"width": 2 * INTER + 1}, "outside the allowed range"),
             ({"width": {"mlp.0": 1.5}}, "single intermediate_size"),
             ({"width": {"budget": 1.5}}, "LlamaConfig has a single intermediate_size for every layer, so per-layer "
                                          "widths cannot be written"),
             ({"width": 1.5, "heads": "concat"}, "do not apply to a llama model"),
             ({"attention_width": 2.5}, "self_attn (num_key_value_heads)' (attn) is 2.5 x 2 = 5 units, outside the "
                                        "allowed range [2, 4]"),
             ({"attention_width": 3}, "requires hidden_size (32) to be a multiple of num_attention_heads; KV-head "
                                      "counts it allows here: [2, 4]")]
    for i, (params, needle) in enumerate(cases):
        recipe = tmp_path / f"r{i}.yml"
        recipe.write_text(yaml.safe_dump({"merge_method": "pleas", "models": [str(a_dir), str(b_dir)],
                                          "calibration": str(calib), "parameters": params}))
        r = run_cli("pleas", recipe, "-o", tmp_path / "merged")
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
        assert needle in " ".join(r.stderr.split()), r.stderr
        assert not (tmp_path / "merged").exists()
    # B with a tokenizer that gives two tokens each other's ids: same shapes, different vocabulary
    other = tmp_path / "other-tok"
    shutil.copytree(b_dir, other)
    tj = json.loads((other / "tokenizer.json").read_text())
    vocab = tj["model"]["vocab"]
    x, y = list(vocab)[100], list(vocab)[101]
    vocab[x], vocab[y] = vocab[y], vocab[x]
    (other / "tokenizer.json").write_text(json.dumps(tj))
    recipe = tmp_path / "tok.yml"
    recipe.write_text(yaml.safe_dump({"merge_method": "pleas", "models": [str(a_dir), str(other)],
                                      "calibration": str(calib)}))
    r = run_cli("pleas", recipe, "-o", tmp_path / "merged")
    assert r.returncode == 2 and "different tokenizers" in r.stderr, r.stderr
    assert not (tmp_path / "merged").exists()

