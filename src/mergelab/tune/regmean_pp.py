"""RegMean++: RegMean block by block, each candidate's Grams taken on the *merged* model's hidden states.

Nguyen et al., "RegMean++: Enhancing Effectiveness and Generalization of Regression Mean for Model
Merging" (arXiv:2508.03121). Reference code: nthehai01/RegMean-plusplus
(``fusion_bench/method/regmean_plusplus/regmean.py``, ``clip_regmean.py``), upstreamed to FusionBench;
LLM variant: uiuctml/MergeBench ``merging/merging_methods/regmean_plusplus.py``.

The closed form is RegMean's (:func:`mergelab.methods.regmean.regmean_solve`), but merging is
sequential. With ``H_i^(l)`` the merged model's input to block ``l`` on candidate ``i``'s data:

1. every parameter outside the blocks starts as the (``weights``-weighted) average of the candidates
   (``keep_base`` names keep the base value instead: MergeBench's ``embed_tokens`` / ``lm_head``);
2. ``H_i^(0)``: the merged model's input to block 0 on candidate ``i``'s calibration batches, captured
   with a forward pre-hook (with kwargs: attention masks and rotary embeddings are carried along);
3. for each block ``l``: run **candidate i's copy** of block ``l`` on ``H_i^(l)`` and collect the input
   Grams of its linear layers (so intra-block inputs such as ``out_proj``/``fc2``'s come from candidate
   ``i``'s own sub-layers, fed merged hidden states); merge the block's linear weights by RegMean and
   average its other tensors; load the merged block; ``H_i^(l+1) = merged_block_l(H_i^(l))``;
4. after the blocks (``tail``): ``regmean`` (ours, default) -- linear layers after the blocks (BERT's
   pooler, a classifier) get Grams from candidate ``i``'s tail run on the merged model's final hidden
   states; ``average``; or ``base`` (the CLIP reference keeps the pretrained ``post_layernorm`` and
   projection).

Everything is in memory: one working model, one candidate block, the cached hidden states of the
calibration batches (``candidates x examples x tokens x width`` floats) and the candidates' tensors of
the block being merged. Candidates are read from the :class:`~mergelab.tune.functional.ModelPool`.
"""

from __future__ import annotations

import copy
import re
import time
from typing import Dict, List, Mapping, Optional, Sequence

import torch
from torch import nn

from mergelab.calibrate.hooks import CONV1D, GramCollector, linear_layers
from mergelab.errors import MergeLabError
from mergelab.methods.regmean import regmean_solve
from mergelab.tune.functional import ModelPool, batch_kwargs, token_mask
from mergelab.tune.result import TuneResult


class _Stop(Exception):
    pass


def find_blocks(model: nn.Module, path: Optional[str] = None):
    """``(path, ModuleList)`` of the model's repeated blocks: ``path`` if given, else the ModuleList of
    same-type children holding the most parameters (BERT ``encoder.layer``, Llama ``model.layers``,
    GPT-2 ``transformer.h``)."""
    if path is not None:
        mod = model.get_submodule(path)
        if not isinstance(mod, nn.ModuleList):
            raise MergeLabError(f"RegMean++: '{path}' is a {type(mod).__name__}, not a ModuleList of blocks")
        return path, mod
    best, best_n = None, -1
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) > 0 and len({type(m) for m in mod}) == 1:
            n = sum(p.numel() for p in mod.parameters())
            if n > best_n:
                best, best_n = (name, mod), n
    if best is None:
        raise MergeLabError("RegMean++: the model has no ModuleList of blocks; pass blocks='path.to.list'")
    return best


def _hidden_arg(args, kwargs):
    if args:
        return args[0]
    if "hidden_states" in kwargs:
        return kwargs["hidden_states"]
    raise MergeLabError("RegMean++: cannot find the hidden states among the block's inputs")


def _with_hidden(args, kwargs, h):
    if args:
        return (h,) + tuple(args[1:]), kwargs
    return args, dict(kwargs, hidden_states=h)


