"""DOGE task arithmetic: against a test oracle transcribed from FusionBench's DOGE-TA math, and invariants."""

import numpy as np
import torch

import mergelab
from mergelab.methods.doge import doge_gradient, optimise_delta, shared_projector, task_coefficients
from tests.methods.papers_support import merge_model, rand


# ----------------------------------------------------------------------------- test oracle
# Written from the math of fusion_bench ``DOGE_TA_Algorithm``: the loss of ``taskvector_loss`` (autograd),
# lambda = eta / ||tau||, the projector from the SVD of the concatenated top-floor(r/T) left singular
# vectors, Adam on delta with the gradient projected (g - P g) before each step, the global top-K mask of
# ``topk_values_mask`` (kthvalue of |tau| at d - int(d K), >=) over the flattened layers, then
# base + sum lambda (tau + delta) * mask.
def reference_loss(vectors, delta, lams):
    total = 0.0
    scaled = (vectors * lams.view(-1, 1, 1)).sum(0)
    delta_scaled = (delta.unsqueeze(0) * lams.view(-1, 1, 1)).sum(0)
    for v in vectors:
        expression = -v * scaled - v * delta_scaled + v * v
        total = total + expression.sum(dim=1).pow(2).sum()
    return total


def reference_projector(vectors, subspace):
    t = vectors.shape[0]
    sum_u = None
    for i, layer in enumerate(vectors):
        u, s, v = torch.linalg.svd(layer.double(), full_matrices=False)
        if sum_u is None:
            sum_u = torch.zeros_like(u)
        k = int(s.shape[0] / t)
        sum_u[:, i * k:(i + 1) * k] = u[:, :k]
    uu, _, _ = torch.linalg.svd(sum_u, full_matrices=False)
    kp = int(s.shape[0] / subspace)
    return (uu[:, :kp] @ uu[:, :kp].T).float()


def doge_oracle(tensors, eta, subspace, K, steps, lr):
    names = sorted(tensors)
    vecs = {k: torch.stack([m - tensors[k]["base"] for m in tensors[k]["models"]]) for k in names}
    lams = {k: torch.stack([eta / torch.norm(v) for v in vecs[k]]) for k in names}
    deltas = {}
    for k in names:
        delta = torch.nn.Parameter(torch.zeros_like(vecs[k][0]))
        opt = torch.optim.Adam([delta], lr=lr)
        proj = reference_projector(vecs[k], subspace)
        for _ in range(steps):
            opt.zero_grad()
            reference_loss(vecs[k], delta, lams[k]).backward()
            delta.grad.data = delta.grad.data.sub_(proj @ delta.grad.detach())
            opt.step()
        deltas[k] = delta.detach()
    n = vecs[names[0]].shape[0]
    out = {}
    flat = torch.stack([torch.cat([vecs[k][i].reshape(-1) for k in names]) for i in range(n)])
    d = flat.shape[1]
    kth = flat.abs().kthvalue(d - int(d * K), dim=1, keepdim=True).values
    masks = flat.abs() >= kth
    offset = 0
    for k in names:
        size = vecs[k][0].numel()
        m = masks[:, offset:offset + size].reshape(vecs[k].shape)
        offset += size
        out[k] = tensors[k]["base"] + (lams[k].view(-1, 1, 1) * (vecs[k] + deltas[k]) * m).sum(0)
    return out


def layers(n=3, seed=0, shapes=((6, 5), (4, 7))):
    tensors = {}
    for j, shape in enumerate(shapes):
        b = rand(*shape, seed=seed + j)
        tensors[f"model.layers.{j}.w"] = {"base": b, "layer": j,
                                          "models": [b + 0.1 * rand(*shape, seed=seed + 10 * j + i) for i in range(n)]}
    return tensors


def test_closed_form_gradient_equals_autograd_of_the_reference_loss():
    tau = torch.stack([rand(5, 4, seed=s) for s in range(3)])
    lam = task_coefficients(tau, 0.07)
    delta = 0.1 * rand(5, 4, seed=9)
    d = delta.clone().requires_grad_(True)
    reference_loss(tau, d, lam).backward()
    torch.testing.assert_close(doge_gradient(tau, lam, delta), d.grad, rtol=1e-5, atol=1e-7)


