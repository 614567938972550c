"""A small ResNet-style conv net, its permutation spec, and PLeaS for it.

The net (:class:`ResNet`) is He et al.'s basic-block ResNet (CVPR 2016) without downsampling:
stem ``conv 3x3 - BN - ReLU``; ``blocks`` of ``s <- relu(s + BN2(conv2(relu(BN1(conv1(s))))))``;
global average pooling; a linear head. All convs are bias-free, as in ResNets.

**Permutations.** The residual stream ``res`` (the stem's channels) passes through every block: the
stem's output channels and its BatchNorm, every block's ``conv1`` input channels, every ``conv2``
output channel and ``BN2``, and the head's inputs all carry the *same* permutation, because the skip
connection adds channel ``c`` of the stream to channel ``c`` of the block's output. Each block's inner
channels (``conv1`` output, ``BN1``, ``conv2`` input) are a group of their own (``block0``,
``block1``...). :func:`spec_mapping` writes that as the mapping ``mergelab align --spec`` reads.

**PLeaS** (Nasery et al., CVPR 2025, arXiv 2407.02447; :mod:`mergelab.align.pleas`). The residual
structure allows it: a merged stream is the linear map ``T(s_A, s_B) = [(s_A+s_B)/2 on merged
channels | s_A on A-only | s_B on B-only]`` of the two models' streams, and a skip connection carries
``T`` through unchanged. So the stream gets one choice of merged channels (one width) for all blocks,
and each block's ``conv2`` is fitted to ``T(g_A, g_B)`` where ``g_X`` is model X's branch output (its
``BN2`` output before the addition): ``T(s_A, s_B) + T(g_A, g_B) = T(s_A + g_A, s_B + g_B)``. The
inner channels of each block have a width of their own. Every conv is fitted by least squares on its
unfolded input patches with the A-only/B-only mask; each BatchNorm is folded into its conv's targets
and written back as the identity carrying the intercept (:func:`mergelab.align.chain.write_layer`).
"""

from __future__ import annotations

from typing import Dict, List, Mapping, Sequence, Union

import torch

from mergelab.align.chain import ChainLayer, check_same_shapes, write_layer
from mergelab.align.features import record
from mergelab.align.matching import activation_matching
from mergelab.align.pleas import PleasResult, Width, fit_layer, resolve_width
from mergelab.align.spec import PermutationSpec, apply_permutations, spec_from_mapping
from mergelab.align.widths import budget_widths, is_budget
from mergelab.errors import MergeLabError

BN_LEAVES = ("weight", "bias", "running_mean", "running_var")


class BasicBlock(torch.nn.Module):
    def __init__(self, channels: int, inner: int):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(channels, inner, 3, padding=1, bias=False)
        self.bn1 = torch.nn.BatchNorm2d(inner)
        self.conv2 = torch.nn.Conv2d(inner, channels, 3, padding=1, bias=False)
        self.bn2 = torch.nn.BatchNorm2d(channels)

    def forward(self, s):
        return torch.relu(s + self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(s))))))


class ResNet(torch.nn.Module):
    """Stem, ``len(inner)`` basic blocks with ``inner[i]`` inner channels, global average pool, linear head.
    Takes images ``[N, in_channels, H, W]`` (or ``[N, in_channels * side * side]``, reshaped)."""

    def __init__(self, channels: int, inner: Union[int, Sequence[int]], classes: int, blocks: int = 2,
                 in_channels: int = 1, side: int = 8):
        super().__init__()
        inner = [inner] * blocks if isinstance(inner, int) else list(inner)
        self.in_channels, self.side = in_channels, side
        self.stem = torch.nn.Conv2d(in_channels, channels, 3, padding=1, bias=False)
        self.stem_bn = torch.nn.BatchNorm2d(channels)
        self.blocks = torch.nn.ModuleList(BasicBlock(channels, i) for i in inner)
        self.fc = torch.nn.Linear(channels, classes)

    def forward(self, x):
        if x.ndim == 2:
            x = x.reshape(-1, self.in_channels, self.side, self.side)
        s = torch.relu(self.stem_bn(self.stem(x)))
        for b in self.blocks:
            s = b(s)
        return self.fc(s.mean((2, 3)))

    @classmethod
    def from_state(cls, state: Mapping[str, torch.Tensor], side: int = 8) -> "ResNet":
        """The net whose widths are those of ``state`` (e.g. a PLeaS result), with ``state`` loaded, in eval mode."""
        n = sum(1 for k in state if k.startswith("blocks.") and k.endswith(".conv1.weight"))
        w = state["stem.weight"]
        net = cls(w.shape[0], [state[f"blocks.{i}.conv1.weight"].shape[0] for i in range(n)],
                  state["fc.weight"].shape[0], n, w.shape[1], side)
        net.load_state_dict(dict(state))
        return net.eval()


