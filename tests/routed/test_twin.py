"""Twin-Merging (NeurIPS 2024) on really fine-tuned MiniLM experts: the reference's identities."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from transformers import BertModel

import mergelab.routed as routed
from mergelab.routed.twin import TwinConfig, build_twin, shared_and_exclusive

TEXTS = {
    "sentiment": ["a wonderful film", "terrible acting", "i loved it", "boring and bad", "great fun", "awful"],
    "language": ["bonjour le monde", "hola amigo", "guten tag", "ciao bella", "merci beaucoup", "danke schon"],
    "syllables": ["cat", "banana", "elephant", "dog", "umbrella", "tree"],
}


def ref_output(config, state, batch):
    m = BertModel(config, add_pooling_layer=True).eval()
    m.load_state_dict(state, strict=False)
    with torch.no_grad():
        return m(**batch).last_hidden_state


@pytest.fixture(scope="module")
def twin_full(family_states, tmp_path_factory):
    """A full-rank Twin model (density 1): every exclusive part kept exactly (up to SVD rounding)."""
    config, tok, base, experts, tasks = family_states
    data = []
    for t in tasks:
        enc = tok(TEXTS[t], padding=True, return_tensors="pt")
        ids = enc["input_ids"].clamp_max(config.vocab_size - 1)
        data.append([{"input_ids": ids, "attention_mask": enc["attention_mask"]}])
    cfg = TwinConfig(density=1.0, router_hidden=16, router_epochs=30, router_lr=1e-2)
    out = build_twin(tmp_path_factory.mktemp("twin") / "twin", base, experts, tasks, config, data, cfg)
    return out, routed.load(out)


def test_one_hot_full_rank_gives_each_expert(family_states, twin_full, batch):
    config, tok, base, experts, tasks = family_states
    out, model = twin_full
    n = batch["input_ids"].shape[0]
    for k, t in enumerate(tasks):
        w = torch.zeros(n, len(tasks))
        w[:, k] = 1.0
        with torch.no_grad():
            got = model(weights=w, **batch).last_hidden_state
        torch.testing.assert_close(got, ref_output(config, experts[k], batch), atol=2e-4, rtol=1e-3)
    # mixed routes in one batch: row i takes expert i % K
    w = torch.zeros(n, len(tasks))
    w[torch.arange(n), torch.arange(n) % len(tasks)] = 1.0
    with torch.no_grad():
        got = model(weights=w, **batch).last_hidden_state
    for i in range(n):
        one = {k: v[i:i + 1] for k, v in batch.items()}
        torch.testing.assert_close(got[i:i + 1], ref_output(config, experts[i % len(tasks)], one), atol=2e-4, rtol=1e-3)


def test_uniform_weights_give_shared_plus_mean_exclusive(family_states, twin_full, batch):
    config, tok, base, experts, tasks = family_states
    out, model = twin_full
    K = len(tasks)
    # the shared model: task arithmetic, lambda 0.3, written from its formula
    shared = {k: base[k] + 0.3 * sum(e[k] - base[k] for e in experts) for k in base if base[k].is_floating_point()}
    want = {k: shared[k] + sum(e[k] - shared[k] for e in experts) / K for k in shared}
    w = torch.full((batch["input_ids"].shape[0], K), 1.0 / K)
    with torch.no_grad():
        got = model(weights=w, **batch).last_hidden_state
    torch.testing.assert_close(got, ref_output(config, want, batch), atol=2e-4, rtol=1e-3)
    # the router: trained on the task ids of its inputs, it routes them back to their task
    manifest = json.loads((out / "routed.json").read_text())
    assert manifest["router_accuracy"] >= 0.5
    with torch.no_grad():
        r = model.route(**batch)
    torch.testing.assert_close(r.sum(-1), torch.ones(r.shape[0]))


def test_truncation_error_and_size_accounting(family_states, twin_full):
    config, tok, base, experts, tasks = family_states
    key = "encoder.layer.0.intermediate.dense.weight"
    few = [key, "encoder.layer.0.output.LayerNorm.weight"]
    shared, exclusive, info = shared_and_exclusive({k: base[k] for k in few}, [{k: e[k] for k in few} for e in experts],
                                                   tasks, TwinConfig(rank=3))
    d = (experts[1][key] - shared[key]).double().numpy()
    s = np.linalg.svd(d, compute_uv=False)
    U, S, Vh = exclusive[1][key]
    err = np.linalg.norm(((U * S) @ Vh).double().numpy() - d)
    np.testing.assert_allclose(err, np.sqrt((s[3:] ** 2).sum()), rtol=1e-4)  # Eckart-Young
    assert U.shape == (1536, 3) and Vh.shape == (3, 384)
    assert torch.is_tensor(exclusive[1]["encoder.layer.0.output.LayerNorm.weight"])  # 1-D stays dense
    # sizes of the full-rank folder: K * sum r (m + n + 1) + dense 1-D deltas + router, float32
    out, model = twin_full
    s = model.sizes
    shared = {k: base[k] + 0.3 * sum(e[k] - base[k] for e in experts) for k in base if base[k].is_floating_point()}
    expect = 0
    for k in range(len(tasks)):
        for name, v in base.items():
            if not v.is_floating_point() or all(torch.equal(e[name], shared[name]) for e in experts):
                continue
            expect += 4 * (min(v.shape) * (sum(v.shape) + 1) if v.dim() == 2 else v.numel())
    assert s["exclusive_bytes"] == expect
    assert s["extra_bytes"] == s["exclusive_bytes"] + s["router_bytes"]
    assert s["vs_all_experts"] == round((s["one_model_bytes"] + s["extra_bytes"]) / (3 * s["one_model_bytes"]), 4)


def test_shared_model_from_another_method(family_states):
    """The shared knowledge may come from any registered method: with ``linear`` (mergekit's weighted average;
    weights 1, normalised) theta_s is the mean of the experts, and at full rank theta_s + delta_k is still
    expert k."""
    config, tok, base, experts, tasks = family_states
    few = ["encoder.layer.0.intermediate.dense.weight", "encoder.layer.0.output.LayerNorm.weight",
           "encoder.layer.0.attention.self.query.bias"]
    b, ex = {k: base[k] for k in few}, [{k: e[k] for k in few} for e in experts]
    shared, exclusive, info = shared_and_exclusive(b, ex, tasks, TwinConfig(shared_method="linear", shared_params={},
                                                                            density=1.0))
    assert info["shared_method"] == "linear"
    for key in few:
        torch.testing.assert_close(shared[key], sum(e[key] for e in ex) / len(ex), rtol=1e-6, atol=1e-7)
        for k, e in enumerate(ex):
            d = exclusive[k][key]
            back = (d[0] * d[1]) @ d[2] if isinstance(d, tuple) else d
            torch.testing.assert_close(shared[key] + back, e[key], rtol=1e-4, atol=1e-5)
    default, _, _ = shared_and_exclusive(b, ex, tasks, TwinConfig(density=1.0))  # task arithmetic, lambda 0.3
    assert not torch.allclose(default[few[0]], shared[few[0]], atol=1e-6)


def test_bad_input_before_any_work(family_states, tmp_path):
    from mergelab.errors import MergeLabError

    config, tok, base, experts, tasks = family_states
    ok = [{"input_ids": torch.tensor([[101, 102]]), "attention_mask": torch.tensor([[1, 1]])}]
    with pytest.raises(MergeLabError, match="no router inputs for task 'language'"):
        build_twin(tmp_path / "t", base, experts, tasks, config, [ok, [], ok])
    with pytest.raises(MergeLabError, match="router inputs for 2 tasks, 3 experts"):
        build_twin(tmp_path / "t", base, experts, tasks, config, [ok, ok])
    with pytest.raises(MergeLabError, match="rank must be an integer >= 1"):
        build_twin(tmp_path / "t", base, experts, tasks, config, [ok] * 3, TwinConfig(rank=0))
    assert list(tmp_path.iterdir()) == []


def test_router_keeps_the_most_confident_of_equally_accurate_epochs():
    """Once the held-back accuracy saturates, the router kept is the epoch of lowest held-back cross-entropy,
    not the first to reach that accuracy (an under-trained router whose softmax mixes in other tasks'
    exclusive parts: on llmmix's four tasks a mean own weight of 0.57-0.80 at full rank)."""
    from mergelab.routed.twin import train_router

    g = torch.Generator().manual_seed(1)
    labels = torch.arange(60) % 3
    feats = torch.randn(60, 8, generator=g) + 10.0 * torch.nn.functional.one_hot(labels, 8).float()
    cfg = TwinConfig(router_hidden=16, router_epochs=25, router_batch=16)
    router, info = train_router(feats, labels, 3, cfg)
    acc, loss = info["accuracy_by_epoch"], info["loss_by_epoch"]
    assert len(acc) == len(loss) == 25 and info["router_heldback"] == 12
    top = max(acc)
    first = acc.index(top)
    ties = [e for e in range(25) if acc[e] == top]
    want = min(ties, key=lambda e: loss[e])
    assert info["router_epoch"] == want and want != first  # the first perfect epoch is not the most confident
    assert info["router_accuracy"] == top and info["router_heldback_loss"] == loss[want]
    # the returned weights are that epoch's: recompute the held-back loss on the same seeded fifth
    order = torch.randperm(60, generator=torch.Generator().manual_seed(cfg.seed))
    val = order[:12]
    with torch.no_grad():
        got = float(torch.nn.functional.cross_entropy(router(feats[val]), labels[val]))
    assert got == pytest.approx(loss[want], rel=1e-6)


def test_a_router_trained_once_gives_the_folders_of_training_it_per_rank(family_states, tmp_path):
    """A rank sweep trains the router once (`train_twin_router`) and passes it to `build_twin` for every
    rank: each folder holds the same tensors and routes as the folder trained on its own (today's path),
    and the router's tensors are the same at every rank."""
    from safetensors.torch import load_file

    from mergelab.errors import MergeLabError
    from mergelab.routed.twin import train_twin_router

    config, tok, base, experts, tasks = family_states
    data = []
    for t in tasks:
        enc = tok(TEXTS[t], padding=True, return_tensors="pt")
        data.append([{"input_ids": enc["input_ids"].clamp_max(config.vocab_size - 1),
                      "attention_mask": enc["attention_mask"]}])
    probe = {"input_ids": data[0][0]["input_ids"][:3], "attention_mask": data[0][0]["attention_mask"][:3]}

    def cfg(rank):
        return TwinConfig(rank=rank, router_hidden=16, router_epochs=12, router_lr=1e-2)

    trained = train_twin_router(base, experts, tasks, config, data, cfg(None))
    names = ("shared", "exclusive", "router")
    routers = []
    for rank in (2, 8):
        own = build_twin(tmp_path / f"own-{rank}", base, experts, tasks, config, data, cfg(rank))
        once = build_twin(tmp_path / f"once-{rank}", base, experts, tasks, config, None, cfg(rank), router=trained)
        for n in names:
            a, b = load_file(str(own / f"{n}.safetensors")), load_file(str(once / f"{n}.safetensors"))
            assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a), n
        ma, mb = (json.loads((f / "routed.json").read_text()) for f in (own, once))
        assert ma == mb
        routers.append(load_file(str(once / "router.safetensors")))
        a, b = routed.load(own), routed.load(once)
        with torch.no_grad():
            assert torch.equal(a.route(**probe), b.route(**probe))
            assert torch.equal(a(**probe).last_hidden_state, b(**probe).last_hidden_state)
    assert all(torch.equal(routers[0][k], routers[1][k]) for k in routers[0])
    # a router trained with other router settings, or for other tasks, is refused before anything is written
    with pytest.raises(MergeLabError, match="router_epochs=12"):
        build_twin(tmp_path / "x", base, experts, tasks, config, None,
                   TwinConfig(rank=2, router_hidden=16, router_epochs=13, router_lr=1e-2), router=trained)
    with pytest.raises(MergeLabError, match="routes tasks"):
        build_twin(tmp_path / "x", base, experts, list(reversed(tasks)), config, None, cfg(2), router=trained)
    with pytest.raises(MergeLabError, match="router inputs for 0 tasks"):
        build_twin(tmp_path / "x", base, experts, tasks, config, None, cfg(2))
    assert not (tmp_path / "x").exists()


