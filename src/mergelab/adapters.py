"""Merges that stay adapters: ``output: {format: peft, combine: cat | svd | knots, rank: R}``.

The inputs are PEFT LoRA adapters on the recipe's ``base_model`` (``BASE+ADAPTER`` or
``{adapter: PATH}``); the output is a PEFT LoRA folder (:func:`mergelab.io.peft_adapter.write_lora`,
scaling 1 for every module, ``use_rslora: false``) with ``mergelab.json`` recording, per module, the
rank kept and the relative Frobenius error of the truncation ``||D - B'A'||_F / ||D||_F`` against the
merged delta ``D`` it approximates. Per module ``M`` and adapter ``i``: ``dW_i = s_i B_i A_i`` (PEFT's
scaling, rsLoRA and patterns included; an adapter without ``M`` contributes nothing there).

* ``cat`` (exact; PEFT ``add_weighted_adapter(combination_type="cat")``): with task arithmetic's
  coefficients ``c_i = lambda * w_i`` (``/ sum w`` with ``normalize``), ``A' = [c_1 s_1 A_1; ...]``
  (rows), ``B' = [B_1 ... B_n]`` (columns), so ``B'A' = sum_i c_i dW_i`` and the ranks add up. Only
  ``task_arithmetic`` is a sum of the deltas; other methods need ``svd``.
* ``svd``: ``D`` = the dense merge's delta for ``M``, ``merged - W``, computed by the recipe's method
  (any method that merges task vectors on a base: task_arithmetic, ties, dare_ties, della, ...) through
  the same plan and executor as the dense merge, one tensor at a time, then truncated to rank ``R`` by
  a float32 SVD on the merge device (Eckart-Young): ``B' = U_R diag(S_R)``, ``A' = V_R^T``.
* ``knots`` (Stoica et al., "Model merging with SVD to tie the KnOTS", arXiv 2410.19735): the
  concatenation ``[dW_1 | ... | dW_n] = U diag(S) [V_1^T | ... | V_n^T]`` (a float64 SVD, formed from
  the factors without densifying; components with ``S <= 1e-5`` dropped as in the official code),
  ``R_i = diag(S) V_i^T`` are the aligned blocks; the recipe's method (``ties``, ``dare_ties``,
  ``task_arithmetic``, ``dare_linear``) merges them on a zero base (so TIES trims, elects signs and
  takes the disjoint mean over the blocks, with its usual per-model ``weight``/``density``), giving
  ``R*``; ``D = U R*``, truncated to rank ``R``. Differences from the official code: the LoRA scaling
  ``s_i`` is applied (the official code omits it; equal when alpha = r), and TIES' top-k trim is per
  module (mergelab's TIES is per tensor) where the official code trims over the whole model.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch

from mergelab.errors import MergeLabError, OutputError, RecipeError
from mergelab.io.adapted import AdaptedCheckpoint
from mergelab.io.peft_adapter import LoraModule, write_lora
from mergelab.methods.registry import BaseUse
from mergelab.recipe import Recipe, dump_recipe, normalize_dtype

COMBINE_TYPES = {
    "cat": "exact: the adapters' factors side by side, weighted by task_arithmetic's coefficients (ranks add up)",
    "svd": "the recipe method's merged delta per module (any task-vector method), truncated to rank R (float32 SVD)",
    "knots": "KnOTS (arXiv 2410.19735): SVD-aligned blocks of the adapters merged by ties/dare_ties, rank R",
}
KNOTS_METHODS = ("ties", "dare_ties", "task_arithmetic", "dare_linear")
KNOTS_EPS = 1e-5


def _inputs(recipe: Recipe, checkpoints: dict, plan) -> List[AdaptedCheckpoint]:
    base = checkpoints[recipe.base_model]
    if isinstance(base, AdaptedCheckpoint):
        raise RecipeError(f"output: format: peft: base_model '{recipe.base_model}' must be a model, not an adapter")
    adapted = []
    for i in plan.model_indices:
        ck = plan.checkpoints[i]
        if not isinstance(ck, AdaptedCheckpoint) or ck.base.path.resolve() != base.path.resolve():
            raise RecipeError(f"output: format: peft merges adapters on base_model '{recipe.base_model}': model "
                              f"'{ck.label}' is not written as {recipe.base_model}+ADAPTER or {{adapter: PATH}}")
        if ck.adapter.full:
            raise RecipeError(f"output: format: peft: adapter '{ck.adapter.folder}' saves whole tensors "
                              f"(modules_to_save: {', '.join(sorted(ck.adapter.full))}), which an adapter merge cannot "
                              f"combine; merge to a model (drop output:) instead")
        adapted.append(ck)
    return adapted


def _coefficients(job) -> List[float]:
    w = [float(p["weight"]) for p in job.model_params]
    c = [x * float(job.params.get("lambda", 1.0)) for x in w]
    if job.params.get("normalize") and abs(sum(w)) >= 1e-8:
        c = [x / sum(w) for x in c]
    return c


def _truncate(delta: torch.Tensor, rank: int, device: str) -> Tuple[torch.Tensor, torch.Tensor, int, float]:
    """Best rank-``rank`` factors of ``delta`` (float32 SVD on ``device``): ``(A, B, kept, rel_error)``."""
    d = delta.to(device=device, dtype=torch.float32)
    U, S, Vh = torch.linalg.svd(d, full_matrices=False)
    k = min(rank, S.numel())
    total = float(S.double().pow(2).sum())
    err = float(S[k:].double().pow(2).sum()) ** 0.5 / total ** 0.5 if total > 0 else 0.0
    return Vh[:k].cpu(), (U[:, :k] * S[:k]).cpu(), k, err


def _orient(m: LoraModule) -> Tuple[torch.Tensor, torch.Tensor]:
    """Factors ``(A, B)`` of ``m``'s delta in the base weight's orientation, scale applied to A."""
    A, B = m.A.double() * m.scale, m.B.double()
    return (B.t(), A.t()) if m.transposed else (A, B)


def knots_align(mods: List[LoraModule]) -> Tuple[torch.Tensor, List[torch.Tensor]]:
    """``U`` (out x k) and the aligned blocks ``R_i = diag(S) V_i^T`` (k x in) of the concatenated
    deltas ``[dW_1 | ... | dW_n]``, in float64, from the factors: ``[B_1..B_n] @ blockdiag(s_i A_i)``
    is reduced by two QR decompositions to a (sum r) x (sum r) core before the SVD."""
    factors = [_orient(m) for m in mods]
    Bcat = torch.cat([B for _, B in factors], dim=1)  # out x sum r
    inn = factors[0][0].shape[1]
    Ablk = torch.zeros(Bcat.shape[1], inn * len(mods), dtype=torch.float64)
    r0 = 0
    for i, (A, _) in enumerate(factors):
        Ablk[r0:r0 + A.shape[0], i * inn:(i + 1) * inn] = A
        r0 += A.shape[0]
    Qb, Rb = torch.linalg.qr(Bcat)
    Qa, Ra = torch.linalg.qr(Ablk.t())
    Uc, S, Vch = torch.linalg.svd(Rb @ Ra.t(), full_matrices=False)
    keep = S > KNOTS_EPS
    U = Qb @ Uc[:, keep]
    SV = S[keep, None] * (Vch[keep] @ Qa.t())  # k x n*in
    return U, [SV[:, i * inn:(i + 1) * inn] for i in range(len(mods))]


def merge_to_adapter(recipe: Recipe, out, *, overwrite: bool = False, dry_run: bool = False, device: str = "cpu",
                     strict: bool = False, on_warning=None, started: Optional[float] = None):
    """Run a recipe with ``output: {format: peft, ...}`` (see the module docstring); returns a
    :class:`mergelab.merge.MergeResult`. Nothing is written until every module is merged; the folder
    appears whole or not at all."""
    from mergelab.execute.local import LocalExecutor
    from mergelab.io.output import versions
    from mergelab.merge import MergeResult, build_plan, open_checkpoints, peak_rss_bytes

    started = started or time.perf_counter()
    spec = recipe.output
    checkpoints = open_checkpoints(recipe)
    plan = build_plan(recipe, checkpoints, strict=strict)
    for line in plan.warnings:
        if on_warning:
            on_warning(line)
    method = plan.method
    if spec.combine == "cat" and method.name != "task_arithmetic":
        raise RecipeError(f"output: combine: cat is exact only for task_arithmetic (a weighted sum of the deltas); "
                          f"'{method.name}' needs combine: svd (or knots), rank: R")
    if spec.combine == "svd" and method.base != BaseUse.REQUIRED:
        raise RecipeError(f"output: combine: svd needs a method that merges task vectors on base_model "
                          f"(task_arithmetic, ties, dare_ties, ...); '{method.name}' does not")
    if spec.combine == "knots" and method.name not in KNOTS_METHODS:
        raise RecipeError(f"output: combine: knots merges the aligned blocks with one of {', '.join(KNOTS_METHODS)}; "
                          f"got '{method.name}'")
    adapters = _inputs(recipe, checkpoints, plan)
    names = sorted({n for ck in adapters for n in ck.modules})
    jobs = {j.name: j for j in plan.jobs if j.name in names}
    base_ck = checkpoints[recipe.base_model]
    summary = {"format": "peft", "combine": spec.combine, "rank": spec.rank, "modules": len(names),
               "adapters": [str(ck.adapter.folder) for ck in adapters]}
    if dry_run:
        return MergeResult(None, time.perf_counter() - started, peak_rss_bytes(), summary, plan.notes, True)
    if out is None:
        raise MergeLabError("an output folder is required (-o OUT)")
    out = Path(out)
    if out.exists() and not overwrite:
        raise OutputError(f"output '{out}' already exists; pass --overwrite to replace it")
    for p in [base_ck.path] + [ck.adapter.folder for ck in adapters]:
        p = Path(p).resolve()
        if out.resolve() == p or p in out.resolve().parents:
            raise OutputError(f"output '{out}' overlaps input '{p}'; choose another output folder")

    factors: Dict[str, Tuple[torch.Tensor, torch.Tensor]] = {}
    report: Dict[str, dict] = {}
    embeddings = {ck.modules[n].name for ck in adapters for n in names if n in ck.modules and ck.modules[n].embedding}
    module_of = {n: next(ck.modules[n].name for ck in adapters if n in ck.modules) for n in names}

    if spec.combine == "cat":
        for n in names:
            coef = _coefficients(jobs[n])
            As, Bs = [], []
            for c, ck in zip(coef, adapters):
                m = ck.modules.get(n)
                if m is None:
                    continue
                # in the module's own layout (an embedding's delta is (B A)^T: still sum_i c_i s_i B_i A_i)
                A, B = m.A.float() * (c * m.scale), m.B.float()
                As.append(A)
                Bs.append(B)
            factors[module_of[n]] = (torch.cat(As, 0), torch.cat(Bs, 1))
            report[module_of[n]] = {"rank": int(factors[module_of[n]][0].shape[0]), "relative_error": 0.0}
    elif spec.combine == "svd":
        sink = _DeltaSink(base_ck, {n: module_of[n] for n in names}, spec.rank, device, factors, report)
        sub = dataclasses.replace(plan, jobs=[dataclasses.replace(jobs[n], out_dtype=torch.float32) for n in names])
        executor = LocalExecutor(device=device, seed=recipe.seed, read_ahead=False, chunk_elements=1 << 62,
                                 whole_elements=None)
        executor.run(sub, sink)
        _own_layout(adapters, names, module_of, factors)
    else:
        factors, report = _knots(recipe, adapters, names, jobs, module_of, device)

    out_dtype = normalize_dtype(recipe.out_dtype) or normalize_dtype(recipe.dtype)
    dtype = getattr(torch, out_dtype) if out_dtype else None
    manifest = {
        "recipe": dump_recipe(recipe),
        "method": {"name": method.name, "reference": method.reference},
        "output": {"format": "peft", "combine": spec.combine, "rank": spec.rank},
        "inputs": {ck.label: ck.fingerprint() for ck in adapters},
        "versions": versions(),
        "device": device,
        "modules": report,
        "notes": plan.notes,
        "warnings": plan.warnings,
    }
    manifest["wall_seconds"] = round(time.perf_counter() - started, 3)
    manifest["peak_rss_bytes"] = peak_rss_bytes()
    write_lora(out, factors, base_model=recipe.base_model, embeddings=embeddings, dtype=dtype, overwrite=overwrite,
               extra_files={"mergelab.json": json.dumps(manifest, indent=2, default=str) + "\n"})
    summary["modules_report"] = report
    return MergeResult(out, time.perf_counter() - started, peak_rss_bytes(), summary, plan.notes)


class _DeltaSink:
    """Takes the dense merge's tensors (whole: one chunk each), keeps ``merged - W`` truncated to the rank."""

    def __init__(self, base, modules: Dict[str, str], rank: int, device: str, factors: dict, report: dict):
        self.base, self.modules, self.rank, self.device = base, modules, rank, device
        self.factors, self.report = factors, report

    def is_complete(self, name: str) -> bool:
        return False

    def write(self, name: str, tensor: torch.Tensor, row_start: int = 0) -> None:
        w = self.base.read(name, dtype=torch.float32)
        if tuple(tensor.shape) != tuple(w.shape) or row_start:
            raise MergeLabError(f"internal: tensor '{name}' arrived in chunks")
        A, B, k, err = _truncate(tensor.float() - w, self.rank, self.device)
        module = self.modules[name]
        self.factors[module] = (A, B)
        self.report[module] = {"rank": k, "relative_error": err}

    def close(self) -> None:
        pass