def spec_mapping(blocks: int) -> dict:
    """The permutation spec of a :class:`ResNet` with ``blocks`` blocks, as ``mergelab align --spec`` reads it
    (YAML/JSON ``{"axes": {tensor: [group or null per axis]}}``)."""
    axes: Dict[str, list] = {"stem.weight": ["res", None, None, None]}
    axes.update({f"stem_bn.{leaf}": ["res"] for leaf in BN_LEAVES})
    for i in range(blocks):
        p, g = f"blocks.{i}.", f"block{i}"
        axes[p + "conv1.weight"] = [g, "res", None, None]
        axes.update({f"{p}bn1.{leaf}": [g] for leaf in BN_LEAVES})
        axes[p + "conv2.weight"] = ["res", g, None, None]
        axes.update({f"{p}bn2.{leaf}": ["res"] for leaf in BN_LEAVES})
    axes["fc.weight"] = [None, "res"]
    return {"axes": axes}


def layout_blocks(shapes: Mapping[str, tuple]) -> Union[int, None]:
    """The number of blocks when ``shapes`` (a state dict's tensor names) are exactly :class:`ResNet`'s layout
    (``stem``, ``stem_bn``, ``blocks.i.{conv1,bn1,conv2,bn2}``, ``fc``), else None. ``align`` uses it to take
    the residual spec instead of inferring a chain, which would break the skip connections."""
    n = sum(1 for k in shapes if k.startswith("blocks.") and k.endswith(".conv1.weight"))
    bn = BN_LEAVES + ("num_batches_tracked",)
    want = {"stem.weight", "fc.weight", "fc.bias", *(f"stem_bn.{leaf}" for leaf in bn)}
    for i in range(n):
        want |= {f"blocks.{i}.conv1.weight", f"blocks.{i}.conv2.weight"}
        want |= {f"blocks.{i}.{m}.{leaf}" for m in ("bn1", "bn2") for leaf in bn}
    keys = set(shapes)
    optional = {k for k in want if k.endswith("num_batches_tracked")}
    return n if n and want - optional <= keys <= want else None


def resnet_spec(net: ResNet) -> PermutationSpec:
    shapes = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    return spec_from_mapping(spec_mapping(len(net.blocks)), shapes, where="ResNet spec")


def _bn(o, state, p):
    return torch.nn.functional.batch_norm(o, state[p + "running_mean"].double(), state[p + "running_var"].double(),
                                          state[p + "weight"].double(), state[p + "bias"].double(), False, 0.0, 1e-5)


def _trace(state: Mapping[str, torch.Tensor], blocks: int, x: torch.Tensor) -> Dict[str, List[torch.Tensor]]:
    """Every layer's input and BN-folded output (float64): ``stem``, per block ``p1`` (BN1 output),
    ``h`` (its ReLU), ``g`` (BN2 output, the branch), ``s`` the streams (stem output, then after each
    block), ``pooled`` and ``logits``."""
    conv = lambda h, k: torch.nn.functional.conv2d(h, state[k].double(), None, 1, 1)  # noqa: E731
    t: Dict[str, List[torch.Tensor]] = {"p1": [], "h": [], "g": []}
    t["stem"] = [_bn(conv(x.double(), "stem.weight"), state, "stem_bn.")]
    s = torch.relu(t["stem"][0])
    t["s"] = [s]
    for i in range(blocks):
        p = f"blocks.{i}."
        p1 = _bn(conv(s, p + "conv1.weight"), state, p + "bn1.")
        h = torch.relu(p1)
        g = _bn(conv(h, p + "conv2.weight"), state, p + "bn2.")
        s = torch.relu(s + g)
        t["p1"].append(p1), t["h"].append(h), t["g"].append(g), t["s"].append(s)
    t["pooled"] = [s.mean((2, 3))]
    t["logits"] = [torch.nn.functional.linear(t["pooled"][0], state["fc.weight"].double(), state["fc.bias"].double())]
    return t


