"""WEMoE (ICML 2024) on really fine-tuned MiniLM experts: the identities of the FusionBench module."""

from __future__ import annotations

import re

import pytest
import torch
from transformers import BertModel

import mergelab.routed as routed
from mergelab.routed.wemoe import WEMoEConfig, save_wemoe, train_routers, upscale

def ref_output(config, state, batch):
    m = BertModel(config, add_pooling_layer=True).eval()
    m.load_state_dict(state, strict=False)
    with torch.no_grad():
        return m(**batch).last_hidden_state


def is_mlp(key):  # BERT's MLP: layer.N.intermediate.dense and layer.N.output.dense (not attention.output.dense)
    return re.match(r"^encoder\.layer\.\d+\.(intermediate|output)\.dense\.", key) is not None


def set_gates(model, bias):
    """Every layer's gate outputs the constant ``bias`` (output weights zeroed)."""
    with torch.no_grad():
        for g in model.gates:
            g.net[-1].weight.zero_()
            g.net[-1].bias.copy_(torch.as_tensor(bias))


@pytest.fixture(scope="module")
def moe(family_states):
    config, tok, base, experts, tasks = family_states
    return upscale(base, experts, tasks, config, WEMoEConfig(steps=3, lr=1e-2))


def test_constant_gate_is_task_arithmetic_and_one_hot_is_the_expert_mlp(family_states, moe, batch):
    config, tok, base, experts, tasks = family_states
    fl = [k for k in base if base[k].is_floating_point()]
    ta = {k: base[k] + 0.3 * sum(e[k] - base[k] for e in experts) for k in fl}
    # untrained: gates ~ N(0, 0.01^2) weights and bias 0.3 -> near task arithmetic; exactly with zero weights
    set_gates(moe, [0.3] * len(tasks))
    with torch.no_grad():
        got = moe(**batch).last_hidden_state
    torch.testing.assert_close(got, ref_output(config, ta, batch), atol=2e-5, rtol=1e-4)
    for k in range(len(tasks)):
        set_gates(moe, torch.nn.functional.one_hot(torch.tensor(k), len(tasks)).float())
        want = {key: (experts[k][key] if is_mlp(key) else ta[key]) for key in fl}
        with torch.no_grad():
            got = moe(**batch).last_hidden_state
        torch.testing.assert_close(got, ref_output(config, want, batch), atol=2e-5, rtol=1e-4)


def test_batch_reduce_on_identical_inputs_equals_per_sample(family_states, batch):
    config, tok, base, experts, tasks = family_states
    one = {k: v[3:4].expand(3, -1) for k, v in batch.items()}
    outs = []
    for reduce in (False, True):
        m = upscale(base, experts, tasks, config, WEMoEConfig(batch_reduce=reduce))
        torch.manual_seed(0)
        with torch.no_grad():
            for g in m.gates:
                for p in g.parameters():
                    p.normal_(0, 0.1)
            outs.append(m(**one).last_hidden_state)
    torch.testing.assert_close(outs[0], outs[1], atol=1e-6, rtol=1e-5)


def test_entropy_training_moves_only_routers_and_the_folder_round_trips(family_states, moe, batch, tmp_path):
    config, tok, base, experts, tasks = family_states
    torch.manual_seed(0)
    heads = [{"weight": torch.randn(3, 384) * 0.5, "bias": torch.zeros(3)} for _ in tasks]
    fixed = {k: v.clone() for k, v in moe.module.state_dict().items()}
    before = [p.clone() for p in moe.gates.parameters()]
    data = [[batch] for _ in tasks]
    hist = train_routers(moe, heads, data, WEMoEConfig(steps=5, lr=1e-2))
    assert hist[-1] < hist[0]  # entropy goes down
    assert any(not torch.equal(a, b) for a, b in zip(before, moe.gates.parameters()))
    assert all(torch.equal(v, fixed[k]) for k, v in moe.module.state_dict().items())
    out = save_wemoe(tmp_path / "wemoe", moe)
    loaded = routed.load(out)
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).last_hidden_state, moe(**batch).last_hidden_state)
        w = loaded.routing(**batch)
    assert len(w) == 1 and w[0].shape == (batch["input_ids"].shape[0], len(tasks))
    s = loaded.sizes
    mlp = sum(v.numel() for k, v in base.items() if is_mlp(k))
    assert s["expert_mlp_bytes"] == 4 * mlp * len(tasks)
    assert s["extra_bytes"] == s["expert_mlp_bytes"] + s["router_bytes"]


def test_formed_and_deltas_paths_give_the_same_outputs_and_router_gradients(family_states, batch, monkeypatch):
    """The two exact ways of applying the MLP task vectors (docs/routed.md) through the whole model."""
    from mergelab.routed.layers import RoutedLinear

    config, tok, base, experts, tasks = family_states
    m = upscale(base, experts, tasks, config)
    torch.manual_seed(0)
    with torch.no_grad():
        for g in m.gates:
            for p in g.parameters():
                p.normal_(0, 0.1)
    got = []
    for path in ("formed", "deltas"):
        monkeypatch.setattr(RoutedLinear, "path", path)
        m.gates.zero_grad()
        for p in m.gates.parameters():
            p.requires_grad_(True)
        out = m(**batch).last_hidden_state
        out.square().mean().backward()
        got.append((out.detach(), [p.grad.clone() for p in m.gates.parameters()]))
    torch.testing.assert_close(got[0][0], got[1][0], atol=1e-5, rtol=1e-4)
    for a, b in zip(got[0][1], got[1][1]):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)
    assert any(float(g.abs().sum()) > 0 for g in got[0][1])
