"""``mergelab moe-compress``: merge the experts of a Mixtral MoE into fewer experts (MC-SMoE).

MC-SMoE: Li et al., "Merge, Then Compress: Demystify Efficient SMoE with Hints from Its Routing
Policy", ICLR 2024. Steps, per MoE layer (all layers get ``K`` groups):

1. **Routing statistics.** The calibration texts run through the MoE (streamed, one decoder layer in
   memory: :class:`mergelab.moe.stream.StreamedDecoder`). Usage frequency ``f_e``: the share of real
   (non-pad) tokens whose top-1 routed expert is ``e``. Similarity of experts ``i`` and ``j``: the
   cosine of their router-logit columns over all those tokens, mapped to ``(cos + 1) / 2`` (the
   paper's default ``router-logits`` similarity), from the Gram matrix of the logits.
2. **Dominant experts.** The ``K`` most used experts (ties: lower index) each found a group.
3. **Grouping.** Every other expert joins the dominant expert it is most similar to (ties: lower index).
4. **Permutation alignment.** Each member's hidden neurons are permuted onto the group's dominant
   expert by weight matching: the Hungarian algorithm (``scipy.optimize.linear_sum_assignment``)
   maximises ``sum_i <[gate; up]_dom[i], [gate; up]_e[pi(i)]> + <down_dom[:, i], down_e[:, pi(i)]>``.
   Permuting gate/up rows and down columns together leaves an expert's function unchanged.
5. **Frequency-weighted merge.** ``W_G = sum_e f_e W_e / sum_e f_e`` over the group's aligned
   members (equal weights when no member was used on the calibration data).
6. **Optional compression** (``rank`` and/or ``sparsity``): each merged matrix becomes
   ``U_r S_r V_r^T + S`` with ``S`` the largest-magnitude ``sparsity`` fraction of the residual, the
   paper's LoSparse initialisation. The paper then prunes ``S`` with PLATON importance while
   fine-tuning with distillation; there is no training here, so ``S`` is kept by magnitude once. The
   output stores the product dense (transformers' Mixtral holds dense experts); ``mcsmoe.json`` gives
   the bytes the factored form would take.

Output layouts (``layout``):

* ``reduced`` (default): ``K`` experts per layer (``num_local_experts = K``, ``num_experts_per_tok =
  min(k, K)``); group ``g``'s router row is its dominant expert's row, the members' rows are dropped,
  groups in the order of their dominant expert's index. This is what makes the model smaller; a
  token now picks among groups by the dominant experts' logits only.
* ``shared`` (the paper's M-SMoE): all ``E`` slots and the router are kept and every member's slot
  holds its group's merged expert ("all members point to the same merged expert"); the checkpoint
  is as large as the input, the function is the paper's.

Everything else (attention, norms, embeddings, head, tokenizer) is copied unchanged. The routing
statistics, groups, permutations' effect and sizes go to ``mcsmoe.json`` in the output folder.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, List, Optional, Sequence

import torch

from mergelab.compress.lowrank import truncated_svd
from mergelab.errors import CheckpointError, MergeLabError
from mergelab.io.checkpoint import Checkpoint
from mergelab.io.output import copy_donor_files, prepare_output, publish, versions, write_manifest
from mergelab.io.writer import ShardWriter, layout_shards, parse_size

REPORT_FILE = "mcsmoe.json"
LAYOUTS = ("reduced", "shared")


@dataclass
class RoutingStats:
    """Per layer: ``counts[l]`` top-1 token counts [E], ``gram[l]`` = sum over tokens of
    ``logits^T logits`` [E, E] (float64), and the number of real tokens seen."""
    counts: List[torch.Tensor]
    gram: List[torch.Tensor]
    tokens: int

    def frequency(self, layer: int) -> torch.Tensor:
        c = self.counts[layer].double()
        return c / c.sum().clamp(min=1)

    def similarity(self, layer: int) -> torch.Tensor:
        """``(cos + 1) / 2`` of the router-logit columns, [E, E]."""
        g = self.gram[layer]
        norm = g.diagonal().clamp(min=1e-30).sqrt()
        return (g / norm[:, None] / norm[None, :] + 1) / 2


@dataclass
class CompressResult:
    out: Path
    experts_in: int
    experts_out: int
    seconds: float
    report: dict = field(default_factory=dict)


# ------------------------------------------------------------------ the model
def _moe_config(path: Path) -> dict:
    cfg_file = Path(path) / "config.json"
    if not Path(path).is_dir():
        raise CheckpointError(f"MOE '{path}' is not a folder (expected a Mixtral checkpoint as `mergelab moe` "
                              f"writes it)")
    if not cfg_file.is_file():
        raise CheckpointError(f"MOE '{path}' has no config.json: cannot tell its architecture")
    try:
        cfg = json.loads(cfg_file.read_text(encoding="utf-8"))
    except ValueError as e:
        raise CheckpointError(f"MOE '{cfg_file}' is not valid JSON: {e}")
    if cfg.get("model_type") != "mixtral" or not isinstance(cfg.get("num_local_experts"), int):
        raise CheckpointError(f"MOE '{path}': config.json has model_type {cfg.get('model_type')!r} (expected "
                              f"'mixtral' with an integer num_local_experts); moe-compress merges the experts of "
                              f"a Mixtral MoE, e.g. one written by `mergelab moe`")
    return cfg


def _expert_names(layer: int) -> tuple:
    pre = f"model.layers.{layer}.mlp"
    return f"{pre}.experts.gate_up_proj", f"{pre}.experts.down_proj", f"{pre}.gate.weight"


def _check_tensors(ck: Checkpoint, cfg: dict) -> None:
    E, H = cfg["num_local_experts"], cfg["hidden_size"]
    for l in range(cfg["num_hidden_layers"]):
        gu, down, gate = _expert_names(l)
        for name in (gu, down, gate):
            if name not in ck.tensors:
                raise CheckpointError(f"MOE '{ck.path}' has no tensor '{name}' (expected transformers 5's packed "
                                      f"Mixtral layout: mlp.experts.gate_up_proj [E, 2I, H], mlp.experts.down_proj "
                                      f"[E, H, I], mlp.gate.weight [E, H])")
        s_gu, s_down, s_gate = (tuple(ck.tensors[n].shape) for n in (gu, down, gate))
        I2 = s_gu[1] if len(s_gu) == 3 else -1
        if len(s_gu) != 3 or s_gu[0] != E or s_gu[2] != H or I2 % 2 or s_down != (E, H, I2 // 2) or s_gate != (E, H):
            raise CheckpointError(f"MOE '{ck.path}' layer {l}: expert tensors have shapes {list(s_gu)}, "
                                  f"{list(s_down)}, {list(s_gate)}; expected [E, 2I, H], [E, H, I], [E, H] with "
                                  f"E = num_local_experts = {E} and H = hidden_size = {H}")


# ------------------------------------------------------------------ statistics
@torch.no_grad()
def routing_statistics(folder: Path, texts: Sequence[str], batch_size: int = 8, max_length: int = 256,
                       log: Callable = lambda m: None) -> RoutingStats:
    """Top-1 counts and router-logit Gram matrices of every MoE layer on ``texts`` (float32, streamed)."""
    from transformers import AutoTokenizer

    from mergelab.moe.stream import StreamedDecoder

    try:
        tok = AutoTokenizer.from_pretrained(str(folder))
    except Exception as e:  # transformers raises many kinds
        raise CheckpointError(f"MOE '{folder}': cannot load its tokenizer (the calibration texts need it): {e}")
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "right"
    model = StreamedDecoder(Path(folder), torch.float32, "MOE")
    L, E = len(model.layers), model.config.num_local_experts
    counts = [torch.zeros(E, dtype=torch.long) for _ in range(L)]
    gram = [torch.zeros(E, E, dtype=torch.float64) for _ in range(L)]
    real = {}

    def take(idx: int, output) -> None:
        logits, _, top = output
        keep = real["mask"]
        lg = logits.float()[keep].double()
        counts[idx] += torch.bincount(top[:, 0][keep], minlength=E)
        gram[idx] += lg.T @ lg

    model.module_output["mlp.gate"] = take
    tokens = 0
    for start in range(0, len(texts), batch_size):
        enc = tok(list(texts[start:start + batch_size]), return_tensors="pt", padding=True, truncation=True,
                  max_length=max_length)
        real["mask"] = enc["attention_mask"].reshape(-1).bool()
        tokens += int(real["mask"].sum())
        model.forward(enc["input_ids"], enc["attention_mask"])
    log(f"routing statistics: {len(texts)} texts, {tokens} tokens, {L} layers")
    return RoutingStats(counts, gram, tokens)


# ------------------------------------------------------------------ grouping
def group_experts(freq: torch.Tensor, sim: torch.Tensor, k: int) -> List[List[int]]:
    """The ``k`` most used experts (ties: lower index) found groups; every other expert joins the
    dominant expert with the highest similarity (ties: lower index). Groups are ordered by their
    dominant's index; each lists the dominant first, then members by index."""
    E = freq.numel()
    order = sorted(range(E), key=lambda e: (-float(freq[e]), e))
    dominant = sorted(order[:k])
    groups = {d: [d] for d in dominant}
    for e in range(E):
        if e in groups:
            continue
        best = max(dominant, key=lambda d: (float(sim[e, d]), -d))
        groups[best].append(e)
    return [groups[d] for d in dominant]