def _block_out(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def _average(pool: ModelPool, keys: Sequence[str], coeffs: Sequence[float]) -> Dict[str, torch.Tensor]:
    out: Dict[str, torch.Tensor] = {}
    for i in range(len(pool)):
        theta = pool.load(i, keys)
        for k in keys:
            if k in out:
                out[k].add_(theta[k], alpha=coeffs[i])
            else:
                out[k] = theta[k] * coeffs[i]
        del theta
    return out


def _solve_layer(kind: str, weights: List[torch.Tensor], grams: List[torch.Tensor], alpha, coeffs, solver):
    shape = weights[0].shape
    if kind == CONV1D:
        reg = [w for w in weights]
    else:  # nn.Linear [out, in] or nn.Conv1d [out, in, 1]
        reg = [w.reshape(shape[0], -1).T for w in weights]
    merged = regmean_solve(reg, grams, alpha, coeffs, solver).to(torch.float32)
    return merged if kind == CONV1D else merged.T.reshape(shape).contiguous()


@torch.no_grad()
def regmean_plusplus(model: nn.Module, pool: ModelPool, data: Sequence[Sequence], alpha: float = 0.95,
                     base: Optional[Mapping[str, torch.Tensor]] = None, tail: str = "regmean", keep_base: str = "",
                     exclude: str = "", weights: Optional[Sequence[float]] = None, blocks: Optional[str] = None,
                     mask_padding: bool = True, solver: str = "auto") -> TuneResult:
    """RegMean++ of the candidates in ``pool`` (candidate ``i`` <-> ``data[i]``, its calibration batches).

    ``model`` gives the architecture (its weights are replaced); candidate tensors are named like its
    ``state_dict``. ``exclude`` names tensors averaged instead of solved. Returns the merged tensors.
    """
    if tail not in ("regmean", "average", "base"):
        raise MergeLabError(f"RegMean++ tail must be regmean, average or base, got '{tail}'")
    if len(data) != len(pool):
        raise MergeLabError(f"RegMean++ needs calibration data for every candidate: {len(pool)} candidates, "
                            f"{len(data)} data sets")
    if (tail == "base" or keep_base) and base is None:
        raise MergeLabError("RegMean++: tail='base' and keep_base need the base model's tensors")
    start = time.perf_counter()
    m = len(pool)
    coeffs = [1.0 / m] * m if weights is None else [w / sum(weights) for w in weights]
    model = model.eval()
    state = model.state_dict()
    keys, seen = [], set()
    for k, v in model.state_dict(keep_vars=True).items():  # tied tensors (lm_head = embeddings) once
        if v.is_floating_point() and id(v) not in seen:
            seen.add(id(v))
            keys.append(k)
    merged = _average(pool, keys, coeffs)
    if keep_base:
        for k in keys:
            if re.search(keep_base, k):
                merged[k] = base[k].detach().float().clone()
    model.load_state_dict(merged, strict=False)
    path, block_list = find_blocks(model, blocks)
    prefix = f"{path}." if path else ""

    # execution order: which modules outside the blocks run after them (the tail)
    order: List[str] = []
    outside = [(name, mod) for name, mod in model.named_modules()
               if name and not (name + ".").startswith(prefix) and list(mod.parameters(recurse=False))]
    handles = [mod.register_forward_pre_hook(lambda mod_, a, n=name: order.append(n)) for name, mod in outside]
    handles.append(block_list[0].register_forward_pre_hook(lambda mod_, a: order.append("<blocks>")))
    try:
        model(**batch_kwargs(data[0][0]))
    finally:
        for h in handles:
            h.remove()
    tail_modules = list(dict.fromkeys(order[order.index("<blocks>") + 1:])) if "<blocks>" in order else []
    tail_keys = {f"{n}.{p}" for n in tail_modules for p, _ in model.get_submodule(n).named_parameters(recurse=False)}
    # linear layers after the blocks whose weight is merged here (a tied lm_head follows the embeddings)
    tail_linear = [n for n in tail_modules if _as_linear(n, model.get_submodule(n)) is not None
                   and f"{n}.weight" in keys]
    if tail == "base":
        for k in keys:
            if k in tail_keys:
                merged[k] = base[k].detach().float().clone()

    # H_i^(0) and the block call's other arguments, per candidate and batch
    cache: List[List[list]] = []
    for i in range(m):
        rows = []
        for b in data[i]:
            got = {}

            def grab(mod_, args, kwargs):
                got["args"] = tuple(None if type(a).__name__.endswith("Cache") else a for a in args)
                got["kwargs"] = _without_cache(kwargs)
                raise _Stop

            h = block_list[0].register_forward_pre_hook(grab, with_kwargs=True)
            try:
                model(**batch_kwargs(b))
            except _Stop:
                pass
            finally:
                h.remove()
            if not got:
                raise MergeLabError("RegMean++: the first block was never called on a calibration batch")
            rows.append([got["args"], got["kwargs"], token_mask(b) if mask_padding else None])
        cache.append(rows)

    for li, block in enumerate(block_list):
        bprefix = f"{prefix}{li}."
        bkeys = [k for k in keys if k.startswith(bprefix)]
        layers = linear_layers(block)
        cand_block = copy.deepcopy(block)
        grams: List[Dict[str, torch.Tensor]] = []
        tensors: List[Dict[str, torch.Tensor]] = []
        for i in range(m):
            theta = pool.load(i, bkeys)
            cand_block.load_state_dict({k[len(bprefix):]: v for k, v in theta.items()}, strict=False)
            with GramCollector(linear_layers(cand_block), mask_padding=mask_padding) as col:
                for args, kwargs, mask in cache[i]:
                    col.mask = mask
                    cand_block(*args, **kwargs)
            grams.append({n: g for n, (g, _) in col.grams("mean").items()})
            tensors.append(theta)
        out = {}
        solved = set()
        for layer in layers:
            key = bprefix + layer.weight_name
            if key not in bkeys or (exclude and re.search(exclude, key)) or (keep_base and re.search(keep_base, key)):
                continue
            out[key] = _solve_layer(layer.kind, [t[key] for t in tensors], [g[layer.name] for g in grams], alpha,
                                    coeffs, solver)
            solved.add(key)
        for k in bkeys:
            if k in solved:
                continue
            if keep_base and re.search(keep_base, k):
                out[k] = base[k].detach().float().clone()
            else:
                out[k] = sum(t[k] * c for t, c in zip(tensors, coeffs))
        merged.update(out)
        block.load_state_dict({k[len(bprefix):]: v for k, v in out.items()}, strict=False)
        del tensors, cand_block
        if li < len(block_list) - 1:
            for i in range(m):
                for row in cache[i]:
                    args, kwargs, mask = row
                    h = _block_out(block(*args, **kwargs))
                    row[0], row[1] = _with_hidden(args, kwargs, h)

    if tail == "regmean" and tail_linear:
        t_grams: List[Dict[str, torch.Tensor]] = []
        t_weights: List[Dict[str, torch.Tensor]] = []
        tail_weight_keys = [f"{n}.weight" for n in tail_linear]
        for i in range(m):
            theta = pool.load(i, sorted(tail_keys & set(keys)))
            model.load_state_dict(theta, strict=False)
            hooked = [_as_linear(n, model.get_submodule(n)) for n in tail_linear]
            with GramCollector(hooked, mask_padding=mask_padding) as col:
                for b in data[i]:
                    col.mask = token_mask(b) if mask_padding else None
                    model(**batch_kwargs(b))
            t_grams.append({n: g for n, (g, _) in col.grams("mean").items()})
            t_weights.append({k: theta[k] for k in tail_weight_keys})
        for n in tail_linear:
            key = f"{n}.weight"
            if key not in tail_weight_keys or (exclude and re.search(exclude, key)) \
                    or (keep_base and re.search(keep_base, key)):
                continue
            kind = _as_linear(n, model.get_submodule(n)).kind
            merged[key] = _solve_layer(kind, [w[key] for w in t_weights], [g[n] for g in t_grams], alpha, coeffs,
                                       solver)
        model.load_state_dict(merged, strict=False)
    return TuneResult(merged, {}, [], time.perf_counter() - start,
                      {"method": "regmean_plusplus", "alpha": alpha, "tail": tail, "blocks": path,
                       "num_blocks": len(block_list), "tail_linear": tail_linear, "keep_base": keep_base})


def _without_cache(kwargs: dict) -> dict:
    """Block kwargs with any KV cache removed: replaying a block must not grow a cache between calls."""
    out = dict(kwargs)
    for key, value in kwargs.items():
        if key in ("past_key_values", "past_key_value", "layer_past", "cache") or type(value).__name__.endswith("Cache"):
            out[key] = None
    if "use_cache" in out:
        out["use_cache"] = False
    return out


def _as_linear(name: str, module: nn.Module):
    """The module as a hookable :class:`~mergelab.calibrate.hooks.LinearLayer` named ``name``, or None."""
    found = [l for l in linear_layers(module) if l.name == ""]
    if not found:
        return None
    l = found[0]
    return type(l)(name, l.module, l.kind, l.d_in)