def test_a_router_trained_for_other_experts_is_refused_before_anything_is_written(family_states, tmp_path):
    """A router trained for experts (A, B) given to `build_twin` with (A, C) under the same task names is
    refused, naming the expert that differs; so is one given another base; nothing is written."""
    from mergelab.errors import MergeLabError
    from mergelab.routed.twin import train_twin_router

    config, tok, base, experts, tasks = family_states
    names = tasks[:2]
    data = []
    for t in names:
        enc = tok(TEXTS[t], padding=True, return_tensors="pt")
        data.append([{"input_ids": enc["input_ids"].clamp_max(config.vocab_size - 1),
                      "attention_mask": enc["attention_mask"]}])
    cfg = TwinConfig(rank=2, router_hidden=8, router_epochs=2, router_lr=1e-2)
    trained = train_twin_router(base, experts[:2], names, config, data, cfg)
    with pytest.raises(MergeLabError, match=f"this expert '{names[1]}'"):
        build_twin(tmp_path / "x", base, [experts[0], experts[2]], names, config, None, cfg, router=trained)
    other_base = dict(base)
    k = next(n for n, v in base.items() if v.is_floating_point() and v.dim() == 2)
    other_base[k] = base[k] + 1e-3
    with pytest.raises(MergeLabError, match="this base"):
        build_twin(tmp_path / "x", other_base, experts[:2], names, config, None, cfg, router=trained)
    assert not (tmp_path / "x").exists()
    # the same inputs are accepted
    assert (build_twin(tmp_path / "ok", base, experts[:2], names, config, None, cfg, router=trained)
            / "routed.json").exists()
