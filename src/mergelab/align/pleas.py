"""PLeaS: merging two models trained from different initialisations, at a chosen width.

Nasery et al., "PLeaS: Merging Models with Permutations and Least Squares", CVPR 2025
(arXiv 2407.02447; SewoongLab/PLeaS-Merging). Steps, per hidden-unit group of a feed-forward chain:

1. **Matching.** Activation matching (``matching.activation_matching``) pairs B's units with A's.
2. **Partial merging.** Of the ``n`` matched pairs, the ``m = 2n - width`` most similar (uncentred
   cross-correlation of the pair, summed over the calibration inputs) are merged; the other ``n - m``
   units of each model stay separate. The merged layer has ``width`` units in blocks
   ``[merged | A-only | B-only]``; ``width`` runs from ``n`` (everything merged) to ``2n`` (the two
   models side by side, an exact ensemble).
3. **Least squares.** Each merged layer's weights (and bias) are the least-squares solution that maps
   its input features ``[(i_A + i_B)/2 on merged units | i_A on A-only | i_B on B-only]`` to the target
   features ``[(o_A + o_B)/2 | o_A | o_B]`` of the same blocks, where ``i_X``, ``o_X`` are model X's own
   (permuted) layer inputs and pre-activation outputs on the calibration batch. A-only outputs never read
   B-only inputs and vice versa (the paper's gradient mask), so the closed form is solved per output
   block (the paper's code fits the same objective by Adam; the closed form is its exact minimiser).
   ``inputs="merged"`` uses the merged model's own inputs instead (each layer corrects the error of the
   layers before it).

The output layer's targets are the two models' averaged logits (``heads="average"``, shared label
space) or both models' logits side by side (``heads="concat"``, disjoint label spaces: A's classes
then B's). **PLeaS-free** is the same procedure with calibration inputs from another domain.

Implemented for MLP chains (linear layers with one elementwise nonlinearity between them), given as
state dicts (:func:`pleas_mlp`, ``mergelab pleas``), and for plain conv nets given as modules
(:func:`pleas_conv`); the result is a state dict of the same keys with the chosen widths. ResNets:
:mod:`mergelab.align.resnet`; BERT folders (the FFN width): :mod:`mergelab.align.pleas_bert`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Tuple, Union

import torch

from mergelab.align.chain import (ACT, ChainLayer, chain_forward, check_same_shapes, conv_chain,
                                  feature_rows, mlp_layers, write_layer)
from mergelab.align.matching import activation_matching
from mergelab.align.spec import Axis, apply_permutations, chain_spec
from mergelab.align.widths import budget_widths, is_budget
from mergelab.errors import MergeLabError


Width = Union[int, float]


@dataclass
class PleasResult:
    state: Dict[str, torch.Tensor]
    widths: Dict[str, int]  # group -> merged width
    merged_units: Dict[str, int]  # group -> number of merged pairs
    perms: Dict[str, torch.Tensor]
    budget: Optional[dict] = None  # how a width budget chose the widths (mergelab.align.widths.WidthChoice.record)


@dataclass
class TransformerPleasResult:
    """A PLeaS-merged transformer (BERT or Llama layout) ready for :func:`write_folder`: the merged
    ``state``, A's ``config`` with ``intermediate_size = width``, matched pairs per layer, B's
    permutations and the calibration tokens the fits used."""

    state: Dict[str, torch.Tensor]
    config: dict
    width: int
    merged_units: int  # matched pairs in every layer (one global width)
    perms: Dict[str, torch.Tensor]
    tokens: int


def _forward(state, layers, act, x) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
    """Per layer: its input and its pre-activation output (float64)."""
    ins, outs = [], []
    h = x.double()
    for i, m in enumerate(layers):
        ins.append(h)
        o = h @ state[m + ".weight"].double().T
        if m + ".bias" in state:
            o = o + state[m + ".bias"].double()
        outs.append(o)
        h = ACT[act](o) if i < len(layers) - 1 else o
    return ins, outs


def resolve_width(width, group: str, layer: str, n: int) -> int:
    """The merged width of a group with ``n`` units per model: a float is a multiple of ``n`` in
    [1.0, 2.0], an int an absolute count in [n, 2n]; a mapping is looked up by group (``P0``) or by the
    name of the layer that outputs it."""
    w = width
    if isinstance(width, Mapping) and "budget" in width:
        raise MergeLabError(f"width: a budget (per-layer widths chosen by PLeaS's QP) is not supported for layer "
                            f"'{layer}' ({group}) here; it applies to MLP state dicts and ResNets (give widths instead)")
    if isinstance(width, Mapping):
        if group in width:
            w = width[group]
        elif layer in width:
            w = width[layer]
        elif "default" in width:
            w = width["default"]
        else:
            w = 1.0
    if isinstance(w, bool) or not isinstance(w, (int, float)):
        raise MergeLabError(f"width for layer '{layer}' ({group}): expected a number, got {w!r}")
    units = int(round(w * n)) if isinstance(w, float) else int(w)
    if not n <= units <= 2 * n:
        shown = f"{w} x {n} = {units}" if isinstance(w, float) else str(w)
        raise MergeLabError(f"width for layer '{layer}' ({group}) is {shown} units, outside the allowed range "
                            f"[{n}, {2 * n}] (one model's width to the sum of both; as a multiple: 1.0 to 2.0)")
    return units


@dataclass
class UnitSplit:
    """PLeaS's partial merge of one layer's hidden units: the ``merged`` most similar matched pairs are
    averaged, the ``rest`` kept once from each model, in blocks ``[merged | A-only | B-only]`` (the
    paper's mask: block 1 may not read block 2 and vice versa, :func:`lstsq_blocks`)."""

    merged: torch.Tensor
    rest: torch.Tensor

    @classmethod
    def by_similarity(cls, feats_a: torch.Tensor, feats_b: torch.Tensor, merged: int) -> "UnitSplit":
        """The ``merged`` units whose matched features ``[N, units]`` agree most (largest inner product)."""
        rank = torch.argsort((feats_a * feats_b).sum(0), descending=True, stable=True)
        return cls(rank[:merged].sort().values, rank[merged:].sort().values)

    def features(self, fa: torch.Tensor, fb: torch.Tensor) -> torch.Tensor:
        """The merged model's features ``[N, width]`` from both models' (units on dim 1)."""
        M, R = self.merged, self.rest
        return torch.cat([(fa[:, M] + fb[:, M]) / 2, fa[:, R], fb[:, R]], 1)

    def labels(self) -> torch.Tensor:
        """Each merged-model unit's block: 0 merged, 1 A-only, 2 B-only."""
        return torch.tensor([0] * len(self.merged) + [1] * len(self.rest) + [2] * len(self.rest))


def lstsq_blocks(Z: torch.Tensor, Y: torch.Tensor, zb: torch.Tensor, yb: torch.Tensor, ridge: float,
                  bias: bool = True):
    """Least squares ``Y ~ Z W^T + b`` per output block; A-only outputs (block 1) may not read B-only
    inputs (block 2) and vice versa. Ridge ``ridge`` times the mean diagonal of ``X^T X``; with fewer
    samples than inputs the identical solution ``X^T (X X^T + lam I)^-1 Y`` (it fits the samples).
    Returns ``(W, b)``."""
    n_out, n_in = Y.shape[1], Z.shape[1]
    W = torch.zeros(n_out, n_in, dtype=torch.float64)
    b = torch.zeros(n_out, dtype=torch.float64)
    ones = torch.ones(Z.shape[0], 1 if bias else 0, dtype=torch.float64)
    for block, banned in ((0, None), (1, 2), (2, 1)):
        rows = (yb == block).nonzero().flatten()
        if len(rows) == 0:
            continue
        cols = (zb != banned).nonzero().flatten() if banned is not None else torch.arange(n_in)
        X = torch.cat([Z[:, cols], ones], 1)
        if X.shape[0] < X.shape[1]:  # fewer samples than inputs: the same ridge solution through the N x N system
            K = X @ X.T
            lam = ridge * float(K.diagonal().sum()) / X.shape[1]
            sol = X.T @ torch.linalg.solve(K + lam * torch.eye(K.shape[0], dtype=torch.float64), Y[:, rows])
        else:
            G = X.T @ X
            lam = ridge * float(G.diagonal().mean())
            sol = torch.linalg.solve(G + lam * torch.eye(G.shape[0], dtype=torch.float64), X.T @ Y[:, rows])
        W[rows[:, None], cols[None, :]] = sol[:len(cols)].T
        if bias:
            b[rows] = sol[-1]
    return W, b


def pleas_mlp(state_a: Mapping[str, torch.Tensor], state_b: Mapping[str, torch.Tensor], inputs: torch.Tensor,
              width: Union[Width, Mapping[str, Width]] = 1.0, activation: str = "relu", heads: str = "average",
              ridge: float = 1e-8, layer_inputs: str = "original") -> PleasResult:
    """PLeaS merge of two MLPs of the same shapes on calibration ``inputs`` ``[N, in]`` (module docstring)."""
    if activation not in ACT:
        raise MergeLabError(f"activation must be one of {', '.join(ACT)}, got '{activation}'")
    if heads not in ("average", "concat"):
        raise MergeLabError(f"heads must be 'average' (shared labels) or 'concat' (disjoint labels), got '{heads}'")
    if layer_inputs not in ("original", "merged"):
        raise MergeLabError(f"inputs must be 'original' (the paper) or 'merged', got '{layer_inputs}'")
    layers = mlp_layers(state_a)
    check_same_shapes(state_a, state_b, "PLeaS")
    spec = chain_spec({k: tuple(v.shape) for k, v in state_a.items()})
    groups = [f"P{i}" for i in range(len(layers) - 1)]
    n = {g: spec.perms[g].size for g in groups}
    if inputs.ndim != 2 or inputs.shape[1] != state_a[layers[0] + ".weight"].shape[1]:
        raise MergeLabError(f"calibration inputs have shape {tuple(inputs.shape)}; the MLP takes "
                            f"[N, {state_a[layers[0] + '.weight'].shape[1]}]")
    if is_budget(width):  # per-layer widths by the paper's QP (mergelab.align.widths)
        outs = state_a[layers[-1] + ".weight"].shape[0] * (2 if heads == "concat" else 1)
        terms = [(float(state_a[layers[0] + ".weight"].shape[1]), None, groups[0])]
        terms += [(1.0, groups[i - 1], groups[i]) for i in range(1, len(groups))]
        terms += [(float(outs), groups[-1], None)]
        la, lb = mlp_forward(state_a, inputs, activation), mlp_forward(state_b, inputs, activation)
        target = (torch.cat([la, lb], 1) if heads == "concat" else (la + lb) / 2).double()

        def score(ws: Dict[str, int]) -> float:
            r = pleas_mlp(state_a, state_b, inputs, ws, activation, heads, ridge, layer_inputs)
            return -float(((mlp_forward(r.state, inputs, activation).double() - target) ** 2).mean())

        choice = budget_widths(width, n, terms, score)
        result = pleas_mlp(state_a, state_b, inputs, choice.widths, activation, heads, ridge, layer_inputs)
        result.budget = choice.record()
        return result
    widths = {g: resolve_width(width, g, layers[i], n[g]) for i, g in enumerate(groups)}

    # 1. matching on the post-activation hidden units (the next layer's inputs)
    ins_a, _ = _forward(state_a, layers, activation, inputs)
    ins_b, _ = _forward(state_b, layers, activation, inputs)
    feats_a = {g: [(Axis(g), ins_a[i + 1])] for i, g in enumerate(groups)}
    feats_b = {g: [(Axis(g), ins_b[i + 1])] for i, g in enumerate(groups)}
    perms = activation_matching(spec, feats_a, feats_b)
    state_b = apply_permutations(state_b, spec, perms)
    ins_a, outs_a = _forward(state_a, layers, activation, inputs)
    ins_b, outs_b = _forward(state_b, layers, activation, inputs)

    # 2. partial merge: most similar pairs merged, blocks [merged | A-only | B-only]
    merged_units = {g: 2 * n[g] - widths[g] for g in groups}
    split = {g: UnitSplit.by_similarity(ins_a[i + 1], ins_b[i + 1], merged_units[g]) for i, g in enumerate(groups)}

    def blocks(g: Optional[str], fa: torch.Tensor, fb: torch.Tensor, last: bool = False):
        """Merged-model features of one group, and each column's block (0 merged, 1 A-only, 2 B-only)."""
        if g is None:
            if last and heads == "concat":
                return torch.cat([fa, fb], 1), torch.tensor([1] * fa.shape[1] + [2] * fb.shape[1])
            return (fa + fb) / 2, torch.zeros(fa.shape[1], dtype=torch.long)
        return split[g].features(fa, fb), split[g].labels()

    # 3. least squares per layer
    out: Dict[str, torch.Tensor] = {}
    h = inputs.double()
    for i, m in enumerate(layers):
        g_in = groups[i - 1] if i > 0 else None
        g_out = groups[i] if i < len(groups) else None
        Y, yb = blocks(g_out, outs_a[i], outs_b[i], last=g_out is None)
        if layer_inputs == "merged" or i == 0:
            Z = h
            zb = blocks(g_in, ins_a[i], ins_b[i])[1] if g_in is not None else torch.zeros(h.shape[1], dtype=torch.long)
        else:
            Z, zb = blocks(g_in, ins_a[i], ins_b[i])
        W, b = lstsq_blocks(Z, Y, zb, yb, ridge, bias=m + ".bias" in state_a)
        dtype = state_a[m + ".weight"].dtype
        out[m + ".weight"] = W.to(dtype)
        if m + ".bias" in state_a:
            out[m + ".bias"] = b.to(dtype)
        o = h @ W.T + b
        h = ACT[activation](o) if i < len(layers) - 1 else o
    return PleasResult(out, widths, merged_units, perms)


def mlp_forward(state: Mapping[str, torch.Tensor], x: torch.Tensor, activation: str = "relu") -> torch.Tensor:
    """The output of an MLP state dict (as :func:`pleas_mlp` reads and writes them)."""
    layers = mlp_layers(state)
    return _forward(state, layers, activation, x)[1][-1]


def match_and_average(a, b, spec, calibration, batch_size: int, max_length: int):
    """Steps 1-2 of PLeaS on a transformer (:mod:`.pleas_bert`, :mod:`.pleas_llama`): B's units matched to A's
    by activation matching on the ``calibration`` texts (``spec`` says which axes share a permutation),
    then every tensor averaged. Returns ``(perms, B's permuted state, the averaged state)``; the caller
    replaces the MLP tensors by their least-squares fits."""
    from mergelab.align.api import collect_activations

    perms = activation_matching(spec, collect_activations(a, spec, calibration, a.path, batch_size, max_length),
                                collect_activations(b, spec, calibration, a.path, batch_size, max_length))
    sb = apply_permutations(b.state, spec, perms)
    out = {k: ((v.double() + sb[k].double()) / 2).to(v.dtype) if v.is_floating_point() else v.clone()
           for k, v in a.state.items()}
    return perms, sb, out


@dataclass
class AttentionNames:
    """One attention layer for :func:`refit_attention`: its permutation group, the module whose input is
    the heads' outputs, and the tensor prefixes (``<prefix>.weight``/``.bias``) of q, k, v and o."""

    perm: str
    o_module: str
    q: str
    k: str
    v: str
    o: str


def refit_attention(a, b, sb, spec, perms, out, texts, heads: int, ridge: float, layers: List[AttentionNames],
                    batch_size: int = 16, max_length: int = 128) -> None:
    """PLeaS on attention layers (Llama: :mod:`.pleas_llama`; BERT at its own head count: :mod:`.pleas_bert`)
    at ``heads`` KV heads in ``[n_kv, 2 n_kv]``, written into ``out``. ``sb`` is B's permuted state.

    The units are whole KV heads with their query groups (rotary dims never split). Of the ``n_kv``
    matched head pairs, the ``2 n_kv - heads`` whose attention outputs (the o-projection inputs of their
    query heads) correlate most are merged; the others are kept from each model, in blocks
    ``[merged | A-only | B-only]``. ``q``/``k``/``v`` read the stream, so their least squares targets
    ``[(q_A+q_B)/2 | q_A | q_B]`` are linear in it and the fit is exact: merged heads' rows are the
    average of the pair, kept heads' rows are their model's. The o projection is the least-squares map
    from the heads' features ``[(c_A+c_B)/2 | c_A | c_B]`` to ``(o_A+o_B)/2``, where ``c_X`` and ``o_X``
    are model X's own (B permuted) o-projection input and output on the calibration tokens (the paper's
    layer inputs). At ``heads = 2 n_kv`` the attention is both models' side by side with
    ``o = [O_A, O_B]/2`` (the mean of both attentions on any input, given more tokens than ``2 n_q d``);
    a permuted copy at ``n_kv`` gives the model back."""
    from mergelab.align.api import module_inputs
    from mergelab.align.spec import index_vector

    ctx_a = module_inputs(a, texts, a.path, [u.o_module for u in layers], batch_size, max_length)
    ctx_b = module_inputs(b, texts, a.path, [u.o_module for u in layers], batch_size, max_length)
    for u in layers:
        P = spec.perms[u.perm]
        n_kv, d, g = P.n_heads, P.head_dim, P.group
        ca = ctx_a[u.o_module]
        cb = ctx_b[u.o_module][:, index_vector(P, Axis(u.perm, "vo_o"), perms[u.perm])]
        unit = lambda c: c.view(len(c), n_kv, g * d)  # noqa: E731
        split = UnitSplit.by_similarity(unit(ca).permute(0, 2, 1).reshape(-1, n_kv),
                                        unit(cb).permute(0, 2, 1).reshape(-1, n_kv), 2 * n_kv - heads)
        for prefix, per in ((u.q, g * d), (u.k, d), (u.v, d)):
            for key in (prefix + ".weight", prefix + ".bias"):
                if key in a.state:
                    wa, wb = a.state[key].double(), sb[key].double()
                    va, vb = wa.view(n_kv, per, *wa.shape[1:]), wb.view(n_kv, per, *wb.shape[1:])
                    M, R = split.merged, split.rest
                    out[key] = torch.cat([(va[M] + vb[M]) / 2, va[R], vb[R]]).reshape(-1, *wa.shape[1:]) \
                        .to(a.state[key].dtype).contiguous()
        ow, ob = u.o + ".weight", u.o + ".bias"
        oa = ca @ a.state[ow].double().T + (a.state[ob].double() if ob in a.state else 0)
        obb = cb @ sb[ow].double().T + (sb[ob].double() if ob in sb else 0)
        Z = split.features(unit(ca), unit(cb)).reshape(len(ca), -1)
        W, bias = lstsq_blocks(Z, (oa + obb) / 2, split.labels().repeat_interleave(g * d),
                               torch.zeros(oa.shape[1], dtype=torch.long), ridge, bias=ob in a.state)
        out[ow] = W.to(a.state[ow].dtype).contiguous()
        if ob in a.state:
            out[ob] = bias.to(a.state[ob].dtype).contiguous()


def write_folder(result: TransformerPleasResult, path_a, out, overwrite: bool, extra: Optional[dict] = None) -> None:
    """A merged transformer (:mod:`mergelab.align.pleas_bert`, :mod:`mergelab.align.pleas_llama`) as a HF folder: the
    weights, A's config with the new ``intermediate_size``, A's tokenizer and ``pleas.json`` (the widths,
    ``extra`` and the permutations applied to B)."""
    from pathlib import Path

    from mergelab.align.api import load_model, write_checkpoint

    a = load_model(path_a, "model A")
    record = {"method": "pleas", "intermediate_size": result.width, "merged_units_per_layer": result.merged_units,
              "calibration_tokens": result.tokens, **(extra or {}),
              "permutations": {k: v.tolist() for k, v in result.perms.items()}}
    write_checkpoint(a, result.state, Path(out), overwrite, record, config=result.config, record_name="pleas.json")


# --------------------------------------------------------------------------- recipe and command
RECIPE_KEYS = {"merge_method", "models", "parameters", "calibration", "dtype", "architecture"}
ARCHITECTURES = ("mlp", "resnet")
PARAMETERS = {"width": 1.0, "activation": "relu", "heads": "average", "inputs": "original", "ridge": 1e-8,
              "attention_width": None}


def run_recipe(recipe_path, out, overwrite: bool = False) -> PleasResult:
    """``mergelab pleas RECIPE -o OUT``: a YAML with ``merge_method: pleas``, two ``models``,
    ``calibration`` and ``parameters`` (``width``: a global number or a mapping per group/layer with an
    optional ``default``; ``activation``; ``heads``; ``inputs``; ``ridge``). Writes OUT in model A's format.

    * HF folders (the architecture from ``config.json``): BERT (:mod:`mergelab.align.pleas_bert`) and
      Llama-layout decoders (:mod:`mergelab.align.pleas_llama`); ``calibration`` is texts (``.txt``, one a
      line, or ``.jsonl`` with ``text``); only ``width`` (one number) and ``ridge`` apply.
    * State dicts (``.pt``, ``.safetensors``): ``architecture: mlp`` (an MLP chain, :func:`pleas_mlp`) or
      ``resnet`` (:class:`mergelab.align.resnet.ResNet`'s layout, :func:`mergelab.align.resnet.pleas_resnet`;
      the default when the keys are that layout). ``calibration`` is a tensor file of inputs ``[N, in]`` (a
      ResNet's images ``[N, C, H, W]``, or flattened square images): fine-tuning-domain inputs, or another
      domain's for PLeaS-free."""
    from pathlib import Path

    import yaml

    from mergelab.align.api import check_compatible, load_model, read_inputs, write_checkpoint

    recipe_path = Path(recipe_path)
    try:
        data = yaml.safe_load(recipe_path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise MergeLabError(f"cannot read recipe '{recipe_path}': {e}")
    where = f"recipe '{recipe_path}'"
    if not isinstance(data, dict):
        raise MergeLabError(f"{where}: expected a mapping")
    unknown = set(data) - RECIPE_KEYS
    if unknown:
        raise MergeLabError(f"{where}: unknown key(s) {', '.join(sorted(unknown))} (known: {', '.join(sorted(RECIPE_KEYS))})")
    if data.get("merge_method") != "pleas":
        raise MergeLabError(f"{where}: merge_method must be 'pleas' for `mergelab pleas`, got {data.get('merge_method')!r}")
    models = data.get("models")
    if not isinstance(models, list) or len(models) != 2:
        raise MergeLabError(f"{where}: PLeaS merges exactly two models (models: [{{model: A}}, {{model: B}}])")
    paths = [Path(m["model"] if isinstance(m, dict) else m) for m in models]
    if "calibration" not in data:
        raise MergeLabError(f"{where}: 'calibration' (a tensor file of inputs [N, in]) is required")
    params = dict(PARAMETERS)
    given = data.get("parameters") or {}
    bad = set(given) - set(PARAMETERS)
    if bad:
        raise MergeLabError(f"{where}: unknown parameter(s) {', '.join(sorted(bad))} (known: {', '.join(PARAMETERS)})")
    params.update(given)
    out = Path(out)
    if out.exists() and not overwrite:
        from mergelab.errors import OutputError

        raise OutputError(f"output '{out}' already exists; pass --overwrite to replace it")
    a = load_model(paths[0], "model A")
    if a.config is not None and "architecture" in data:
        raise MergeLabError(f"{where}: 'architecture' is for state dicts; '{a.path}' is a Hugging Face folder, whose "
                            f"config.json names its architecture")
    if a.config is not None:  # a Hugging Face folder: the FFN width (mergelab.align.pleas_bert / pleas_llama)
        from mergelab.align.spec import LLAMA_TYPES

        mt = a.config.get("model_type")
        if mt == "bert":
            from mergelab.align.pleas_bert import pleas_bert as merge
        elif mt in LLAMA_TYPES:
            from mergelab.align.pleas_llama import pleas_llama as merge
        else:
            raise MergeLabError(f"PLeaS handles plain MLP and ResNet state dicts and BERT and Llama-layout "
                                f"({', '.join(LLAMA_TYPES)}) folders; '{a.path}' is a Hugging Face '{mt}' model")
        allowed = ("width", "ridge", "attention_width")
        fixed = sorted(k for k in given if k not in allowed)
        if fixed:
            raise MergeLabError(f"{where}: parameter(s) {', '.join(fixed)} do not apply to a {mt} model (the "
                                f"activation is the config's hidden_act, the model output is averaged, each FFN "
                                f"reads the merged stream); only {', '.join(allowed)}")
        r = merge(paths[0], paths[1], Path(data["calibration"]), width=params["width"], ridge=float(params["ridge"]),
                  attention_width=params["attention_width"])
        write_folder(r, paths[0], out, overwrite, {"models": [str(p) for p in paths], "parameters": params})
        groups = {f"mlp.{i}": r.width for i in range(r.config["num_hidden_layers"])}
        return PleasResult(r.state, groups, {g: r.merged_units for g in groups}, r.perms)
    if "attention_width" in given:
        raise MergeLabError(f"{where}: attention_width applies to BERT and Llama-layout folders (their attention); "
                            f"'{a.path}' is a state dict without attention")
    b = load_model(paths[1], "model B")
    check_compatible(a, b, ("model A", "model B"), "PLeaS")  # depth and tensors, naming both files
    x = read_inputs(Path(data["calibration"]))
    arch = data.get("architecture") or ("resnet" if {"stem.weight", "blocks.0.conv1.weight"} <= set(a.state) else "mlp")
    if arch not in ARCHITECTURES:
        raise MergeLabError(f"{where}: architecture must be one of {', '.join(ARCHITECTURES)} for a state dict, got "
                            f"{arch!r}")
    if arch == "resnet":
        res = _resnet_recipe(a, b, x, params, given, where)
    else:
        res = pleas_mlp(a.state, b.state, x.reshape(len(x), -1), width=params["width"],
                        activation=params["activation"], heads=params["heads"], ridge=float(params["ridge"]),
                        layer_inputs=params["inputs"])
    write_checkpoint(a, res.state, out, overwrite, {"method": "pleas", "architecture": arch,
                                                    "models": [str(p) for p in paths],
                                                    "widths": res.widths, "merged_units": res.merged_units,
                                                    **({"budget": res.budget} if res.budget else {}),
                                                    "parameters": params})
    return res


def _resnet_recipe(a, b, x: torch.Tensor, params: dict, given: Mapping, where: str) -> PleasResult:
    """PLeaS on two :class:`mergelab.align.resnet.ResNet` state dicts: the nets are rebuilt from the
    tensors' shapes (stem, blocks, head); images ``[N, C, H, W]`` or flattened square ones."""
    from mergelab.align.resnet import ResNet, pleas_resnet

    fixed = sorted(k for k in given if k in ("activation", "inputs"))
    if fixed:
        raise MergeLabError(f"{where}: parameter(s) {', '.join(fixed)} do not apply to a ResNet (ReLU, and each "
                            f"layer is fitted on both models' own features); width, heads and ridge do")
    nets = []
    for m in (a, b):
        try:
            nets.append(ResNet.from_state(m.state))
        except (KeyError, RuntimeError, IndexError) as e:
            raise MergeLabError(f"'{m.path}' is not a ResNet state dict of mergelab.align.resnet's layout (stem, "
                                f"stem_bn, blocks.i.conv1/bn1/conv2/bn2, fc): {str(e).splitlines()[0]}")
    c = nets[0].stem.weight.shape[1]
    if x.ndim == 2:
        side = int(round((x.shape[1] / c) ** 0.5))
        if c * side * side != x.shape[1]:
            raise MergeLabError(f"{where}: calibration inputs have shape {tuple(x.shape)}; a ResNet with {c} input "
                                f"channel(s) takes images [N, {c}, H, W] or flattened square ones [N, {c}*S*S]")
        x = x.reshape(len(x), c, side, side)
    if x.ndim != 4 or x.shape[1] != c:
        raise MergeLabError(f"{where}: calibration inputs have shape {tuple(x.shape)}; the ResNet takes images "
                            f"[N, {c}, H, W]")
    return pleas_resnet(nets[0], nets[1], x, width=params["width"], heads=params["heads"],
                        ridge=float(params["ridge"]))


# --------------------------------------------------------------------------- conv nets
def pleas_conv(module_a: torch.nn.Module, module_b: torch.nn.Module, inputs: torch.Tensor,
               width: Union[Width, Mapping[str, Width]] = 1.0, activation: str = "relu", heads: str = "average",
               ridge: float = 1e-8) -> PleasResult:
    """PLeaS for a plain conv net (:func:`conv_chain`): conv layers are fitted as linear maps of their
    unfolded input patches; each BatchNorm is folded into its layer's targets and written back as the
    identity (weight 1, bias = the fitted intercept when the conv has none, mean 0, var 1 - eps). The
    merged state dict has model A's keys and the chosen channel widths."""
    if activation not in ACT or heads not in ("average", "concat"):
        raise MergeLabError(f"activation must be one of {', '.join(ACT)} and heads 'average' or 'concat'")
    layers = conv_chain(module_a)
    sa = {k: v.detach() for k, v in module_a.state_dict().items()}
    sb = {k: v.detach() for k, v in module_b.state_dict().items()}
    check_same_shapes(sa, sb, "PLeaS")
    spec = chain_spec({k: tuple(v.shape) for k, v in sa.items()})
    groups = [f"P{i}" for i in range(len(layers) - 1)]
    n = {g: spec.perms[g].size for g in groups}
    widths = {g: resolve_width(width, g, layers[i].name, n[g]) for i, g in enumerate(groups)}
    ins_a, _ = chain_forward(sa, layers, activation, inputs)
    ins_b, _ = chain_forward(sb, layers, activation, inputs)
    hid = lambda ins, i: ins[i + 1].unflatten(1, (n[groups[i]], -1)).movedim(1, -1).reshape(-1, n[groups[i]]) \
        if layers[i + 1].flatten else feature_rows(ins[i + 1])  # noqa: E731
    perms = activation_matching(spec, {g: [(Axis(g), hid(ins_a, i))] for i, g in enumerate(groups)},
                                {g: [(Axis(g), hid(ins_b, i))] for i, g in enumerate(groups)})
    sb = apply_permutations(sb, spec, perms)
    ins_a, outs_a = chain_forward(sa, layers, activation, inputs)
    ins_b, outs_b = chain_forward(sb, layers, activation, inputs)
    merged_units = {g: 2 * n[g] - widths[g] for g in groups}
    split = {g: UnitSplit.by_similarity(hid(ins_a, i), hid(ins_b, i), merged_units[g]) for i, g in enumerate(groups)}

    def blocks(g, fa, fb, last=False, per=1):
        if g is None:
            if last and heads == "concat":
                return torch.cat([fa, fb], 1), torch.tensor([1] * fa.shape[1] + [2] * fb.shape[1])
            return (fa + fb) / 2, torch.zeros(fa.shape[1], dtype=torch.long)
        if per > 1:  # flattened maps: unit c covers columns c*per ... c*per + per - 1
            fa, fb = fa.unflatten(1, (n[g], per)), fb.unflatten(1, (n[g], per))
        f, lab = split[g].features(fa, fb), split[g].labels()
        return (f.flatten(1), lab.repeat_interleave(per)) if per > 1 else (f, lab)

    out: Dict[str, torch.Tensor] = {}
    for i, L in enumerate(layers):
        g_in = groups[i - 1] if i > 0 else None
        g_out = groups[i] if i < len(groups) else None
        per = ins_a[i].shape[1] // n[g_in] if (L.flatten and g_in) else 1
        Z, zb = blocks(g_in, ins_a[i], ins_b[i], per=per) if g_in else (ins_a[i], torch.zeros(ins_a[i].shape[1], dtype=torch.long))
        Y, yb = blocks(g_out, outs_a[i], outs_b[i], last=g_out is None)
        W, b = fit_layer(L, Z, zb, Y, yb, ridge, bias=L.name + ".bias" in sa or L.norm is not None)
        write_layer(out, sa, L, W, b)
    return PleasResult(out, widths, merged_units, perms)


def fit_layer(L: ChainLayer, Z: torch.Tensor, zb: torch.Tensor, Y: torch.Tensor, yb: torch.Tensor, ridge: float,
              bias: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """:func:`lstsq_blocks` for one layer: a conv layer is a linear map of its unfolded input patches
    (``Z`` maps ``[N, C, H, W]``, ``Y`` its output maps), a linear layer of ``Z`` ``[N, in]``."""
    if L.kind == "conv":
        k = L.kernel[0] * L.kernel[1]
        Zu = torch.nn.functional.unfold(Z, L.kernel, padding=L.padding, stride=L.stride)  # [N, C*k, L]
        Z, zb, Y = Zu.transpose(1, 2).reshape(-1, Zu.shape[1]), zb.repeat_interleave(k), feature_rows(Y)
    return lstsq_blocks(Z, Y, zb, yb, ridge, bias=bias)
