"""Coefficient spaces (tune/functional.py): assembly identities, chunk semantics, chain-rule gradients."""

import pytest
import torch
from safetensors.torch import save_file

from mergelab.errors import CheckpointError
from mergelab.tune.functional import CoefficientSpace, ModelPool, chunkscale
from tests.tune import toy


def test_chunkscale_follows_torch_chunk():
    t = torch.arange(1.0, 11.0).reshape(2, 5)
    torch.testing.assert_close(chunkscale(t, torch.tensor([3.0])), 3 * t)
    w = torch.arange(10.0)
    torch.testing.assert_close(chunkscale(t, w), t * w.reshape(2, 5))
    w3 = torch.tensor([1.0, 10.0, 100.0])  # 10 elements in 3 chunks: torch.chunk gives 4, 4, 2
    pieces = torch.chunk(t.reshape(-1), 3)
    expected = torch.cat([p * s for p, s in zip(pieces, w3)]).reshape(2, 5)
    torch.testing.assert_close(chunkscale(t, w3), expected)


def test_assembly_identities():
    base = toy.state(toy.ToyTasks())
    ex = toy.experts(base, 2)
    keys = list(base)
    space = CoefficientSpace(base, ModelPool(ex), keys, "tensor", init=0.0)
    for k, v in space.assemble().items():
        torch.testing.assert_close(v, base[k].float())
    one = CoefficientSpace(base, ModelPool(ex[:1]), keys, "task", init=1.0)
    for k, v in one.assemble().items():
        torch.testing.assert_close(v, ex[0][k].float())
    mixed = CoefficientSpace(base, ModelPool(ex), keys, "task", init=0.25, exclude=["2.bias"])
    out = mixed.assemble()
    torch.testing.assert_close(out["0.weight"], (base["0.weight"] + 0.25 * (ex[0]["0.weight"] - base["0.weight"])
                                                 + 0.25 * (ex[1]["0.weight"] - base["0.weight"])).float())
    torch.testing.assert_close(out["2.bias"], base["2.bias"].float())
    assert space.num_coefficients() == 2 * len(keys)  # layer-wise: one per model and named tensor
    chunked = CoefficientSpace(base, ModelPool(ex), keys, "chunk", init=0.1, activation="sigmoid",
                               chunks={"0.weight": 4, "2.bias": 0})
    assert chunked.columns == 4 + 1 + 1  # 0.weight: 4 chunks, 0.bias and 2.weight: 1, 2.bias frozen
    frozen = chunked.assemble()["2.bias"]
    torch.testing.assert_close(frozen, (base["2.bias"] + 0.1 * sum(e["2.bias"] - base["2.bias"] for e in ex)).float())


@pytest.mark.parametrize("granularity,activation,clamp", [("task", "identity", False), ("tensor", "identity", True),
                                                          ("chunk", "sigmoid", False)])
def test_chain_rule_gradient_equals_autograd_through_the_merge(granularity, activation, clamp):
    model = toy.ToyTasks()
    base = toy.state(model)
    ex = toy.experts(base, 3)
    keys = list(base)
    space = CoefficientSpace(base, ModelPool(ex), keys, granularity, init=0.3 if activation == "identity" else 0.2,
                             activation=activation, clamp=clamp, chunks={"0.weight": 3, "2.weight": 2})
    with torch.no_grad():
        space.raw.add_(torch.linspace(-0.2, 0.9, space.raw.numel()).reshape(space.raw.shape))
    batch = toy.batches(1)[0][0]

    def loss_of(theta):
        return torch.log_softmax(model.rows({k: v.double() for k, v in theta.items()}, batch, 0), -1)[:, 0].sum()

    # chain rule: dL/dtheta, then <dL/dtheta, tau> streamed over the pool
    w = space.weights()
    theta = {k: v.detach().requires_grad_(True) for k, v in space.assemble(w).items()}
    grads = torch.autograd.grad(loss_of(theta), list(theta.values()))
    space.backward(w, dict(zip(theta, grads)))
    chain = space.raw.grad.clone()
    # oracle: differentiate straight through theta(w) built with autograd
    space.raw.grad = None
    w2 = space.weights()
    direct = {}
    for k in keys:
        t = base[k].float().clone()
        for i, e in enumerate(ex):
            t = t + chunkscale((e[k] - base[k]).float(), space.tensor_weights(w2, i, k))
        direct[k] = t
    loss_of(direct).backward()
    torch.testing.assert_close(chain, space.raw.grad, atol=1e-5, rtol=1e-4)


def test_stream_storage_equals_memory_and_rereads(tmp_path):
    base = toy.state(toy.ToyTasks())
    ex = toy.experts(base, 3)
    paths = []
    for i, e in enumerate(ex):
        paths.append(tmp_path / f"e{i}.safetensors")
        save_file({k: v.float().contiguous() for k, v in e.items()}, str(paths[-1]))
    mem = CoefficientSpace(base, ModelPool(ex), list(base), "tensor", init=0.4)
    pool = ModelPool(paths)
    stream = CoefficientSpace(base, pool, list(base), "tensor", init=0.4, storage="stream")
    for _ in range(2):
        a, b = mem.assemble(), stream.assemble()
        for k in a:
            torch.testing.assert_close(a[k], b[k])
    assert pool.reads == 6  # streamed: every pass reads every model again, one at a time
    with pytest.raises(CheckpointError, match="lacks tensor"):
        ModelPool([{"0.weight": torch.zeros(1)}]).load(0, ["missing"])
