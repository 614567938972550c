#!/usr/bin/env python
"""Accuracy against experts kept for MC-SMoE (``mergelab moe-compress``) on a small MoE built here.

1. ``mergelab moe`` builds a Mixtral (top-1, ``fitted`` routers from each expert's validation prompts)
   from the llmmix suite's trained experts (``bench prepare --suite llmmix --size SIZE``: base
   ``base-SIZE/final`` and ``experts-SIZE/<task>/final``).
2. Calibration: ``--calibration-examples`` rendered prompt + answer texts of each task's **train** split.
3. ``mergelab moe-compress --experts K`` (in-process: :func:`mergelab.moe.mcsmoe.compress_moe`) for
   K = E-1 .. 1: the default (``reduced`` layout, aligned), ``--no-align`` (ablation), ``--layout shared``
   (the paper's M-SMoE: router and E slots kept) and ``low-rank+sparse`` (the merge followed by the
   compression step, ``--rank R --sparsity S``, one variant per pair of ``--lrs``; also at K = E, the
   compression alone); ``--variants`` picks among them.
4. On the first ``--test-limit`` test examples of every task, for the dense experts (each on its own
   task), the MoE and every compressed model: greedy exact match (the suite's metric) and, teacher-forced,
   the answer tokens' accuracy (argmax right, EOS included) and mean NLL, which still move where exact
   match is near 0. The chart plots the answer-token accuracy.

With ``--train-steps N`` the MoE that MC-SMoE compresses is **trained here**: step 1's MoE built top-2
(with top-1 routing the router's renormalised weight is always 1 and gets no gradient), then trained as one
model for N AdamW steps on the mixture of the tasks' training examples (routers, experts, attention and
embeddings; :func:`mergelab.llmmix.finetune.finetune`, the experts' loss on the answer tokens, no replay);
the rows then show the built top-2 MoE, the trained MoE and MC-SMoE of the trained one.

Every row also gives its size and cost against one dense model (the base, whose architecture every expert
shares): parameters and float32 bytes beyond it (``extra_params``, ``extra_bytes``) and the Linear
multiply-adds per token against it (``linear_macs_vs_one_model``: attention, the ``top-k`` experts' MLPs, the
router and the LM head, from the config), counted by :func:`cost`.

Writes ``results.json`` and ``table.md`` to ``--workdir`` and the chart to ``--png``. Example (about
4 minutes on 2 busy cores)::

    PYTHONPATH=src .venv/bin/python benchmarks/bench_mcsmoe.py --png docs/img/mcsmoe.png
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import time
from pathlib import Path

TASKS = "string_ops,list_ops,translate_dates,language_id"
# (label, folder name, compress_moe options)
VARIANTS = [("MC-SMoE", "mcsmoe", {}), ("no alignment", "noalign", {"align": False}),
            ("shared (paper M-SMoE)", "shared", {"layout": "shared"}),
            ("low-rank+sparse", "lrs", {"rank": None, "sparsity": None})]  # --rank / --sparsity fill these


def _params(folder: Path) -> int:
    """Number of stored tensor elements of the checkpoint in ``folder`` (headers only read)."""
    from mergelab.io.checkpoint import Checkpoint

    return sum(info.numel for info in Checkpoint.open(str(folder)).tensors.values())


def linear_macs(config: dict) -> int:
    """Linear multiply-adds per token of a Llama or Mixtral config: q/k/v/o, the MLP of each of the
    ``num_experts_per_tok`` experts a token runs (one for a dense model), the router and the LM head."""
    H, L, V = config["hidden_size"], config["num_hidden_layers"], config["vocab_size"]
    I = config["intermediate_size"]
    heads, kv = config["num_attention_heads"], config.get("num_key_value_heads") or config["num_attention_heads"]
    hd = config.get("head_dim") or H // heads
    attn = H * heads * hd * 2 + H * kv * hd * 2
    E = config.get("num_local_experts", 0)
    k = config.get("num_experts_per_tok", 1) if E else 1
    return L * (attn + k * 3 * H * I + E * H) + V * H


def cost(folder: Path, dense: Path) -> dict:
    """Size and per-token cost of the model in ``folder`` against the dense model ``dense`` (float32)."""
    cfg, dcfg = (json.loads((Path(f) / "config.json").read_text()) for f in (folder, dense))
    p, d = _params(folder), _params(dense)
    return {"params": p, "extra_params": p - d, "extra_bytes": 4 * (p - d), "vs_one_model": round(p / d, 3),
            "linear_macs_vs_one_model": round(linear_macs(cfg) / linear_macs(dcfg), 3)}


def cli(*args) -> None:
    cmd = [sys.executable, "-m", "mergelab", *map(str, args)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{r.stderr[-3000:]}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", type=Path, default=Path.home() / ".cache/mergelab/llmmix")
    ap.add_argument("--size", default="1m")
    ap.add_argument("--tasks", default=TASKS)
    ap.add_argument("--workdir", type=Path, default=Path("bench-out/mcsmoe"))
    ap.add_argument("--png", type=Path, default=None)
    ap.add_argument("--prompts", type=int, default=48, help="validation prompts per expert for the routers")
    ap.add_argument("--calibration-examples", type=int, default=64, help="train texts per task")
    ap.add_argument("--test-limit", type=int, default=100)
    ap.add_argument("--variants", default=",".join(v[0] for v in VARIANTS),
                    help="comma-separated labels of the compressed variants to run")
    ap.add_argument("--lrs", default="32:0.05",
                    help="low-rank+sparse variant: comma-separated RANK:SPARSITY pairs (rank of each merged matrix, "
                         "share of the residual's largest entries kept), one variant each")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--rebuild", action="store_true", help="rebuild the MoE even if WORKDIR/moe exists")
    ap.add_argument("--train-steps", type=int, default=0,
                    help="compress an MoE trained here: the built MoE, top-2, trained N steps on the tasks' mixture")
    ap.add_argument("--train-lr", type=float, default=2e-3)
    ap.add_argument("--train-batch", type=int, default=16)
    ap.add_argument("--replot", action="store_true", help="only redraw --png from WORKDIR/results.json")
    args = ap.parse_args()
    if args.replot:
        res = json.loads((args.workdir / "results.json").read_text())
        labels = sorted(dict.fromkeys(r["model"] for r in res["rows"] if "groups" in r), key=lambda m: "+" in m)
        plot(res["rows"], labels, len(res["tasks"]), res["size"], args.png)
        return

    import torch
    import yaml

    from mergelab.calibrate.data import file_texts
    from mergelab.llmmix.generate import evaluate_tasks, load_causal_lm
    from mergelab.moe.mcsmoe import compress_moe
    from mergelab.llmmix.tasks import build_task
    from mergelab.llmmix.tasks.format import encode_for_training, render_answer, render_prompt

    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)
    names = args.tasks.split(",")
    tasks = [build_task(n, seed=0) for n in names]
    base = args.root / f"base-{args.size}" / "final"
    experts = [args.root / f"experts-{args.size}" / n / "final" for n in names]
    for n, e in zip(names, experts):
        rec = json.loads((e.parent / "finetune.json").read_text())
        t = next(t for t in tasks if t.name == n)
        if rec["settings"]["tasks"][n] != t.fingerprint():
            raise SystemExit(f"{e}: trained on other data for '{n}' than build_task(seed=0) gives")
    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    started = time.time()

    cfg = {"base_model": str(base), "gate_mode": "fitted", "dtype": "float32", "experts_per_token": 1,
           "experts": [{"source_model": str(e), "positive_prompts": [x.prompt for x in t.split("validation")][:args.prompts]}
                       for e, t in zip(experts, tasks)]}
    (work / "moe.yml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    if not (work / "moe" / "config.json").is_file() or args.rebuild:
        cli("moe", work / "moe.yml", "-o", work / "moe", "--overwrite", "-q")
    rng = random.Random(0)
    with (work / "calibration.jsonl").open("w") as f:
        for t in tasks:
            train = t.split("train")
            for i in sorted(rng.sample(range(len(train)), args.calibration_examples)):
                f.write(json.dumps({"text": render_prompt(train[i].prompt) + render_answer(train[i].answer)}) + "\n")

    def answer_tokens(model, tok, task) -> tuple:
        """Teacher-forced answer tokens (EOS included): share predicted right (argmax) and mean NLL."""
        hits = total = 0
        nll = 0.0
        for ex in task.split("test")[:args.test_limit]:
            enc = encode_for_training(tok, ex)
            ids, labels = torch.tensor([enc["input_ids"]]), torch.tensor(enc["labels"][1:])
            with torch.no_grad():
                logits = model(ids).logits[0, :-1]
            keep = labels != -100
            hits += int((logits[keep].argmax(-1) == labels[keep]).sum())
            nll += float(torch.nn.functional.cross_entropy(logits[keep], labels[keep], reduction="sum"))
            total += int(keep.sum())
        return hits / total, nll / total

    def score(folder, only=None) -> dict:
        model, tok = load_causal_lm(folder)
        out = {}
        for t in tasks:
            if only and t.name != only:
                continue
            out[t.name] = evaluate_tasks(model, tok, [t], split="test", limit=args.test_limit,
                                         batch_size=50)[t.name].accuracy
            out[f"{t.name}:token_acc"], out[f"{t.name}:nll"] = answer_tokens(model, tok, t)
        return out

    rows = []
    dense = {}
    for n, e in zip(names, experts):
        dense.update(score(e, only=n))
    one = cost(experts[0], base)  # every expert has the base's shapes; keeping all of them is E models
    n_all = len(experts) * (one["params"] - one["extra_params"])
    kept = {"params": n_all, "extra_params": n_all - n_all // len(experts),
            "extra_bytes": 4 * (n_all - n_all // len(experts)), "vs_one_model": float(len(experts)),
            "linear_macs_vs_one_model": 1.0}
    rows.append({"model": "dense experts (each on its task)", "experts": None, **kept, **dense})
    print(rows[-1], flush=True)
    source = work / "moe"
    if args.train_steps:
        from mergelab.llmmix.finetune import FinetuneConfig, finetune

        top2 = dict(cfg, experts_per_token=2)
        (work / "moe-top2.yml").write_text(yaml.safe_dump(top2, sort_keys=False))
        if not (work / "moe-top2" / "config.json").is_file() or args.rebuild:
            cli("moe", work / "moe-top2.yml", "-o", work / "moe-top2", "--overwrite", "-q")
        rows.append({"model": f"MoE ({len(names)} experts, top-2, built)", "experts": len(names),
                     **cost(work / "moe-top2", base), **score(work / "moe-top2")})
        print(rows[-1], flush=True)
        run = finetune(work / "moe-top2", tasks, work / "moe-trained", FinetuneConfig(
            steps=args.train_steps, lr=args.train_lr, batch_size=args.train_batch, replay_batch=0, eval_limit=20,
            threads=args.threads), fresh=args.rebuild, progress=False, log=lambda m: print(m, flush=True))
        source = run.final_dir
        trained_label = f"MoE trained here ({len(names)} experts, top-2, {args.train_steps} steps)"
        rows.append({"model": trained_label, "experts": len(names), "train_seconds": run.seconds, "source": True,
                     **cost(source, base), **score(source)})
    else:
        rows.append({"model": f"MoE ({len(names)} experts, top-1)", "experts": len(names), "source": True,
                     **cost(source, base), **score(source)})
    print(rows[-1], flush=True)
    E = len(names)
    wanted = args.variants.split(",")
    unknown = [v for v in wanted if v not in [x[0] for x in VARIANTS]]
    if unknown:
        raise SystemExit(f"--variants: unknown {unknown}; known: {[x[0] for x in VARIANTS]}")
    variants = []
    for label, name, options in VARIANTS:
        if label not in wanted:
            continue
        if name != "lrs":
            variants.append((label, name, options))
            continue
        for pair in args.lrs.split(","):
            r, _, sp = pair.partition(":")
            variants.append((f"MC-SMoE + rank {int(r)} + sparse {float(sp):g}", f"lrs-r{int(r)}-s{float(sp):g}",
                             {"rank": int(r), "sparsity": float(sp)}))
    cal = file_texts(work / "calibration.jsonl", n=None)
    for k in range(E, 0, -1):
        for label, name, options in variants:
            if k == E and not name.startswith("lrs"):  # E groups of one: only the compression changes the MoE
                continue
            out = work / f"k{k}-{name}"
            report = compress_moe(source, out, k, cal.texts, overwrite=True, calibration_source=cal.source,
                                  **options)
            groups = [lay["groups"] for lay in report.report["layers"]]
            extra = {"compressed_fraction": report.report["compressed_fraction_of_merged_experts"]} \
                if "compressed_fraction_of_merged_experts" in report.report else {}
            rows.append({"model": label, "experts": k, "groups": groups, **extra, **cost(out, base), **score(out)})
            print(rows[-1], flush=True)
    for r in rows:
        r["mean"] = sum(r[n] for n in names) / len(names)
        r["mean_token_acc"] = sum(r[f"{n}:token_acc"] for n in names) / len(names)
        r["mean_nll"] = sum(r[f"{n}:nll"] for n in names) / len(names)
    res = {"tasks": names, "size": args.size, "test_limit": args.test_limit, "rows": rows,
           "lrs": args.lrs, "train_steps": args.train_steps,
           "seconds": round(time.time() - started, 1), "command": " ".join(sys.argv)}
    (work / "results.json").write_text(json.dumps(res, indent=2))
    head = ("| model | experts kept | " + " | ".join(names) + " | mean exact match | mean answer-token accuracy "
            "| mean answer NLL | extra params | extra MiB (float32) | total / one model | linear MACs / one model |\n")
    head += "|---" * (len(names) + 9) + "|\n"
    body = "".join(f"| {r['model']} | {r['experts'] or '-'} | "
                   + " | ".join(f"{r[n]:.2f} / {r[n + ':token_acc']:.2f}" for n in names)
                   + f" | {r['mean']:.3f} | {r['mean_token_acc']:.3f} | {r['mean_nll']:.2f} | {r['extra_params']:,} "
                   f"| {r['extra_bytes'] / 2**20:.2f} | {r['vs_one_model']:.2f} "
                   f"| {r['linear_macs_vs_one_model']:.2f} |\n"
                   for r in rows)
    (work / "table.md").write_text(head + body)
    print(head + body)
    if args.png:
        plot(rows, sorted([v[0] for v in variants], key=lambda m: "+" in m), E, args.size, args.png)


def plot(rows, labels, E: int, size: str, png: Path) -> None:
    """Mean answer-token accuracy against experts kept, one line per variant (the MoE at K = E where the
    variant has no row of its own); a variant equal to one drawn before it is dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    src = next((r for r in rows if r.get("source")), rows[1])  # the compressed MoE (older results: row 1)
    drawn = []
    for label in labels:
        pts = [(r["experts"], r["mean_token_acc"]) for r in rows if r["model"] == label]
        if all(p[0] != E for p in pts):
            pts.append((E, src["mean_token_acc"]))
        pts.sort()
        same = next((lab for lab, q in drawn if q == pts), None)
        drawn.append((label, pts))
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ls="--" if same else "-",
                label=label + (f" (= {same})" if same else ""))
    ax.axhline(rows[0]["mean_token_acc"], color="grey", ls=":", label="dense experts (each on its task)")
    ax.set_xlabel("experts kept per layer")
    ax.set_ylabel(f"answer-token accuracy, mean of {E} tasks")
    ax.set_xticks(range(1, E + 1))
    ax.set_ylim(0, 1)
    what = f"a {E}-expert MoE trained here" if "trained" in src["model"] else f"a {E}-expert Mixtral"
    ax.set_title(f"MC-SMoE on {what} (llmmix {size})")
    ax.legend(loc="center left", bbox_to_anchor=(1.02, 0.5), fontsize=8)
    fig.tight_layout()
    Path(png).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=100)


if __name__ == "__main__":
    main()
