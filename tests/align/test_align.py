"""``mergelab align``: the aligned model is the same function, and matching recovers a known permutation.

The oracle for "same function" is the network's own forward pass (PyTorch / transformers) on the
permuted weights; the oracle for recovery is the inverse of the permutation the test drew.
"""

from __future__ import annotations

import torch

from mergelab.align.api import load_model
from mergelab.align.features import record
from mergelab.align.matching import activation_matching, weight_distance, weight_matching
from mergelab.align.spec import apply_permutations, chain_spec, invert, llama_spec, random_permutations
from tests.align.conftest import close, convnet, mlp, run_cli, tiny_llama


def shapes(sd):
    return {k: tuple(v.shape) for k, v in sd.items()}


def gen(seed=1):
    return torch.Generator().manual_seed(seed)


def test_mlp_same_function_and_exact_recovery():
    net = mlp(0)
    sd = net.state_dict()
    spec = chain_spec(shapes(sd))
    assert sorted(spec.perms) == ["P0", "P1"] and spec.axes["4.weight"] == (None, spec.axes["2.weight"][0])
    rp = random_permutations(spec, gen())
    assert all(not torch.equal(p, torch.arange(len(p))) for p in rp.values())
    permuted = apply_permutations(sd, spec, rp)
    other = mlp(5)
    other.load_state_dict(permuted)
    x = torch.randn(32, 8)
    assert close(other(x), net(x))
    assert weight_distance(sd, permuted) > 1.0
    found = weight_matching(spec, sd, permuted)
    inv = invert(rp)
    assert all(torch.equal(found[k], inv[k]) for k in spec.perms)
    aligned = apply_permutations(permuted, spec, found)
    assert weight_distance(sd, aligned) == 0.0


def test_mlp_different_seeds_weight_matching_moves_closer_same_function():
    a, b = mlp(0), mlp(1)
    spec = chain_spec(shapes(a.state_dict()))
    found = weight_matching(spec, a.state_dict(), b.state_dict())
    aligned = apply_permutations(b.state_dict(), spec, found)
    assert weight_distance(a.state_dict(), aligned) < weight_distance(a.state_dict(), b.state_dict())
    c = mlp(9)
    c.load_state_dict(aligned)
    x = torch.randn(16, 8)
    assert close(c(x), b(x))


def test_conv_net_cli_same_function_and_recovery(tmp_path):
    net = convnet(0)
    sd = net.state_dict()
    spec = chain_spec(shapes(sd))
    assert spec.axes["fc1.weight"][1].role == "expand" and spec.axes["fc1.weight"][1].repeat == 16
    assert spec.axes["bn1.running_var"] == (spec.axes["conv1.weight"][0],)
    rp = random_permutations(spec, gen(2))
    torch.save(sd, tmp_path / "a.pt")
    torch.save(apply_permutations(sd, spec, rp), tmp_path / "b.pt")
    r = run_cli("align", tmp_path / "a.pt", tmp_path / "b.pt", "-o", tmp_path / "c.pt")
    assert r.returncode == 0, r.stderr
    assert "-> 0" in r.stdout
    x = torch.randn(4, 1, 8, 8)
    for name in ("b.pt", "c.pt"):
        other = convnet(7)
        other.load_state_dict(torch.load(tmp_path / name, weights_only=True))
        assert close(other(x), net(x)), name
    c = torch.load(tmp_path / "c.pt", weights_only=True)
    assert all(torch.equal(c[k], sd[k]) for k in sd)


def test_llama_gqa_heads_residual_same_function_and_recovery():
    model = tiny_llama(0)
    sd = model.state_dict()
    spec = llama_spec(model.config.to_dict(), shapes(sd))
    att = spec.perms["attn.0"]
    assert (att.n_heads, att.head_dim, att.group) == (2, 8, 2)
    rp = random_permutations(spec, gen(3))
    permuted = apply_permutations(sd, spec, rp)
    other = tiny_llama(4)
    other.load_state_dict(permuted)
    ids = torch.randint(0, 64, (2, 9))
    with torch.no_grad():
        assert close(other(ids).logits, model(ids).logits)
    found = weight_matching(spec, sd, permuted)
    inv = invert(rp)
    assert all(torch.equal(found[k], inv[k]) for k in spec.perms)
    assert weight_distance(sd, apply_permutations(permuted, spec, found)) == 0.0


def test_llama_rope_guard_qk_dims_may_not_move():
    """Why q/k dims stay in place: the same permutation of q and k dims inside every head (valid for a
    plain dot product) changes a RoPE model's logits."""
    model = tiny_llama(0)
    sd = dict(model.state_dict())
    d = 8
    within = torch.tensor([1, 0, 2, 3, 4, 5, 6, 7])
    for key, heads in (("model.layers.0.self_attn.q_proj.weight", 4), ("model.layers.0.self_attn.k_proj.weight", 2)):
        idx = (torch.arange(heads)[:, None] * d + within).reshape(-1)
        sd[key] = sd[key][idx]
    other = tiny_llama(4)
    other.load_state_dict(sd)
    ids = torch.randint(0, 64, (1, 9))
    with torch.no_grad():
        assert not close(other(ids).logits, model(ids).logits)


