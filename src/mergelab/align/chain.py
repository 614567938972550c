"""Feed-forward chains as the different-bases merges (PLeaS, ZipIt) read them: the layers of an MLP
state dict or of a plain conv net, their forward pass with each layer's input and output kept, and the
writing of a refitted layer back under its names. Shared machinery, no merge method of its own."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Tuple

import torch

from mergelab.errors import MergeLabError

ACT = {"relu": torch.relu, "gelu": torch.nn.functional.gelu, "tanh": torch.tanh, "sigmoid": torch.sigmoid}


def mlp_layers(state: Mapping[str, torch.Tensor]) -> List[str]:
    """The linear layers of an MLP state dict, in order (module names); anything else is an error."""
    mods: List[str] = []
    for k, v in state.items():
        m, _, leaf = k.rpartition(".")
        if leaf not in ("weight", "bias") or (leaf == "weight" and v.ndim != 2):
            raise MergeLabError(f"PLeaS handles MLP chains of linear layers; tensor '{k}' of shape {tuple(v.shape)} "
                                f"is not a linear layer's weight or bias")
        if m not in mods:
            mods.append(m)
    if len(mods) < 2:
        raise MergeLabError("PLeaS needs an MLP with at least one hidden layer (two linear layers)")
    return mods


@dataclass
class ChainLayer:
    """One layer of a plain conv net: a ``Conv2d`` or ``Linear`` module, the BatchNorm after it (folded
    into the least-squares targets), and whether its input is flattened conv maps."""

    name: str
    kind: str
    stride: Tuple[int, int] = (1, 1)
    padding: Tuple[int, int] = (0, 0)
    kernel: Tuple[int, int] = (1, 1)
    norm: Optional[str] = None
    flatten: bool = False


def conv_chain(module: torch.nn.Module) -> List[ChainLayer]:
    """The layers of a plain conv net (Conv2d [+ BatchNorm2d] ... flatten, Linear ...) in definition order;
    the module's forward must apply them in that order with one nonlinearity after every layer but the last."""
    layers: List[ChainLayer] = []
    for name, m in module.named_modules():
        if isinstance(m, torch.nn.Conv2d):
            if m.groups != 1 or m.dilation != (1, 1) or m.padding_mode != "zeros" or isinstance(m.padding, str):
                raise MergeLabError(f"PLeaS: conv layer '{name}' uses groups, dilation or non-zero padding modes")
            layers.append(ChainLayer(name, "conv", tuple(m.stride), tuple(m.padding), tuple(m.kernel_size)))
        elif isinstance(m, torch.nn.Linear):
            layers.append(ChainLayer(name, "linear", flatten=bool(layers) and layers[-1].kind == "conv"))
        elif isinstance(m, torch.nn.BatchNorm2d) and layers:
            layers[-1].norm = name
    if len(layers) < 2:
        raise MergeLabError("PLeaS needs at least two conv/linear layers")
    return layers


def chain_forward(state, layers: List[ChainLayer], act: str, x: torch.Tensor):
    """Per layer: its input (maps or vectors) and its output after the folded BatchNorm (float64)."""
    F = torch.nn.functional
    ins, outs = [], []
    h = x.double()
    for i, L in enumerate(layers):
        if L.flatten:
            h = h.flatten(1)
        ins.append(h)
        w, b = state[L.name + ".weight"].double(), state.get(L.name + ".bias")
        b = b.double() if b is not None else None
        o = F.conv2d(h, w, b, L.stride, L.padding) if L.kind == "conv" else F.linear(h, w, b)
        if L.norm:
            n = L.norm + "."
            o = F.batch_norm(o, state[n + "running_mean"].double(), state[n + "running_var"].double(),
                             state[n + "weight"].double(), state[n + "bias"].double(), False, 0.0, 1e-5)
        outs.append(o)
        h = ACT[act](o) if i < len(layers) - 1 else o
    return ins, outs


def feature_rows(f: torch.Tensor) -> torch.Tensor:
    """Features as rows: conv maps ``[N, C, H, W]`` become ``[N*H*W, C]`` (every position a sample)."""
    return f.movedim(1, -1).reshape(-1, f.shape[1]) if f.ndim == 4 else f


def write_layer(out: Dict[str, torch.Tensor], like: Mapping[str, torch.Tensor], L: ChainLayer, W: torch.Tensor,
                b: torch.Tensor) -> None:
    """Store a fitted layer ``W`` (rows = outputs; conv kernels flattened), ``b`` under ``L``'s names, in
    ``like``'s dtypes. A BatchNorm after it is written as the identity (weight 1, mean 0, var 1 - eps)
    carrying the intercept as its bias when the layer has none."""
    dt = like[L.name + ".weight"].dtype
    out[L.name + ".weight"] = (W.reshape(W.shape[0], -1, *L.kernel) if L.kind == "conv" else W).to(dt)
    if L.name + ".bias" in like:
        out[L.name + ".bias"] = b.to(dt)
        b = torch.zeros_like(b)
    if L.norm:
        p = L.norm + "."
        out[p + "weight"] = torch.ones(W.shape[0], dtype=dt)
        out[p + "bias"] = b.to(dt)
        out[p + "running_mean"] = torch.zeros(W.shape[0], dtype=dt)
        out[p + "running_var"] = torch.full((W.shape[0],), 1 - 1e-5, dtype=dt)
        if p + "num_batches_tracked" in like:
            out[p + "num_batches_tracked"] = like[p + "num_batches_tracked"].clone()


def check_same_shapes(state_a: Mapping[str, torch.Tensor], state_b: Mapping[str, torch.Tensor], who: str) -> None:
    """Every tensor of model A is in model B with the same shape, else an error naming the first one."""
    for k, v in state_a.items():
        if k not in state_b or tuple(state_b[k].shape) != tuple(v.shape):
            raise MergeLabError(f"{who}: tensor '{k}' has shape {tuple(v.shape)} in model A but "
                                f"{tuple(state_b[k].shape) if k in state_b else 'is missing'} in model B")