def align_permutation(ref_gate_up: torch.Tensor, ref_down: torch.Tensor, gate_up: torch.Tensor,
                      down: torch.Tensor) -> torch.Tensor:
    """``pi`` with expert ``(gate_up[[pi, I + pi]], down[:, pi])`` best matching the reference: the
    Hungarian algorithm on the neuron-by-neuron sum of inner products of the [gate; up] rows and the
    down columns (weight matching)."""
    from scipy.optimize import linear_sum_assignment

    I = ref_down.shape[1]
    w_ref = torch.cat([ref_gate_up[:I], ref_gate_up[I:], ref_down.T], dim=1).double()
    w = torch.cat([gate_up[:I], gate_up[I:], down.T], dim=1).double()
    score = (w_ref @ w.T).numpy()  # [ref neuron, member neuron]
    rows, cols = linear_sum_assignment(score, maximize=True)
    pi = torch.empty(I, dtype=torch.long)
    pi[torch.as_tensor(rows)] = torch.as_tensor(cols)
    return pi


def permute_expert(gate_up: torch.Tensor, down: torch.Tensor, pi: torch.Tensor) -> tuple:
    I = down.shape[1]
    return torch.cat([gate_up[:I][pi], gate_up[I:][pi]]), down[:, pi]


def merge_group(gate_up: torch.Tensor, down: torch.Tensor, members: List[int], freq: torch.Tensor,
                align: bool = True) -> tuple:
    """The frequency-weighted merge of ``members`` (dominant first) of one layer's packed experts
    ``gate_up`` [E, 2I, H] and ``down`` [E, H, I], members aligned to the dominant; float32."""
    f = torch.tensor([float(freq[e]) for e in members], dtype=torch.float64)
    w = f / f.sum() if float(f.sum()) > 0 else torch.full_like(f, 1.0 / len(members))
    ref_gu, ref_dn = gate_up[members[0]].float(), down[members[0]].float()
    acc_gu, acc_dn = ref_gu * float(w[0]), ref_dn * float(w[0])
    for e, we in zip(members[1:], w[1:].tolist()):
        gu, dn = gate_up[e].float(), down[e].float()
        if align:
            gu, dn = permute_expert(gu, dn, align_permutation(ref_gu, ref_dn, gu, dn))
        acc_gu += gu * we
        acc_dn += dn * we
    return acc_gu, acc_dn


