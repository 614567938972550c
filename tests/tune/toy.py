"""A float64 toy classifier called through torch.func.functional_call, and experts around it."""

import torch
from torch import nn
from torch.func import functional_call


class ToyTasks:
    """``rows(params, batch, t) = MLP_params(batch["x"])`` (the same head for every task)."""

    kind = "classifier"

    def __init__(self, d=5, h=7, c=3, seed=0):
        torch.manual_seed(seed)
        self.module = nn.Sequential(nn.Linear(d, h), nn.Tanh(), nn.Linear(h, c)).double()

    def rows(self, params, batch, task):
        return functional_call(self.module, {k: v.double() for k, v in params.items()}, (batch["x"].double(),))

    def rows_and_hidden(self, params, batch, task, layers):
        params = {k: v.double() for k, v in params.items()}
        x = batch["x"].double()
        h1 = torch.tanh(functional_call(self.module[0], {"weight": params["0.weight"], "bias": params["0.bias"]}, (x,)))
        z = functional_call(self.module[2], {"weight": params["2.weight"], "bias": params["2.bias"]}, (h1,))
        states = [x, h1, z]
        return z, [states[i] for i in layers]


def state(model: ToyTasks):
    return {k: v.detach().clone() for k, v in model.module.state_dict().items()}


def experts(base, k, scale=0.5, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [{n: v + scale * torch.randn(v.shape, generator=g, dtype=v.dtype) for n, v in base.items()}
            for _ in range(k)]


def batches(n_tasks, n=12, d=5, per_batch=4, seed=2):
    g = torch.Generator().manual_seed(seed)
    out = []
    for t in range(n_tasks):
        x = torch.randn(n, d, generator=g, dtype=torch.float64) + t
        y = torch.randint(0, 3, (n,), generator=g)
        out.append([{"x": x[i:i + per_batch], "labels": y[i:i + per_batch]} for i in range(0, n, per_batch)])
    return out
