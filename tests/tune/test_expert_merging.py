"""Expert Merging / ++ (tune/expert_merging.py): zero loss at the expert, monotone pull, regulariser, chunks."""

import torch

from mergelab.tune.expert_merging import (ExpertMergingConfig, alignment_loss, expert_merging, expert_merging_pp,
                                          expert_targets, importance_chunks)
from mergelab.tune.functional import ModelPool
from tests.tune import toy

NO_EXCLUDE = ExpertMergingConfig(exclude="")


def _setup(k=1, seed=1):
    model = toy.ToyTasks()
    base = toy.state(model)
    experts = toy.experts(base, k, scale=0.8, seed=seed)
    data = [[{"x": b["x"]} for b in d] for d in toy.batches(k, n=8, per_batch=1)]
    return model, base, experts, data


def test_loss_is_zero_at_the_expert_and_gradient_descent_raises_w_monotonically():
    model, base, experts, data = _setup()
    pool = ModelPool(experts)
    keys = list(base)
    cfg = ExpertMergingConfig(exclude="", gamma=0.0, grad_accumulation=1, epochs=3, hidden_layers=[1])
    targets = expert_targets(model, pool, keys, data, [1])
    for t in targets[0]:
        assert float(alignment_loss(model, {k: v.float() for k, v in experts[0].items()}, t, cfg, [1])) < 1e-10
    res = expert_merging(model, base, pool, data, cfg)
    w = [h["mean_weight"] for h in res.history]
    assert w[0] > 0.1
    assert all(b >= a - 1e-9 for a, b in zip(w, w[1:]))
    assert w[-1] > 0.3
    losses = [h["alignment"] for h in res.history]
    assert sum(losses[-8:]) < sum(losses[:8])


def test_strong_regulariser_keeps_w_at_its_initial_value():
    model, base, experts, data = _setup()
    free = expert_merging(model, base, ModelPool(experts), data,
                          ExpertMergingConfig(exclude="", gamma=0.0, lr=0.05, grad_accumulation=1, epochs=2))
    held = expert_merging(model, base, ModelPool(experts), data,
                          ExpertMergingConfig(exclude="", gamma=1e6, lr=0.05, grad_accumulation=1, epochs=2))

    def drift(res):
        return max(abs(v - 0.1) for per in res.coefficients.values() for vs in per.values() for v in vs)

    assert drift(held) < 0.01 < drift(free)


def test_excluded_tensors_keep_the_base_value():
    model, base, experts, data = _setup(k=2)
    res = expert_merging(model, base, ModelPool(experts), data,
                         ExpertMergingConfig(exclude=r"bias", epochs=1, grad_accumulation=2))
    for k in ("0.bias", "2.bias"):
        torch.testing.assert_close(res.state[k], base[k].float())
    assert res.info["excluded"] == ["0.bias", "2.bias"]
    assert not torch.allclose(res.state["0.weight"], base["0.weight"].float())
    assert set(res.coefficients["model_0"]) == {"0.weight", "2.weight"}


def test_importance_guided_chunks_follow_the_importance_score():
    model, base, experts, data = _setup(k=2)
    for e in experts:  # make 2.weight's task vectors much larger per element than 0.weight's
        e["2.weight"] = base["2.weight"] + 10 * (e["2.weight"] - base["2.weight"])
    pool = ModelPool(experts)
    cfg = ExpertMergingConfig(exclude="bias", epochs=1, grad_accumulation=4)
    first = expert_merging(model, base, pool, data, cfg, chunks={})
    counts = importance_chunks(first, base, pool, budget=12)
    assert counts["2.weight"] > counts["0.weight"] >= 1
    # the score, recomputed independently
    score = {}
    for k in ("0.weight", "2.weight"):
        score[k] = sum(sum(first.coefficients[n][k]) / len(first.coefficients[n][k])
                       * float((e[k] - base[k]).norm()) / (e[k].numel() ** 0.5)
                       for n, e in zip(pool.names, experts)) / 2
    total = sum(score.values())
    assert counts == {k: max(1, round(12 * s / total)) for k, s in score.items()}
    pp = expert_merging_pp(model, base, pool, data, cfg, budget=12)
    assert pp.info["chunks"] == {k: len(torch.chunk(torch.empty(base[k].numel()), v)) for k, v in counts.items()}
    assert pp.info["coefficients"] == 2 * sum(pp.info["chunks"].values())


def test_sample_order_is_round_robin_and_the_seed_shuffles_within_rounds():
    from mergelab.tune.expert_merging import sample_order

    sizes = [3, 1, 2, 3]
    plain = sample_order(sizes, epoch=0)
    assert plain == [(0, 0), (1, 0), (2, 0), (3, 0), (0, 1), (2, 1), (3, 1), (0, 2), (3, 2)]
    assert sample_order(sizes, epoch=5, seed=9) == plain  # no shuffle: the seed has nothing to seed
    shuffled = {seed: [sample_order(sizes, e, True, seed) for e in range(4)] for seed in range(6)}
    for orders in shuffled.values():
        for order in orders:  # every round still holds sample j of each expert that has one, once
            assert sorted(order, key=lambda p: (p[1], p[0])) == plain
            assert [j for _, j in order] == [j for _, j in plain]
    assert shuffled[0] == [sample_order(sizes, e, True, 0) for e in range(4)]  # reproducible
    assert len({str(o) for o in shuffled.values()}) > 1  # the seed changes the order
    assert len({str(o) for o in shuffled[0]}) > 1  # drawn anew every epoch


def test_seed_changes_a_shuffled_run_and_not_a_plain_one():
    model, base, experts, data = _setup(k=3)

    def run(**kw):
        cfg = ExpertMergingConfig(exclude="", epochs=1, grad_accumulation=2, **kw)
        return expert_merging(model, base, ModelPool(experts), data, cfg)

    a, b = run(seed=0), run(seed=1)
    assert [h["expert"] for h in a.history] == [0, 1, 2] * 8
    for k in a.state:
        assert torch.equal(a.state[k], b.state[k])
    s0, s0b, s1 = run(shuffle=True, seed=0), run(shuffle=True, seed=0), run(shuffle=True, seed=1)
    assert [h["expert"] for h in s0.history] != [h["expert"] for h in s1.history]
    assert all(torch.equal(s0.state[k], s0b.state[k]) for k in s0.state)
    assert any(not torch.equal(s0.state[k], s1.state[k]) for k in s0.state)
