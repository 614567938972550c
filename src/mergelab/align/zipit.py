"""ZipIt-style merging of two MLPs, with partial zipping (Stoica et al., "ZipIt! Merging Models from
Different Tasks without Training", ICLR 2024, arXiv 2305.03053).

Per hidden layer, the ``2n`` features of both models (post-activation, on calibration inputs) are
paired greedily by Pearson correlation: the most correlated pair of features not yet used is merged
next, **whether the two come from different models or from the same one**, until every feature is in
one of ``n`` pairs. That is the difference from matching, which only pairs a unit of A with a unit of B.
A *merge* matrix ``M`` (``n x 2n``, 1/2 on both features of a pair) and an *unmerge* matrix ``U``
(``2n x n``, 1 where a feature is rebuilt from its pair) then give each zipped layer
``W = M_l blockdiag(W_A, W_B) U_{l-1}`` and ``b = M_l [b_A; b_B]`` (the input layer reads the shared
input: ``U_0 = [I; I]``).

**Conv nets** (:func:`zipit_conv`, plain chains as :func:`mergelab.align.chain.conv_chain` reads them):
each BatchNorm is folded into its conv, the features are the channels' post-activation values at every
position, and ``M``/``U`` act on the output and input channel axes of each kernel (a flattened conv map
feeding a linear layer unmerges each channel's block of positions). Zipped BatchNorms are written as the
identity carrying the bias.

**Partial zipping** zips the first ``depth`` hidden layers only. The layers after them stay as both
models side by side (block-diagonal, width ``2n``), fed by the unmerged features ``U_depth``, so
compute is traded for accuracy: ``depth = 0`` is the ensemble. The output layer averages both models'
logits (``heads="average"``) or keeps both heads (``"concat"``). The paper's limits on how many
same-model merges are allowed (alpha, beta) are not implemented: every pair is allowed.
"""

from __future__ import annotations

from typing import Dict, List, Mapping, Tuple

import torch

from mergelab.align.chain import (ACT, chain_forward, check_same_shapes, conv_chain, feature_rows, mlp_layers,
                                  write_layer)
from mergelab.errors import MergeLabError


def greedy_pairs(features: torch.Tensor) -> List[Tuple[int, int]]:
    """Pairs of columns of ``features`` ``[N, 2n]``, most correlated first (Pearson; a constant column
    has correlation 0 with everything), each column in exactly one pair."""
    f = features.double()
    f = f - f.mean(0)
    norm = f.norm(dim=0)
    c = (f.T @ f) / torch.outer(norm, norm).clamp_min(1e-12)
    c.fill_diagonal_(-float("inf"))
    pairs, used = [], torch.zeros(len(c), dtype=torch.bool)
    order = torch.argsort(c.flatten(), descending=True, stable=True)
    m = len(c)
    for idx in order.tolist():
        i, j = divmod(idx, m)
        if i < j and not used[i] and not used[j]:
            pairs.append((i, j))
            used[i] = used[j] = True
            if len(pairs) == m // 2:
                break
    return pairs


def merge_unmerge(pairs: List[Tuple[int, int]], size: int) -> Tuple[torch.Tensor, torch.Tensor]:
    M = torch.zeros(len(pairs), size, dtype=torch.float64)
    U = torch.zeros(size, len(pairs), dtype=torch.float64)
    for p, (i, j) in enumerate(pairs):
        M[p, i] = M[p, j] = 0.5
        U[i, p] = U[j, p] = 1.0
    return M, U


