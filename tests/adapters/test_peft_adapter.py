"""mergelab.io.peft_adapter: reading PEFT LoRA folders (validated against PEFT's own merge) and writing
folders PEFT loads back."""

from __future__ import annotations

import json
import math

import pytest
import torch

from mergelab.errors import CheckpointError, OutputError
from mergelab.io.peft_adapter import pattern_value, read_lora, scaling, write_lora

from .helpers import load_base, peft_dense, random_adapter, state_of

peft = pytest.importorskip("peft")


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    from mergelab.synthetic import make_llama_family

    root = tmp_path_factory.mktemp("lora_base")
    return make_llama_family(root, experts=0, hidden=32, layers=2, intermediate=64, vocab=64)[0]


def _dense_via_reader(base, adapter):
    ad = read_lora(adapter)
    sd = state_of(base)
    for name, m in ad.by_weight().items():
        sd[name] = sd[name] + m.delta()
    return sd


@pytest.mark.parametrize("kw", [
    dict(),
    dict(use_rslora=True, r=8, alpha=16),
    dict(rank_pattern={"layers.1.self_attn.q_proj": 2, "down_proj": 6},
         alpha_pattern={"v_proj": 3, "layers.0.mlp.down_proj": 5}),
])
def test_reader_equals_peft_merge_and_unload(base, tmp_path, kw):
    adapter = random_adapter(base, tmp_path / "ad", seed=1, **kw)
    ours, theirs = _dense_via_reader(base, adapter), peft_dense(base, adapter)
    changed = 0
    for name, t in theirs.items():
        torch.testing.assert_close(ours[name], t, rtol=0, atol=2e-6)
        changed += not torch.equal(t, state_of(base)[name])
    assert changed == 2 * 3  # 2 layers x 3 targets changed, nothing else


def test_scaling_and_patterns():
    assert scaling(32, 16, False) == 2 and scaling(32, 16, True) == 8
    pat = {"q_proj": 4, "layers.0.self_attn.q_proj": 2}
    assert pattern_value(pat, "model.layers.0.self_attn.q_proj") == 4  # first key in order wins
    pat = {"layers.0.self_attn.q_proj": 2, "q_proj": 4}
    assert pattern_value(pat, "model.layers.0.self_attn.q_proj") == 2
    assert pattern_value(pat, "model.layers.10.self_attn.q_proj") == 4  # layers.10 is not layers.0
    assert pattern_value({"k_proj": 1}, "model.layers.0.self_attn.q_proj") is None


def test_rank_pattern_resolution_in_file(base, tmp_path):
    adapter = random_adapter(base, tmp_path / "ad", seed=2, r=4, alpha=8,
                             rank_pattern={"layers.1.self_attn.q_proj": 2}, alpha_pattern={"v_proj": 3})
    ad = read_lora(adapter)
    q1, q0 = ad.modules["model.layers.1.self_attn.q_proj"], ad.modules["model.layers.0.self_attn.q_proj"]
    assert (q1.rank, q1.alpha, q1.scale) == (2, 8, 4.0)
    assert (q0.rank, q0.scale) == (4, 2.0)
    assert ad.modules["model.layers.0.self_attn.v_proj"].scale == 3 / 4


def test_writer_round_trip_loads_in_peft(base, tmp_path):
    g = torch.Generator().manual_seed(0)
    sd = state_of(base)
    mods = {}
    for i, (name, r) in enumerate([("model.layers.0.self_attn.q_proj", 3), ("model.layers.1.mlp.down_proj", 5),
                                   ("model.layers.1.self_attn.o_proj", 5)]):
        out, inn = sd[name + ".weight"].shape
        mods[name] = (torch.randn(r, inn, generator=g) * 0.1, torch.randn(out, r, generator=g) * 0.1)
    alphas = {"model.layers.0.self_attn.q_proj": 6.0}  # scale 2 there, 1 elsewhere
    folder = write_lora(tmp_path / "w", mods, alphas=alphas, base_model=str(base))
    cfg = json.loads((folder / "adapter_config.json").read_text())
    assert cfg["r"] == 5 and cfg["rank_pattern"] == {"model.layers.0.self_attn.q_proj": 3}
    assert cfg["use_rslora"] is False and cfg["base_model_name_or_path"] == str(base)
    dense = peft_dense(base, folder)
    for name, (A, B) in mods.items():
        s = alphas.get(name, A.shape[0]) / A.shape[0]
        torch.testing.assert_close(dense[name + ".weight"], sd[name + ".weight"] + s * B @ A, rtol=0, atol=2e-6)
    untouched = "model.layers.0.self_attn.k_proj.weight"
    assert torch.equal(dense[untouched], sd[untouched])
    back = read_lora(folder)
    assert back.modules["model.layers.0.self_attn.q_proj"].scale == 2.0
    assert [p.name for p in tmp_path.iterdir()] == ["w"]  # no temporary folder left


def test_writer_refuses_existing_and_leaves_nothing_on_error(tmp_path):
    A, B = torch.ones(2, 4), torch.ones(3, 2)
    write_lora(tmp_path / "a", {"m": (A, B)})
    with pytest.raises(OutputError, match="already exists"):
        write_lora(tmp_path / "a", {"m": (A, B)})
    with pytest.raises(OutputError, match="module 'bad'"):
        write_lora(tmp_path / "b", {"m": (A, B), "bad": (torch.ones(2, 4), torch.ones(3, 3))})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]


def _edit(folder, **fields):
    path = folder / "adapter_config.json"
    cfg = json.loads(path.read_text())
    cfg.update(fields)
    path.write_text(json.dumps(cfg))


@pytest.mark.parametrize("field,value,match", [
    ("use_dora", True, "field 'use_dora'"),
    ("lora_bias", True, "field 'lora_bias'"),
    ("peft_type", "IA3", "field 'peft_type'"),
    ("init_lora_weights", "pissa", "field 'init_lora_weights'"),
    ("layer_replication", [[0, 1]], "field 'layer_replication'"),
    ("r", 8, "rank mismatch .* r=8"),
])
def test_reader_refusals_name_file_and_field(base, tmp_path, field, value, match):
    adapter = random_adapter(base, tmp_path / "ad", seed=3)
    _edit(adapter, **{field: value})
    with pytest.raises(CheckpointError, match=match) as e:
        read_lora(adapter)
    assert str(adapter) in str(e.value)


def test_reader_refuses_missing_config_and_inner_rank_mismatch(base, tmp_path):
    from safetensors.torch import load_file, save_file

    adapter = random_adapter(base, tmp_path / "ad", seed=4)
    st = adapter / "adapter_model.safetensors"
    sd = load_file(str(st))
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
    sd[key] = sd[key][:, :3].contiguous()
    save_file(sd, str(st))
    with pytest.raises(CheckpointError, match="rank mismatch in module 'model.layers.0.self_attn.q_proj': "
                                              "lora_A has 4 rows but lora_B has 3 columns"):
        read_lora(adapter)
    (adapter / "adapter_config.json").unlink()
    with pytest.raises(CheckpointError, match="'adapter_config.json' is missing"):
        read_lora(adapter)


def test_modules_to_save_are_taken_as_full_tensors(base, tmp_path):
    adapter = random_adapter(base, tmp_path / "ad", seed=5, modules_to_save=["lm_head"])
    ad = read_lora(adapter)
    assert list(ad.full) == ["lm_head.weight"]
    assert torch.equal(ad.full["lm_head.weight"], state_of(base)["lm_head.weight"])
    assert math.isclose(ad.modules["model.layers.0.self_attn.q_proj"].scale, 2.0)