def low_rank_sparse(w: torch.Tensor, rank: Optional[int], sparsity: Optional[float]) -> tuple:
    """``(U_r S_r V_r^T + S, stored_numbers)``: rank-``rank`` SVD plus the largest-magnitude ``sparsity``
    fraction of the residual (``rank`` None: no low-rank part; ``sparsity`` None: no sparse part)."""
    w = w.float()
    approx = torch.zeros_like(w)
    stored = 0
    if rank is not None:
        f = truncated_svd(w, rank=rank, dtype=torch.float64)
        approx = ((f.U * f.S) @ f.Vh).float()
        stored += f.S.numel() * (w.shape[0] + w.shape[1])
    if sparsity is not None:
        resid = w - approx
        keep = int(round(sparsity * resid.numel()))
        if keep > 0:  # largest |residual| first, ties to the lower flat index
            idx = torch.sort(resid.abs().reshape(-1), descending=True, stable=True).indices[:keep]
            sparse = torch.zeros(resid.numel())
            sparse[idx] = resid.reshape(-1)[idx]
            approx = approx + sparse.reshape(w.shape)
        stored += 2 * keep  # value + index
    return approx, stored


# ------------------------------------------------------------------ the command
def _check_settings(E: int, k: int, rank, sparsity, layout: str) -> None:
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= E:
        raise MergeLabError(f"--experts must be an integer from 1 to the MoE's num_local_experts ({E}), got {k}")
    if layout not in LAYOUTS:
        raise MergeLabError(f"--layout must be one of {', '.join(LAYOUTS)}, got '{layout}'")
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise MergeLabError(f"--rank must be an integer >= 1, got {rank}")
    if sparsity is not None and not 0.0 <= sparsity <= 1.0:
        raise MergeLabError(f"--sparsity must be a fraction in [0, 1], got {sparsity}")