def pleas_resnet(net_a: ResNet, net_b: ResNet, inputs: torch.Tensor, width: Union[Width, Mapping[str, Width]] = 1.0,
                 heads: str = "average", ridge: float = 1e-8) -> PleasResult:
    """PLeaS for two :class:`ResNet` of the same shapes on calibration images ``inputs`` ``[N, C, H, W]``
    (module docstring). ``width``: a global multiple/count or a mapping by group (``res``, ``block0``...,
    ``default``). The result has A's keys at the chosen widths; load it with :meth:`ResNet.from_state`."""
    if heads not in ("average", "concat"):
        raise MergeLabError(f"heads must be 'average' (shared labels) or 'concat' (disjoint labels), got '{heads}'")
    sa = {k: v.detach() for k, v in net_a.state_dict().items()}
    sb = {k: v.detach() for k, v in net_b.state_dict().items()}
    check_same_shapes(sa, sb, "PLeaS")
    if inputs.ndim == 2:
        inputs = inputs.reshape(-1, net_a.in_channels, net_a.side, net_a.side)
    L = len(net_a.blocks)
    spec = resnet_spec(net_a)
    n = {g: p.size for g, p in spec.perms.items()}
    groups = ["res"] + [f"block{i}" for i in range(L)]
    layer_of = {"res": "stem", **{f"block{i}": f"blocks.{i}.conv1" for i in range(L)}}
    if is_budget(width):  # per-group widths by the paper's QP (mergelab.align.widths)
        hw = float(inputs.shape[2] * inputs.shape[3])  # no downsampling: every conv runs at the input's size
        outs = net_a.fc.weight.shape[0] * (2 if heads == "concat" else 1)
        terms = [(9 * hw * net_a.in_channels, None, "res")]
        for i in range(L):
            terms += [(9 * hw, "res", f"block{i}"), (9 * hw, f"block{i}", "res")]
        terms.append((float(outs), "res", None))
        with torch.no_grad():
            la, lb = net_a.eval()(inputs).double(), net_b.eval()(inputs).double()
        target = torch.cat([la, lb], 1) if heads == "concat" else (la + lb) / 2

        def score(ws: Dict[str, int]) -> float:
            with torch.no_grad():
                merged = ResNet.from_state(pleas_resnet(net_a, net_b, inputs, ws, heads, ridge).state, net_a.side)
                return -float(((merged.double()(inputs.double()) - target) ** 2).mean())

        choice = budget_widths(width, n, terms, score)
        result = pleas_resnet(net_a, net_b, inputs, choice.widths, heads, ridge)
        result.budget = choice.record()
        return result
    widths = {g: resolve_width(width, g, layer_of[g], n[g]) for g in groups}

    batches = list(inputs.split(256))
    feats = [record(net, spec, batches, lambda m, x: (m(x), None)[1]) for net in (net_a.eval(), net_b.eval())]
    perms = activation_matching(spec, *feats)
    sb = apply_permutations(sb, spec, perms)
    ta, tb = _trace(sa, L, inputs), _trace(sb, L, inputs)

    order, merged_units = {}, {}
    for g in groups:
        pairs = list(zip(ta["s"], tb["s"])) if g == "res" else [(ta["h"][int(g[5:])], tb["h"][int(g[5:])])]
        sim = sum((fa * fb).sum((0, 2, 3)) for fa, fb in pairs)
        m = 2 * n[g] - widths[g]
        rank = torch.argsort(sim, descending=True, stable=True)
        order[g] = (rank[:m].sort().values, rank[m:].sort().values)
        merged_units[g] = m

    def T(g, fa, fb):
        """Merged-model features of group ``g``, and each channel's block (0 merged, 1 A-only, 2 B-only)."""
        M, R = order[g]
        return (torch.cat([(fa[:, M] + fb[:, M]) / 2, fa[:, R], fb[:, R]], 1),
                torch.tensor([0] * len(M) + [1] * len(R) + [2] * len(R)))

    out: Dict[str, torch.Tensor] = {}

    def fit(name, norm, Z, zb, Y, yb, kind="conv"):
        layer = ChainLayer(name, kind, (1, 1), (1, 1), (3, 3), norm) if kind == "conv" else ChainLayer(name, kind)
        W, b = fit_layer(layer, Z, zb, Y, yb, ridge, bias=True)
        write_layer(out, sa, layer, W, b)

    x = inputs.double()
    fit("stem", "stem_bn", x, torch.zeros(x.shape[1], dtype=torch.long), *T("res", ta["stem"][0], tb["stem"][0]))
    for i in range(L):
        p, g = f"blocks.{i}.", f"block{i}"
        fit(p + "conv1", p + "bn1", *T("res", ta["s"][i], tb["s"][i]), *T(g, ta["p1"][i], tb["p1"][i]))
        fit(p + "conv2", p + "bn2", *T(g, ta["h"][i], tb["h"][i]), *T("res", ta["g"][i], tb["g"][i]))
    la, lb = ta["logits"][0], tb["logits"][0]
    if heads == "concat":
        Y, yb = torch.cat([la, lb], 1), torch.tensor([1] * la.shape[1] + [2] * lb.shape[1])
    else:
        Y, yb = (la + lb) / 2, torch.zeros(la.shape[1], dtype=torch.long)
    fit("fc", None, *T("res", ta["pooled"][0], tb["pooled"][0]), Y, yb, kind="linear")
    for k in sa:  # BatchNorm step counters
        out.setdefault(k, sa[k].clone())
    return PleasResult({k: out[k] for k in sa}, widths, merged_units, perms)