def test_llama_without_residual_permutation():
    model = tiny_llama(0)
    sd = model.state_dict()
    spec = llama_spec(model.config.to_dict(), shapes(sd), residual=False)
    assert "res" not in spec.perms and "model.embed_tokens.weight" not in spec.axes
    assert spec.axes["model.layers.1.mlp.down_proj.weight"][0] is None
    rp = random_permutations(spec, gen(5))
    permuted = apply_permutations(sd, spec, rp)
    assert torch.equal(permuted["model.embed_tokens.weight"], sd["model.embed_tokens.weight"])
    other = tiny_llama(4)
    other.load_state_dict(permuted)
    ids = torch.randint(0, 64, (2, 9))
    with torch.no_grad():
        assert close(other(ids).logits, model(ids).logits)
    found = weight_matching(spec, sd, permuted)
    assert all(torch.equal(found[k], invert(rp)[k]) for k in spec.perms)


def test_llama_cli_weight_matching_folder(tmp_path):
    model = tiny_llama(0)
    spec = llama_spec(model.config.to_dict(), shapes(model.state_dict()))
    rp = random_permutations(spec, gen(6))
    other = tiny_llama(4)
    other.load_state_dict(apply_permutations(model.state_dict(), spec, rp))
    model.save_pretrained(tmp_path / "a")
    other.save_pretrained(tmp_path / "b")
    r = run_cli("align", tmp_path / "a", tmp_path / "b", "-o", tmp_path / "c")
    assert r.returncode == 0, r.stderr
    c = load_model(tmp_path / "c", "c")
    assert c.config["model_type"] == "llama" and (tmp_path / "c" / "alignment.json").is_file()
    assert all(torch.equal(c.state[k], v) for k, v in model.state_dict().items() if k in c.state)


def test_activation_matching_llama_recovers_permutation():
    model = tiny_llama(0)
    sd = model.state_dict()
    spec = llama_spec(model.config.to_dict(), shapes(sd))
    rp = random_permutations(spec, gen(7))
    other = tiny_llama(4)
    other.load_state_dict(apply_permutations(sd, spec, rp))
    batches = [torch.randint(0, 64, (4, 12)) for _ in range(3)]

    def call(m, ids):
        m(input_ids=ids)
        return None

    found = activation_matching(spec, record(model, spec, batches, call), record(other, spec, batches, call))
    inv = invert(rp)
    assert all(torch.equal(found[k], inv[k]) for k in spec.perms)


def test_activation_matching_mlp_cli(tmp_path):
    net = mlp(0)
    sd = net.state_dict()
    spec = chain_spec(shapes(sd))
    rp = random_permutations(spec, gen(8))
    torch.save(sd, tmp_path / "a.pt")
    torch.save(apply_permutations(sd, spec, rp), tmp_path / "b.pt")
    torch.save(torch.randn(200, 8), tmp_path / "x.pt")
    r = run_cli("align", tmp_path / "a.pt", tmp_path / "b.pt", "-o", tmp_path / "c.pt", "--method", "activation",
                "--calibration", tmp_path / "x.pt")
    assert r.returncode == 0, r.stderr
    c = torch.load(tmp_path / "c.pt", weights_only=True)
    assert all(torch.equal(c[k], sd[k]) for k in sd)


def test_merge_runs_on_aligned_models(tmp_path):
    """Any merge method takes REFERENCE and ALIGNED: a linear merge of two Llamas from different inits."""
    import yaml
    from safetensors.torch import load_file

    tiny_llama(0).save_pretrained(tmp_path / "a")
    tiny_llama(1).save_pretrained(tmp_path / "b")
    r = run_cli("align", tmp_path / "a", tmp_path / "b", "-o", tmp_path / "c")
    assert r.returncode == 0, r.stderr
    recipe = {"merge_method": "linear", "dtype": "float32",
              "models": [{"model": str(tmp_path / n), "parameters": {"weight": 0.5}} for n in ("a", "c")]}
    (tmp_path / "m.yml").write_text(yaml.safe_dump(recipe))
    r = run_cli("merge", tmp_path / "m.yml", "-o", tmp_path / "m", "--quiet")
    assert r.returncode == 0, r.stderr
    a, c = load_model(tmp_path / "a", "a").state, load_model(tmp_path / "c", "c").state
    merged = {}
    for f in (tmp_path / "m").glob("*.safetensors"):
        merged.update(load_file(str(f)))
    assert torch.allclose(merged["model.layers.1.mlp.up_proj.weight"],
                          (a["model.layers.1.mlp.up_proj.weight"] + c["model.layers.1.mlp.up_proj.weight"]) / 2)
    b = load_model(tmp_path / "b", "b").state
    assert not torch.equal(c["model.layers.1.mlp.up_proj.weight"], b["model.layers.1.mlp.up_proj.weight"])