def compress_moe(moe: Path, out: Path, experts: int, texts: Sequence[str], *, layout: str = "reduced",
                 rank: Optional[int] = None, sparsity: Optional[float] = None, align: bool = True,
                 overwrite: bool = False, shard_size: str = "5GB", calibration_source: Optional[dict] = None,
                 log: Callable = lambda m: None) -> CompressResult:
    """MC-SMoE on the Mixtral folder ``moe``: ``experts`` groups per layer, written to ``out`` (module doc).

    Everything is checked before ``OUT.partial`` is created; a failure removes it (nothing half-written).
    """
    started = time.perf_counter()
    moe, out = Path(moe), Path(out)
    cfg = _moe_config(moe)
    E, L = cfg["num_local_experts"], cfg["num_hidden_layers"]
    _check_settings(E, experts, rank, sparsity, layout)
    if not texts:
        raise MergeLabError("--calibration: no calibration texts (MC-SMoE needs routing statistics)")
    ck = Checkpoint.open(str(moe), "MOE")
    _check_tensors(ck, cfg)
    if out.exists() and not overwrite:
        raise MergeLabError(f"output '{out}' already exists; pass --overwrite to replace it")
    stats = routing_statistics(moe, texts, log=log)
    K = experts
    groups = [group_experts(stats.frequency(l), stats.similarity(l), K) for l in range(L)]
    slots = K if layout == "reduced" else E

    entries = []
    for name, info in ck.tensors.items():
        if ".mlp.experts." in name or name.endswith(".mlp.gate.weight"):
            shape = list(info.shape)
            shape[0] = slots
            entries.append((name, info.dtype, tuple(shape)))
        else:
            entries.append((name, info.dtype, tuple(info.shape)))
    shards = layout_shards(entries, parse_size(shard_size))
    partial, _ = prepare_output(out, [moe], overwrite, resume=False)
    writer = None
    layers_report = []
    stored_numbers = dense_numbers = 0
    try:
        writer = ShardWriter(partial, shards, fingerprint=f"moe-compress:{time.time_ns()}")
        expert_layer = {}
        for l in range(L):
            for n in _expert_names(l):
                expert_layer[n] = l
        done = set()
        for name, dtype, _ in entries:
            if name not in expert_layer:
                writer.write(name, ck.read(name))
                continue
            l = expert_layer[name]
            if l in done:
                continue
            done.add(l)
            gu_name, dn_name, gate_name = _expert_names(l)
            gate_up, down, router = ck.read(gu_name), ck.read(dn_name), ck.read(gate_name)
            freq = stats.frequency(l)
            merged = []
            for members in groups[l]:
                gu, dn = merge_group(gate_up, down, members, freq, align)
                if rank is not None or sparsity is not None:
                    parts = []
                    for w in (gu[:gu.shape[0] // 2], gu[gu.shape[0] // 2:], dn):
                        w_hat, n_stored = low_rank_sparse(w, rank, sparsity)
                        parts.append(w_hat)
                        stored_numbers += n_stored
                        dense_numbers += w.numel()
                    gu, dn = torch.cat(parts[:2]), parts[2]
                merged.append((gu, dn))
            if layout == "reduced":
                new_gu = torch.stack([m[0] for m in merged])
                new_dn = torch.stack([m[1] for m in merged])
                new_router = router[[g[0] for g in groups[l]]]
            else:
                slot = {e: gi for gi, g in enumerate(groups[l]) for e in g}
                new_gu = torch.stack([merged[slot[e]][0] for e in range(E)])
                new_dn = torch.stack([merged[slot[e]][1] for e in range(E)])
                new_router = router
            writer.write(gu_name, new_gu.to(ck.tensors[gu_name].dtype).contiguous())
            writer.write(dn_name, new_dn.to(ck.tensors[dn_name].dtype).contiguous())
            writer.write(gate_name, new_router.contiguous())
            layers_report.append({
                "layer": l, "frequency": [round(float(x), 6) for x in freq],
                "groups": groups[l],
                "similarity": [[round(float(x), 6) for x in row] for row in stats.similarity(l)],
            })
            log(f"layer {l}: groups {groups[l]}")
        writer.finish()
        writer.forget_progress()
        new_cfg = dict(cfg)
        if layout == "reduced":
            new_cfg["num_local_experts"] = K
            new_cfg["num_experts_per_tok"] = min(int(cfg.get("num_experts_per_tok", 2)), K)
        (partial / "config.json").write_text(json.dumps(new_cfg, indent=2, sort_keys=True) + "\n")
        copy_donor_files(moe, partial)
        report = {
            "method": "MC-SMoE (Li et al., ICLR 2024): frequency-weighted merge of router-logit-similar groups",
            "moe": str(moe), "experts_in": E, "experts_out": K,
            "slots": slots, "layout": layout, "aligned": align, "rank": rank, "sparsity": sparsity,
            "calibration": calibration_source or {"texts": len(texts)}, "calibration_tokens": stats.tokens,
            "expert_parameters_in": sum(ck.tensors[n].numel for l in range(L) for n in _expert_names(l)[:2]),
            "layers": layers_report,
        }
        if rank is not None or sparsity is not None:
            report["compressed_fraction_of_merged_experts"] = stored_numbers / max(1, dense_numbers)
        (partial / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")
        write_manifest(partial, {"command": "moe-compress", "moe": str(moe), "experts": K, "layout": layout,
                                 "rank": rank, "sparsity": sparsity, "aligned": align, "versions": versions(),
                                 "seconds": time.perf_counter() - started})
        publish(partial, out, overwrite)
    except BaseException:
        if writer is not None:
            writer.close()
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return CompressResult(out, E, K, time.perf_counter() - started, report)
