"""``mergelab moe`` on tiny Llama and Qwen2 families: layout, gates against independent oracles, loading and
generation with transformers, tied embeddings / rope scaling / biases kept, and every bad input refused
with the field named and nothing written (issue 17, items 1 and 7)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from tests.conftest import run_cli
from tests.moe.tiny import make_family

pytest.importorskip("tokenizers")

ARITH = ["Q: 12 + 7 = ?", "what is 3 * 4 + 5"]
STRINGS = ["reverse the string 'abc'", "upper case of hello world"]
ROPE = {"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0}


def tensors(folder: Path) -> dict:
    out = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def write(path: Path, cfg: dict) -> Path:
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return make_family(tmp_path_factory.mktemp("llama"), "llama", experts=2, tie=True, rope=ROPE)


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    return make_family(tmp_path_factory.mktemp("qwen"), "qwen2", experts=3, tie=True, seed=3)


def llama_cfg(fam, **over) -> dict:
    cfg = {"base_model": str(fam[0]), "gate_mode": "hidden", "dtype": "float32", "experts_per_token": 1,
           "experts": [{"source_model": str(fam[1]), "positive_prompts": ARITH},
                       {"source_model": str(fam[2]), "positive_prompts": STRINGS, "negative_prompts": ["hello"]}]}
    cfg.update(over)
    return cfg


def hidden_oracle(base: Path, prompts, negatives=()) -> torch.Tensor:
    """mergekit's hidden gate row, with the whole base loaded by transformers (no streaming): residual
    stream entering each layer at the last position, mean over prompts, minus the negatives', L2-normalised."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base)
    tok.padding_side = "left"
    tok.pad_token_id = tok.bos_token_id
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16).eval()

    def stat(ps):
        enc = tok([tok.bos_token + p for p in ps], return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.no_grad():
            hs = model(**enc, output_hidden_states=True).hidden_states
        # hidden_states[l] is the input of layer l for l < L (the last entry is the final norm's output)
        return torch.stack([h[:, -1, :] for h in hs[:-1]]).sum(dim=1) / len(ps)

    v = stat(prompts)
    if negatives:
        v = v - stat(negatives)
    return v / v.norm(dim=-1, keepdim=True).clamp(min=1e-8)


def test_mixtral_from_llama_layout_gates_and_generation(llama, tmp_path):
    out = tmp_path / "moe"
    code, _, err = run_cli(["moe", write(tmp_path / "moe.yml", llama_cfg(llama)), "-o", out, "-q"])
    assert code == 0, err
    cfg = json.loads((out / "config.json").read_text())
    base_cfg = json.loads((Path(llama[0]) / "config.json").read_text())
    assert cfg["architectures"] == ["MixtralForCausalLM"] and cfg["model_type"] == "mixtral"
    assert cfg["num_local_experts"] == 2 and cfg["num_experts_per_tok"] == 1
    assert cfg["rope_parameters"] == base_cfg["rope_parameters"] == ROPE  # linear x4 kept (mergekit #88)
    assert cfg["tie_word_embeddings"] is True
    got, base = tensors(out), tensors(llama[0])
    experts = [tensors(p) for p in llama[1:]]
    assert "lm_head.weight" not in got  # tied: nothing to write (mergekit #350)
    I = base["model.layers.0.mlp.gate_proj.weight"].shape[0]
    for name, t in base.items():
        if ".mlp." not in name:
            assert torch.equal(got[name], t), name
    for l in range(2):
        gu, down = got[f"model.layers.{l}.mlp.experts.gate_up_proj"], got[f"model.layers.{l}.mlp.experts.down_proj"]
        assert gu.shape == (2, 2 * I, 32) and down.shape == (2, 32, I)
        for e, ex in enumerate(experts):
            assert torch.equal(gu[e, :I], ex[f"model.layers.{l}.mlp.gate_proj.weight"])
            assert torch.equal(gu[e, I:], ex[f"model.layers.{l}.mlp.up_proj.weight"])
            assert torch.equal(down[e], ex[f"model.layers.{l}.mlp.down_proj.weight"])
    rows = [hidden_oracle(llama[0], ARITH), hidden_oracle(llama[0], STRINGS, ["hello"])]
    for l in range(2):
        want = torch.stack([r[l] for r in rows]).float()
        assert torch.equal(got[f"model.layers.{l}.mlp.gate.weight"], want)
    assert not list(tmp_path.glob("*.partial"))

    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(model).__name__ == "MixtralForCausalLM"
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    tok = AutoTokenizer.from_pretrained(out)
    ids = tok("Q: 1 + 1", return_tensors="pt")
    gen = model.generate(**ids, max_new_tokens=4, do_sample=False)
    assert gen.shape[1] == ids["input_ids"].shape[1] + 4
    report = json.loads((out / "moe_routing.json").read_text())
    assert [e["expert"] for e in report["experts"]] == [0, 1]
    for e in report["experts"]:
        assert 0.0 <= e["share_top1_tokens"] <= 1.0 and sum(e["top1_counts_tokens"]) > 0


def test_gate_pass_holds_one_decoder_layer_at_a_time(llama):
    """The base behind the hidden gates (``moe.stream.StreamedDecoder``) has, while layer l runs, layer l's
    weights and no other layer's (bounded memory: embeddings plus one layer), none after the pass, and the
    residual stream it sees entering each layer is the fully loaded transformers model's."""
    from transformers import AutoModelForCausalLM

    from mergelab.moe.stream import StreamedDecoder

    dec = StreamedDecoder(llama[0], torch.float32, "base_model")
    seen = []

    def materialised():
        return [i for i, layer in enumerate(dec.layers) if not any(p.is_meta for p in layer.parameters())]

    dec.layer_input = lambda l, h: seen.append((l, materialised(), h.clone()))
    ids = torch.tensor([[1, 50, 60, 70, 80], [1, 90, 91, 92, 93]])
    mask = torch.ones_like(ids)
    assert materialised() == []
    dec.forward(ids, mask)
    assert [(l, m) for l, m, _ in seen] == [(0, [0]), (1, [1])]
    assert materialised() == [] and not dec.model.embed_tokens.weight.is_meta
    full = AutoModelForCausalLM.from_pretrained(llama[0], dtype=torch.float32).eval()
    with torch.no_grad():
        want = full(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
    for l, _, h in seen:
        torch.testing.assert_close(h, want[l], rtol=1e-5, atol=1e-5)


def test_identical_experts_give_the_base_model(llama, tmp_path):
    """E copies of the base with any router: top-k weights sum to 1, so each MoE layer is the base's
    MLP and the logits are the base's (fails if gate and up were swapped or experts misplaced)."""
    from transformers import AutoModelForCausalLM

    cfg = llama_cfg(llama, gate_mode="random", experts_per_token=2, seed=5)
    for e in cfg["experts"]:
        e["source_model"] = str(llama[0])
    out = tmp_path / "same"
    code, _, err = run_cli(["moe", write(tmp_path / "m.yml", cfg), "-o", out, "-q",
                            "--i-understand-this-is-not-useful-without-training"])
    assert code == 0, err
    moe = AutoModelForCausalLM.from_pretrained(out).eval()
    dense = AutoModelForCausalLM.from_pretrained(llama[0]).eval()
    ids = torch.tensor([[1, 50, 60, 70, 80, 90]])
    with torch.no_grad():
        torch.testing.assert_close(moe(ids).logits, dense(ids).logits, rtol=1e-5, atol=1e-5)


def test_random_gates_are_seeded_as_mergekit(llama, tmp_path):
    cfg = llama_cfg(llama, gate_mode="random", seed=7)
    out = tmp_path / "r"
    assert run_cli(["moe", write(tmp_path / "r.yml", cfg), "-o", out, "-q"])[0] == 0
    torch.manual_seed(7)  # mergekit-moe --random-seed 7: torch.randn((L, E, H))
    want = torch.randn((2, 2, 32))
    got = tensors(out)
    for l in range(2):
        assert torch.equal(got[f"model.layers.{l}.mlp.gate.weight"], want[l])


def test_cheap_embed_gates(llama, tmp_path):
    cfg = llama_cfg(llama, gate_mode="cheap_embed")
    out = tmp_path / "c"
    assert run_cli(["moe", write(tmp_path / "c.yml", cfg), "-o", out, "-q", "--no-routing-report"])[0] == 0
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(llama[0])
    emb = tensors(llama[0])["model.embed_tokens.weight"]

    def row(prompts):  # sum of the real tokens' embeddings (BOS prepended), normalised
        v = sum(emb[tok(tok.bos_token + p, add_special_tokens=False)["input_ids"]].sum(0) for p in prompts)
        return v / v.norm()

    neg = row(STRINGS) - row(["hello"])
    want = torch.stack([row(ARITH), neg / neg.norm()])
    got = tensors(out)
    assert not (out / "moe_routing.json").exists()
    for l in range(2):
        torch.testing.assert_close(got[f"model.layers.{l}.mlp.gate.weight"], want, rtol=1e-6, atol=1e-6)


def test_qwen2_moe_with_shared_expert_keeps_biases_and_ties(qwen, tmp_path):
    cfg = {"base_model": str(qwen[0]), "gate_mode": "hidden", "experts_per_token": 2, "dtype": "bfloat16",
           "experts": [{"source_model": str(qwen[1]), "positive_prompts": ARITH},
                       {"source_model": str(qwen[2]), "positive_prompts": STRINGS}],
           "shared_experts": [{"source_model": str(qwen[3]), "positive_prompts": ["anything"],
                               "residual_scale": 0.5}]}
    out = tmp_path / "q"
    code, _, err = run_cli(["moe", write(tmp_path / "q.yml", cfg), "-o", out, "-q"])
    assert code == 0, err
    c = json.loads((out / "config.json").read_text())
    assert c["architectures"] == ["Qwen2MoeForCausalLM"] and c["num_experts"] == 2 and c["norm_topk_prob"] is True
    assert c["tie_word_embeddings"] is True and c["moe_intermediate_size"] == c["shared_expert_intermediate_size"] == 48
    got, base, shared = tensors(out), tensors(qwen[0]), tensors(qwen[3])
    for l in range(2):
        for p in ("q", "k", "v"):
            name = f"model.layers.{l}.self_attn.{p}_proj.bias"
            assert torch.equal(got[name], base[name].bfloat16()) and base[name].abs().sum() > 0
        pre = f"model.layers.{l}.mlp"
        assert torch.equal(got[f"{pre}.shared_expert.gate_proj.weight"], shared[f"{pre}.gate_proj.weight"].bfloat16())
        assert torch.equal(got[f"{pre}.shared_expert.down_proj.weight"],
                           (shared[f"{pre}.down_proj.weight"] * 0.5).bfloat16())  # residual_scale: down only
        want = hidden_oracle(qwen[0], ["anything"])[l]
        assert torch.equal(got[f"{pre}.shared_expert_gate.weight"], want.unsqueeze(0))
        assert got[f"{pre}.experts.gate_up_proj"].dtype == torch.bfloat16
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(model).__name__ == "Qwen2MoeForCausalLM"
    assert model.model.layers[0].self_attn.q_proj.bias is not None
    gen = model.generate(torch.tensor([[1, 40, 41]]), max_new_tokens=3, do_sample=False)
    assert gen.shape == (1, 6)


def test_llama_into_qwen_moe_gets_zero_qkv_biases(llama, tmp_path):
    cfg = llama_cfg(llama, architecture="qwen", shared_experts=[{"source_model": str(llama[0]),
                                                                  "positive_prompts": ["hi there"]}])
    out = tmp_path / "lq"
    code, _, err = run_cli(["moe", write(tmp_path / "lq.yml", cfg), "-o", out, "-q", "--no-routing-report"])
    assert code == 0, err
    got = tensors(out)
    assert torch.equal(got["model.layers.0.self_attn.k_proj.bias"], torch.zeros(16))
    c = json.loads((out / "config.json").read_text())
    assert c["architectures"] == ["Qwen2MoeForCausalLM"] and c["rope_parameters"] == ROPE


# ------------------------------------------------------------------ bad input (item 7)

def test_bad_inputs_name_the_field_and_write_nothing(llama, qwen, tmp_path, capsys):
    def refused(cfg, *needles, args=()):
        out = tmp_path / "never"
        code, _, err = run_cli(["moe", write(tmp_path / "bad.yml", cfg), "-o", out, *args], capsys)
        flat = " ".join(err.split())
        assert code != 0, cfg
        for n in needles:
            assert n in flat, flat
        assert "Traceback" not in err
        assert not out.exists() and not (tmp_path / "never.partial").exists()

    # experts with another architecture
    cfg = llama_cfg(llama)
    cfg["experts"][1]["source_model"] = str(qwen[1])
    refused(cfg, "experts[1].source_model", "'qwen2'", "'llama'")
    # experts with other shapes
    odd = make_family(tmp_path / "odd", "llama", experts=1, intermediate=40)
    cfg = llama_cfg(llama)
    cfg["experts"][0]["source_model"] = str(odd[1])
    refused(cfg, "experts[0].source_model", "intermediate_size", "40", "48")
    # a gate mode that needs the base, without one
    cfg = llama_cfg(llama)
    del cfg["base_model"]
    refused(cfg, "base_model is required", "gate_mode 'hidden'")
    cfg["base_model"] = str(tmp_path / "missing")
    refused(cfg, "base_model", "does not exist")
    # empty prompts
    cfg = llama_cfg(llama)
    cfg["experts"][1]["positive_prompts"] = []
    refused(cfg, "experts[1].positive_prompts is empty")
    cfg = llama_cfg(llama)
    cfg["experts"][0]["positive_prompts"] = ["fine", "  "]
    refused(cfg, "experts[0].positive_prompts[1] is an empty prompt")
    cfg = llama_cfg(llama)
    cfg["experts"][1]["positive_prompts"] = ARITH
    del cfg["experts"][1]["negative_prompts"]
    refused(cfg, "same positive and negative prompts")
    # shared_experts the output cannot hold
    shared = {"source_model": str(qwen[0]), "positive_prompts": ["x"]}
    qcfg = {"base_model": str(qwen[0]), "experts": [{"source_model": str(qwen[1]), "positive_prompts": ARITH},
                                                    {"source_model": str(qwen[2]), "positive_prompts": STRINGS}]}
    refused(qcfg, "shared_experts: 0 given", "Qwen2MoeForCausalLM holds 1")
    refused(dict(qcfg, shared_experts=[shared, shared]), "shared_experts: 2 given")
    refused(llama_cfg(llama, architecture="mixtral", shared_experts=[dict(shared, source_model=str(llama[0]))]),
            "shared_experts: 1 given", "MixtralForCausalLM holds 0")
    refused(dict(qcfg, shared_experts=[{"source_model": str(qwen[0])}]), "shared_experts[0].positive_prompts is empty")
    # the rest of the schema
    refused(llama_cfg(llama, gate_mode="hiden"), "gate_mode: 'hiden'")
    refused(llama_cfg(llama, experts_per_token=3), "experts_per_token: 3")
    refused(llama_cfg(llama, gate_mod="hidden"), "unknown key 'gate_mod'", "gate_mode")
    refused(llama_cfg(llama, architecture="deepseek"), "architecture: 'deepseek'")
    cfg = llama_cfg(llama)
    cfg["experts"][1]["source_model"] = str(llama[1])
    refused(cfg, "every expert is the same model")
    # a bias the output cannot hold (Llama attention_bias -> Mixtral)
    biased = make_family(tmp_path / "biased", "llama", experts=2, attention_bias=True)
    refused(llama_cfg(biased), "base_model: tensor", "is an attention bias, which MixtralForCausalLM cannot hold")


def _mlp_inputs(base: Path, prompts, dtype):
    """Per layer, the MLP input of every position (hooks on a fully loaded transformers model)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base)
    tok.padding_side = "left"
    tok.pad_token_id = tok.bos_token_id
    model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype).eval()
    seen = {}
    hooks = [layer.mlp.register_forward_pre_hook(lambda m, a, l=l: seen.__setitem__(l, a[0]))
             for l, layer in enumerate(model.model.layers)]
    enc = tok([tok.bos_token + p for p in prompts], return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.no_grad():
        model(**enc)
    for h in hooks:
        h.remove()
    return [seen[l] for l in range(len(seen))], enc["attention_mask"]


def test_gate_source_mlp_input(llama, tmp_path):
    cfg = llama_cfg(llama, gate_source="mlp_input")
    out = tmp_path / "mi"
    assert run_cli(["moe", write(tmp_path / "mi.yml", cfg), "-o", out, "-q", "--no-routing-report"])[0] == 0
    got = tensors(out)

    def row(prompts):
        states, _ = _mlp_inputs(llama[0], prompts, torch.bfloat16)
        return torch.stack([s[:, -1, :].sum(0) / len(prompts) for s in states])

    neg = row(STRINGS) - row(["hello"])
    want = [row(ARITH), neg]
    for l in range(2):
        w = torch.stack([v[l] / v[l].norm().clamp(min=1e-8) for v in want]).float()
        torch.testing.assert_close(got[f"model.layers.{l}.mlp.gate.weight"], w, rtol=1e-2, atol=1e-2)
        # and not mergekit's residual rows
        assert not torch.allclose(got[f"model.layers.{l}.mlp.gate.weight"], hidden_oracle(llama[0], ARITH)[l].float())


def test_fitted_gates_are_the_least_squares_router(llama, tmp_path):
    cfg = llama_cfg(llama, gate_mode="fitted")
    del cfg["experts"][1]["negative_prompts"]
    out = tmp_path / "fit"
    assert run_cli(["moe", write(tmp_path / "fit.yml", cfg), "-o", out, "-q", "--no-routing-report"])[0] == 0
    got = tensors(out)
    X, Y = [[], []], []
    for i, prompts in enumerate((ARITH, STRINGS)):
        states, mask = _mlp_inputs(llama[0], prompts, torch.float32)
        mask = mask.bool().clone()
        mask[torch.arange(mask.shape[0]), mask.int().argmax(1)] = False  # drop the BOS position
        for l in range(2):
            X[l].append(states[l][mask])
        Y += [i] * int(mask.sum())
    Y = torch.nn.functional.one_hot(torch.tensor(Y), 2).double()
    for l in range(2):
        x = torch.cat(X[l]).double()
        gram = x.T @ x
        w = torch.linalg.lstsq(torch.cat([x, (1e-3 * gram.diagonal().mean()).sqrt() * torch.eye(32, dtype=x.dtype)]),
                               torch.cat([Y, torch.zeros(32, 2, dtype=Y.dtype)])).solution
        torch.testing.assert_close(got[f"model.layers.{l}.mlp.gate.weight"], w.T.float(), rtol=1e-4, atol=1e-4)


def test_extensions_refuse_what_they_cannot_honour(llama, tmp_path, capsys):
    def refused(cfg, needle):
        code, _, err = run_cli(["moe", write(tmp_path / "x.yml", cfg), "-o", tmp_path / "never"], capsys)
        assert code != 0 and needle in " ".join(err.split()), err
        assert not (tmp_path / "never").exists()

    refused(llama_cfg(llama, gate_mode="cheap_embed", gate_source="mlp_input"), "gate_source: only the hidden")
    refused(llama_cfg(llama, gate_source="mlp"), "gate_source: 'mlp'")
    refused(llama_cfg(llama, gate_mode="fitted"), "experts[1].negative_prompts: gate_mode 'fitted'")


def test_qwen3_moe_from_qwen3(tmp_path):
    fam = make_family(tmp_path / "q3", "qwen3", experts=2, seed=4)
    cfg = {"base_model": str(fam[0]), "experts_per_token": 1,
           "experts": [{"source_model": str(fam[1]), "positive_prompts": ARITH},
                       {"source_model": str(fam[2]), "positive_prompts": STRINGS}]}
    out = tmp_path / "q3moe"
    code, _, err = run_cli(["moe", write(tmp_path / "q3.yml", cfg), "-o", out, "-q"])
    assert code == 0, err
    c = json.loads((out / "config.json").read_text())
    assert c["architectures"] == ["Qwen3MoeForCausalLM"] and c["head_dim"] == 16
    assert c.get("num_experts", c.get("num_local_experts")) == 2
    got, base = tensors(out), tensors(fam[0])
    assert torch.equal(got["model.layers.1.self_attn.q_norm.weight"], base["model.layers.1.self_attn.q_norm.weight"])
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(model).__name__ == "Qwen3MoeForCausalLM"
    assert model.generate(torch.tensor([[1, 40, 41]]), max_new_tokens=3, do_sample=False).shape == (1, 6)