def test_bert_classifier_same_function_and_unknown_head_refused():
    import pytest
    from transformers import BertConfig, BertForMaskedLM, BertForSequenceClassification

    from mergelab.align.spec import infer_spec
    from mergelab.errors import MergeLabError

    cfg = BertConfig(vocab_size=50, hidden_size=24, num_hidden_layers=2, num_attention_heads=3, intermediate_size=40,
                     max_position_embeddings=32, num_labels=3)
    torch.manual_seed(0)
    model = BertForSequenceClassification(cfg).eval()
    sd = model.state_dict()
    spec = infer_spec(cfg.to_dict(), shapes(sd))
    assert spec.kind == "bert" and "classifier.weight" not in spec.axes
    rp = random_permutations(spec, gen(9))
    other = BertForSequenceClassification(cfg).eval()
    other.load_state_dict(apply_permutations(sd, spec, rp))
    ids = torch.randint(0, 50, (2, 7))
    with torch.no_grad():
        assert close(other(input_ids=ids).logits, model(input_ids=ids).logits)
    found = weight_matching(spec, sd, other.state_dict())
    assert all(torch.equal(found[k], invert(rp)[k]) for k in spec.perms)
    mlm = BertForMaskedLM(cfg).state_dict()
    with pytest.raises(MergeLabError, match="tensor 'cls.predictions"):
        infer_spec(cfg.to_dict(), shapes(mlm))


def test_llama_from_other_seed_aligned_by_cli_is_the_same_function(tmp_path):
    """The issue's check on real matching (not a permuted copy): B from another initialisation, aligned to A by
    weight and by activation matching through the CLI, loads with transformers and gives B's logits to float32
    rounding, while its weights moved (the permutations are not the identity)."""
    import json

    from transformers import AutoModelForCausalLM

    import random

    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {"[UNK]": 0, **{f"w{i}": i for i in range(1, 64)}}  # a word-level tokenizer of the model's 64 ids
    tk = Tokenizer(models.WordLevel(vocab=words, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]", pad_token="[UNK]")
    tiny_llama(0).save_pretrained(tmp_path / "a")
    tok.save_pretrained(tmp_path / "a")
    b = tiny_llama(1)
    b.save_pretrained(tmp_path / "b")
    rng = random.Random(0)
    (tmp_path / "texts.txt").write_text("\n".join(" ".join(f"w{rng.randrange(1, 64)}" for _ in range(12))
                                                  for _ in range(40)) + "\n")
    ids = torch.randint(0, 64, (3, 11), generator=gen(12))
    with torch.no_grad():
        want = b(ids).logits
    for method in ("weight", "activation"):
        extra = ["--calibration", tmp_path / "texts.txt"] if method == "activation" else []
        r = run_cli("align", tmp_path / "a", tmp_path / "b", "-o", tmp_path / method, "--method", method, *extra)
        assert r.returncode == 0, (method, r.stderr)
        rec = json.loads((tmp_path / method / "alignment.json").read_text())
        assert rec["distance_after"] < rec["distance_before"], method
        assert any(p != sorted(p) for p in rec["permutations"].values()), method
        c = AutoModelForCausalLM.from_pretrained(str(tmp_path / method), dtype=torch.float32).eval()
        with torch.no_grad():
            got = c(ids).logits
        assert close(got, want), (method, float((got - want).abs().max()))
        assert not torch.equal(c.model.layers[0].mlp.up_proj.weight, b.model.layers[0].mlp.up_proj.weight)


def test_activation_matching_conv_net_and_resnet_recover_permutation():
    """Activation matching for conv nets (Python API: a state dict does not record strides and padding): a
    conv net with BatchNorm and a flatten, and a ResNet with its residual-stream spec, permuted at random,
    give back the inverse permutation from their activations on random images."""
    from mergelab.align.resnet import ResNet, resnet_spec

    x = torch.randn(64, 1, 8, 8, generator=gen(13))
    net = convnet(0)
    torch.manual_seed(1)
    res = ResNet(5, 6, 3, blocks=2).eval()  # stream of 5 channels, blocks of 6
    with torch.no_grad():  # BatchNorm statistics that keep every unit alive: dead units are interchangeable
        for model in (net, res):
            for m in model.modules():
                if isinstance(m, torch.nn.BatchNorm2d):
                    m.running_mean.normal_(0, 0.1)
                    m.running_var.uniform_(0.5, 2.0)
                    m.bias.uniform_(0.5, 1.0)
        net.fc1.bias.uniform_(2.0, 3.0)
    for model, spec, fresh in ((net, chain_spec(shapes(net.state_dict())), lambda: convnet(7)),
                               (res, resnet_spec(res), lambda: ResNet(5, 6, 3, blocks=2).eval())):
        sd = model.state_dict()
        rp = random_permutations(spec, gen(14))
        other = fresh()
        other.load_state_dict(apply_permutations(sd, spec, rp))
        with torch.no_grad():
            assert close(other(x), model(x))

        def call(m, b):
            m(b)
            return None

        batches = list(x.split(16))
        found = activation_matching(spec, record(model, spec, batches, call), record(other, spec, batches, call))
        inv = invert(rp)
        assert sorted(found) == sorted(spec.perms) and all(torch.equal(found[k], inv[k]) for k in spec.perms)