def test_projector_matches_reference():
    tau = torch.stack([rand(8, 6, seed=s) for s in range(2)])
    torch.testing.assert_close(shared_projector(tau, 2), reference_projector(tau, 2), rtol=0, atol=1e-6)


def test_full_merge_matches_reference_oracle():
    tensors = layers()
    params = dict(eta=0.07, subspace=2, density=0.3, steps=25, lr=1e-2)
    out = merge_model("doge_ta", tensors, num_layers=2, **params)
    expect = doge_oracle(tensors, 0.07, 2, 0.3, 25, 1e-2)
    for k in tensors:
        torch.testing.assert_close(out[k], expect[k], rtol=1e-4, atol=1e-6)


def test_with_sgd_the_modification_stays_outside_the_shared_subspace():
    tau = torch.stack([rand(8, 6, seed=s) for s in range(3)])
    lam = task_coefficients(tau, 0.5)
    proj = shared_projector(tau, 2)
    assert proj.abs().sum() > 0
    delta = optimise_delta(tau, lam, proj, steps=50, lr=1e-3, optimizer="sgd")
    assert delta.abs().max() > 1e-4
    torch.testing.assert_close(proj @ delta, torch.zeros_like(delta), rtol=0, atol=1e-6)


def test_no_steps_and_full_density_is_task_arithmetic_with_per_layer_lambdas():
    tensors = layers(seed=4)
    out = merge_model("doge_ta", tensors, num_layers=2, steps=0, density=1.0)
    for k, t in tensors.items():
        tau = torch.stack([m - t["base"] for m in t["models"]])
        lam = torch.stack([0.07 / v.norm() for v in tau])
        torch.testing.assert_close(out[k], t["base"] + (lam.view(-1, 1, 1) * tau).sum(0))


def test_loss_does_not_increase_with_a_small_sgd_step():
    tau = torch.stack([rand(6, 5, seed=s) for s in range(3)])
    lam = task_coefficients(tau, 0.07)
    losses = []
    for steps in range(0, 30, 5):
        delta = optimise_delta(tau, lam, torch.zeros(6, 6), steps=steps, lr=1e-3, optimizer="sgd")
        losses.append(float(reference_loss(tau, delta, lam)))
    assert all(b <= a + 1e-9 for a, b in zip(losses, losses[1:]))
    assert losses[-1] < losses[0]


def test_deterministic_and_non_block_tensors_keep_the_base():
    tensors = layers(seed=8)
    tensors["model.norm.weight"] = {"base": rand(5, seed=1), "layer": None,
                                    "models": [rand(5, seed=2), rand(5, seed=3), rand(5, seed=4)]}
    tensors["model.layers.0.bias"] = {"base": rand(5, seed=5), "models": [rand(5, seed=6)] * 3, "layer": 0}
    a = merge_model("doge_ta", tensors, num_layers=2, steps=10)
    b = merge_model("doge_ta", tensors, num_layers=2, steps=10)
    for k in tensors:
        assert torch.equal(a[k], b[k])
    assert torch.equal(a["model.norm.weight"], tensors["model.norm.weight"]["base"])
    assert torch.equal(a["model.layers.0.bias"], tensors["model.layers.0.bias"]["base"])


def test_more_tasks_than_rank_gives_no_projection():
    tau = torch.stack([rand(2, 6, seed=s) for s in range(3)])
    assert torch.equal(shared_projector(tau, 6), torch.zeros(2, 2))


def test_reachable_from_the_python_api():
    tensors = layers(n=2, seed=12)
    base = {k: v["base"] for k, v in tensors.items()}
    models = [{k: v["models"][i] for k, v in tensors.items()} for i in range(2)]
    out = mergelab.merge_state_dicts(base, models, "doge_ta", steps=5, subspace=2)
    expect = doge_oracle(tensors, 0.07, 2, 0.3, 5, 1e-4)
    for k in tensors:
        np.testing.assert_allclose(out[k].numpy(), expect[k].numpy(), rtol=1e-4, atol=1e-6)