def zipit_mlp(state_a: Mapping[str, torch.Tensor], state_b: Mapping[str, torch.Tensor], inputs: torch.Tensor,
              depth: int = -1, heads: str = "average", activation: str = "relu") -> Dict[str, torch.Tensor]:
    """ZipIt merge of two MLPs of the same shapes (module docstring). ``depth``: hidden layers zipped
    (``-1``: all). Returns a state dict with A's keys; unzipped layers are ``2n`` wide."""
    if heads not in ("average", "concat"):
        raise MergeLabError(f"heads must be 'average' or 'concat', got '{heads}'")
    layers = mlp_layers(state_a)
    hidden = len(layers) - 1
    depth = hidden if depth < 0 else depth
    if not 0 <= depth <= hidden:
        raise MergeLabError(f"ZipIt depth {depth} is outside [0, {hidden}] (the MLP has {hidden} hidden layers)")
    W = [(state_a[m + ".weight"].double(), state_b[m + ".weight"].double()) for m in layers]
    B = [(state_a[m + ".bias"].double(), state_b[m + ".bias"].double()) for m in layers]
    act = ACT[activation]
    ha, hb = inputs.double(), inputs.double()
    prev_u = torch.cat([torch.eye(inputs.shape[1], dtype=torch.float64)] * 2)  # U_0: both read the input
    out: Dict[str, torch.Tensor] = {}
    for i, m in enumerate(layers):
        wa, wb = W[i]
        big_w, big_b = torch.block_diag(wa, wb), torch.cat(B[i])
        ha, hb = act(ha @ wa.T + B[i][0]), act(hb @ wb.T + B[i][1])
        if i < depth:
            M, U = merge_unmerge(greedy_pairs(torch.cat([ha, hb], 1)), 2 * wa.shape[0])
        elif i < hidden:  # past the zip: both models side by side
            M = U = torch.eye(2 * wa.shape[0], dtype=torch.float64)
        elif heads == "average":
            M, U = torch.cat([torch.eye(wa.shape[0], dtype=torch.float64)] * 2, 1) / 2, None
        else:
            M, U = torch.eye(2 * wa.shape[0], dtype=torch.float64), None
        out[m + ".weight"] = (M @ big_w @ prev_u).to(state_a[m + ".weight"].dtype)
        out[m + ".bias"] = (M @ big_b).to(state_a[m + ".bias"].dtype)
        prev_u = U
    return out


def zipit_conv(module_a: torch.nn.Module, module_b: torch.nn.Module, inputs: torch.Tensor, depth: int = -1,
               heads: str = "average", activation: str = "relu") -> Dict[str, torch.Tensor]:
    """ZipIt merge of two plain conv nets of the same shapes (Conv2d [+ BatchNorm2d] ... flatten, Linear ...;
    module docstring) on calibration images ``inputs``. ``depth``: hidden layers zipped (``-1``: all).
    Returns a state dict with A's keys; unzipped layers are twice as wide, BatchNorms are the identity."""
    if heads not in ("average", "concat") or activation not in ACT:
        raise MergeLabError(f"heads must be 'average' or 'concat' and activation one of {', '.join(ACT)}")
    layers = conv_chain(module_a)
    sa = {k: v.detach() for k, v in module_a.state_dict().items()}
    sb = {k: v.detach() for k, v in module_b.state_dict().items()}
    check_same_shapes(sa, sb, "ZipIt")
    hidden = len(layers) - 1
    depth = hidden if depth < 0 else depth
    if not 0 <= depth <= hidden:
        raise MergeLabError(f"ZipIt depth {depth} is outside [0, {hidden}] (the net has {hidden} hidden layers)")
    outs = [chain_forward(s, layers, activation, inputs)[1] for s in (sa, sb)]

    def folded(state, L):  # the layer with its BatchNorm folded in: (weight, bias), float64
        w = state[L.name + ".weight"].double()
        b = state[L.name + ".bias"].double() if L.name + ".bias" in state else torch.zeros(w.shape[0], dtype=w.dtype)
        if L.norm:
            n = L.norm + "."
            scale = state[n + "weight"].double() / (state[n + "running_var"].double() + 1e-5).sqrt()
            w = w * scale.reshape(-1, *([1] * (w.dim() - 1)))
            b = (b - state[n + "running_mean"].double()) * scale + state[n + "bias"].double()
        return w, b

    eye = lambda k: torch.eye(k, dtype=torch.float64)  # noqa: E731
    prev_u = torch.cat([eye(sa[layers[0].name + ".weight"].shape[1])] * 2)  # U_0: both read the input
    out: Dict[str, torch.Tensor] = {}
    for i, L in enumerate(layers):
        (wa, ba), (wb, bb) = folded(sa, L), folded(sb, L)
        n = wa.shape[0]
        if i < depth:
            feats = torch.cat([feature_rows(ACT[activation](o[i])) for o in outs], 1)
            M, U = merge_unmerge(greedy_pairs(feats), 2 * n)
        elif i < hidden:
            M = U = eye(2 * n)
        elif heads == "average":
            M, U = torch.cat([eye(n)] * 2, 1) / 2, None
        else:
            M, U = eye(2 * n), None
        big = torch.zeros(2 * n, 2 * wa.shape[1], *wa.shape[2:], dtype=torch.float64)
        big[:n, :wa.shape[1]], big[n:, wa.shape[1]:] = wa, wb
        u = prev_u
        if L.flatten:  # each input channel is a block of positions of the flattened map
            per = wa.shape[1] // (prev_u.shape[0] // 2)
            u = torch.kron(prev_u, eye(per))
        w = torch.einsum("po,oi...,iq->pq...", M, big, u)
        write_layer(out, sa, L, w.reshape(w.shape[0], -1), M @ torch.cat([ba, bb]))
        prev_u = U
    return out