def _knots(recipe, adapters, names, jobs, module_of, device):
    from mergelab.merge import merge_state_dicts

    factors, report = {}, {}
    for n in names:
        job = jobs[n]
        present = [i for i, ck in enumerate(adapters) if n in ck.modules]
        mods = [adapters[i].modules[n] for i in present]
        U, blocks = knots_align(mods)
        params = {k: v for k, v in job.params.items() if v is not None}  # None: the default, not a setting
        for p in job.model_params[0] if job.model_params else {}:
            params[p] = [job.model_params[i][p] for i in present]
        zero = {n: torch.zeros(blocks[0].shape, dtype=torch.float32)}
        merged = merge_state_dicts(zero, [{n: b.float()} for b in blocks], recipe.merge_method, params=params,
                                   seed=recipe.seed, device=device)[n].double()
        # D = U R*; R* = U2 S2 V2^T gives D's SVD as (U U2) S2 V2^T (U has orthonormal columns)
        U2, S2, V2h = torch.linalg.svd(merged, full_matrices=False)
        k = min(recipe.output.rank, S2.numel())
        total = float(S2.pow(2).sum())
        err = float(S2[k:].pow(2).sum()) ** 0.5 / total ** 0.5 if total > 0 else 0.0
        B = ((U @ U2[:, :k]) * S2[:k]).float()
        A = V2h[:k].float()
        factors[module_of[n]] = (A, B)
        report[module_of[n]] = {"rank": k, "relative_error": err, "aligned_rank": int(U.shape[1])}
    _own_layout(adapters, names, module_of, factors)
    return factors, report


def _own_layout(adapters, names, module_of, factors) -> None:
    """Factors found in the base weight's orientation, turned into the module's own layout where its
    delta is transposed (embeddings, fan_in_fan_out): ``(B'A')^T = (A'^T)(B'^T)``."""
    for n in names:
        if any(ck.modules[n].transposed for ck in adapters if n in ck.modules):
            A, B = factors[module_of[n]]
            factors[module_of[n]] = (B.t().contiguous(), A.t().contiguous())
