"""EMR-Merging against the paper's formulas (arXiv 2405.17461, Sec. 3), on really fine-tuned MiniLM experts."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import BertModel

import mergelab.routed as routed
from mergelab.errors import CheckpointError
from mergelab.routed.emr import emr_merge, save_emr


def oracle(base, experts):
    """Elect / mask / rescale written out in numpy; rescalers for both reductions."""
    keys = [k for k, v in base.items() if v.is_floating_point()]
    uni, masks = {}, [{} for _ in experts]
    sums = {r: (np.zeros(len(experts)), np.zeros(len(experts))) for r in ("tensor_mean", "element_sum")}
    for key in keys:
        taus = np.stack([(e[key].float() - base[key].float()).numpy().astype(np.float64) for e in experts])
        eps = np.where(taus.sum(0) > 0, 1.0, -1.0)  # the code's convention: -1 where the sum is 0
        agree = np.sign(taus) == eps
        u = eps * np.max(np.where(agree, np.abs(taus), 0.0), axis=0)
        uni[key] = u
        for k in range(len(experts)):
            masks[k][key] = agree[k]
            a, b = np.abs(taus[k]), np.abs(u * agree[k])
            sums["tensor_mean"][0][k] += a.mean()
            sums["tensor_mean"][1][k] += b.mean()
            sums["element_sum"][0][k] += a.sum()  # the paper: sums over all elements
            sums["element_sum"][1][k] += b.sum()
    return uni, masks, {r: n / d for r, (n, d) in sums.items()}


@pytest.fixture(scope="module")
def emr_oracle(family_states):
    config, tok, base, experts, tasks = family_states
    return oracle(base, experts)


def test_elect_mask_rescale_match_the_paper(family_states, emr_oracle):
    config, tok, base, experts, tasks = family_states
    uni, masks, lam = emr_oracle
    res = emr_merge(base, experts, tasks)  # default: tensor_mean (the reference code)
    for key in uni:
        np.testing.assert_array_equal(res.unified[key].double().numpy(), uni[key], err_msg=key)
        for k in range(len(experts)):
            assert np.array_equal(res.masks[k][key].numpy(), masks[k][key]), (key, k)
    np.testing.assert_allclose(res.rescalers, lam["tensor_mean"], rtol=1e-9)
    paper = emr_merge(base, experts, tasks, "element_sum")
    np.testing.assert_allclose(paper.rescalers, lam["element_sum"], rtol=1e-9)
    # the two reductions really differ on real weights (small tensors weigh more in tensor_mean)
    assert max(abs(a - b) for a, b in zip(paper.rescalers, res.rescalers)) > 1e-3
    assert all(torch.equal(paper.unified[k], res.unified[k]) for k in uni)


def test_saved_folder_runs_each_task(family_states, emr_oracle, batch, tmp_path):
    config, tok, base, experts, tasks = family_states
    res = emr_merge(base, experts, tasks)
    out = save_emr(tmp_path / "emr", res, base, config, tasks)
    model = routed.load(out)
    uni, masks, lam = emr_oracle
    lam = lam["tensor_mean"]
    fresh = {}
    for k, t in enumerate(tasks):
        state = {key: torch.from_numpy(base[key].double().numpy() + lam[k] * masks[k][key] * uni[key]).float()
                 for key in uni}
        ref = BertModel(config, add_pooling_layer=True).eval()
        ref.load_state_dict({**base, **state}, strict=False)
        with torch.no_grad():
            want = ref(**batch).last_hidden_state
            got = model(task=t, **batch).last_hidden_state
        torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)
        fresh[t] = got
    with torch.no_grad():  # switching tasks A -> B -> A gives what a fresh build of A gives
        again = model(task=tasks[0], **batch).last_hidden_state
    assert torch.equal(again, fresh[tasks[0]])
    # bit-packed masks: one bit per element of each stored tensor, plus a scalar per task
    n = sum(v.numel() for k, v in res.unified.items() if bool(v.ne(0).any()))
    assert model.sizes["mask_bytes"] <= len(tasks) * (n // 8 + len(res.unified))
    assert model.sizes["mask_bytes"] >= len(tasks) * n // 8
    with pytest.raises(Exception, match="unknown task 'nope'"):
        model(task="nope", **batch)
    with pytest.raises(Exception, match="the task must be given"):
        model(**batch)


def test_one_expert_and_disjoint_supports_give_the_experts_back():
    torch.manual_seed(0)
    base = {"a": torch.randn(6, 5), "b": torch.randn(7)}
    e1 = {k: v + torch.randn(v.shape) for k, v in base.items()}
    res = emr_merge(base, [e1], ["x"])
    assert res.rescalers == [1.0]
    for k in base:
        torch.testing.assert_close(base[k] + res.unified[k] * res.masks[0][k], e1[k], atol=0, rtol=0)
    # disjoint supports: each expert is rebuilt exactly
    sel = torch.rand(6, 5) < 0.5
    d = torch.randn(6, 5)
    x = {"a": base["a"] + d * sel, "b": base["b"]}
    y = {"a": base["a"] + d * ~sel, "b": base["b"] + 1.0}
    res = emr_merge(base, [x, y], ["x", "y"])
    for k, e in enumerate((x, y)):
        for key in base:
            got = base[key] + res.rescalers[k] * res.unified[key] * res.masks[k][key]
            torch.testing.assert_close(got, e[key], atol=1e-6, rtol=0)


def test_bad_input_is_refused_and_nothing_is_written(family_states, tmp_path):
    config, tok, base, experts, tasks = family_states
    small = {"a": torch.zeros(3, 3)}
    with pytest.raises(CheckpointError, match="expert 'y': tensor 'a' has shape \\(3, 4\\)"):
        emr_merge(small, [small, {"a": torch.zeros(3, 4)}], ["x", "y"])
    with pytest.raises(CheckpointError, match="expert 'y' lacks tensor 'a'"):
        emr_merge(small, [small, {"b": torch.zeros(3, 3)}], ["x", "y"])
    with pytest.raises(Exception, match="rescale_reduction must be one of"):
        emr_merge(small, [small], ["x"], "median")
    with pytest.raises(CheckpointError, match="not a routed model"):
        routed.load(tmp_path)
    res = emr_merge(small, [small], ["x"])
    (tmp_path / "exists").mkdir()
    with pytest.raises(Exception, match="exists"):
        save_emr(tmp_path / "exists", res, small, config, ["x"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exists"]
