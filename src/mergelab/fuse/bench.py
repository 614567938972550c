"""``mergelab fuse bench``: FuseLLM and FuseChat on the causal-LM suite, before/after accuracy per task.

Rows (each scored on the test splits of the tasks: greedy exact match, and the mean negative
log-likelihood per answer token, answer + EOS, in the model's own tokenization):

* ``target``: the target (pivot) model as it is;
* one row per source;
* ``clm``: the target fine-tuned on the tasks with the causal-LM loss alone (lambda = 1), the same steps
  and data: what fusion must beat to have added anything;
* ``fusellm``: the target trained on the fusion of all sources (FuseLLM);
* ``pair:<source>``: the target trained on the fusion of that source alone (FuseChat's pairwise fusion);
* ``fusechat-varm`` / ``fusechat-sce``: the pairwise targets merged with VaRM / SCE, the target as pivot.

Every training run is a resumable :mod:`mergelab.llmmix.finetune` run under ``OUT/runs``; a finished
one is reused when the command is repeated.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

from mergelab.fuse.train import FuseError, FuseSettings, chat_merge, fuse_train


def answer_nll(model, tok, task, split: str = "test", limit: Optional[int] = None, batch_size: int = 64) -> float:
    """Mean negative log-likelihood per answer token (answer + EOS) of ``task``'s ``split``."""
    import torch

    from mergelab.llmmix.tasks import collate_for_training, encode_for_training

    exs = task.split(split)[:limit] if limit else task.split(split)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    total, n = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(exs), batch_size):
            b = collate_for_training([encode_for_training(tok, e, None) for e in exs[i:i + batch_size]], pad)
            logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1].float()
            labels = b["labels"][:, 1:]
            nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                                    ignore_index=-100, reduction="sum")
            total += nll.item()
            n += int((labels != -100).sum())
    return total / max(1, n)


def score(folder: Path, tasks: Sequence, limit: Optional[int]) -> dict:
    from mergelab.llmmix.generate import evaluate_task, load_causal_lm

    model, tok = load_causal_lm(folder)
    out = {}
    for t in tasks:
        ev = evaluate_task(model, tok, t, "test", limit=limit, batch_size=64)
        out[t.name] = {"accuracy": ev.accuracy, "n": ev.n, "answer_nll": answer_nll(model, tok, t, limit=limit)}
    return out


def run_bench(out: Path, target: Path, sources: Sequence[Path], task_names: Sequence[str], cfg,
              settings: FuseSettings, replay: Optional[Path], test_limit: Optional[int] = None,
              command: str = "", log: Callable[[str], None] = print) -> dict:
    from mergelab.llmmix.finetune import finetune
    from mergelab.llmmix.tasks import build_task

    if len(sources) < 2:
        raise FuseError("fuse bench needs at least two sources (FuseChat merges one fused target per source)")
    out = Path(out)
    tasks = [build_task(n, seed=0) for n in task_names]
    runs = out / "runs"
    t0 = time.time()
    models = {"target": Path(target)}
    for s in sources:
        models[f"source:{Path(s).parent.name}"] = Path(s)
    log("clm: the target fine-tuned with the CLM loss alone")
    models["clm"] = finetune(target, tasks, runs / "clm", cfg, log=log, progress=False, replay=replay,
                             command=command).final_dir
    log("fusellm: the target trained on the fusion of all sources")
    models["fusellm"] = fuse_train(target, sources, tasks, runs / "fusellm", cfg, settings, replay=replay,
                                   command=command, log=log).final_dir
    pairs = []
    for s in sources:
        name = Path(s).parent.name
        log(f"pair:{name}: the target trained on the fusion of {s} alone")
        pairs.append(fuse_train(target, [s], tasks, runs / f"pair-{name}", cfg, settings, replay=replay,
                                command=command, log=log).final_dir)
        models[f"pair:{name}"] = pairs[-1]
    for method in ("varm", "sce"):
        dest = out / "merged" / f"fusechat-{method}"
        chat_merge(target, pairs, dest, method=method, overwrite=True)
        models[f"fusechat-{method}"] = dest
    rows = []
    for name, folder in models.items():
        log(f"scoring {name} ({folder})")
        rows.append({"name": name, "model": str(folder), "tasks": score(folder, tasks, test_limit)})
    report = {"command": command, "target": str(target), "sources": [str(s) for s in sources],
              "tasks": list(task_names), "settings": {**cfg.settings(), **{f"fuse_{k}": v for k, v in
                                                                          vars(settings).items()}},
              "test_limit": test_limit, "seconds": round(time.time() - t0, 1), "rows": rows}
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    (out / "report.md").write_text(markdown(report), encoding="utf-8")
    plot(report, out / "fuse.png")
    return report


def markdown(report: dict) -> str:
    tasks = report["tasks"]
    head = "| model | " + " | ".join(f"{t} acc | {t} NLL/token" for t in tasks) + " | mean acc |"
    lines = [head, "|" + "---|" * (2 * len(tasks) + 2)]
    for r in report["rows"]:
        accs = [r["tasks"][t]["accuracy"] for t in tasks]
        cells = " | ".join(f"{100 * r['tasks'][t]['accuracy']:.1f}% | {r['tasks'][t]['answer_nll']:.3f}" for t in tasks)
        lines.append(f"| {r['name']} | {cells} | {100 * sum(accs) / len(accs):.1f}% |")
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks, rows = report["tasks"], report["rows"]
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(rows)), 3.6))
    w = 0.8 / len(tasks)
    for k, t in enumerate(tasks):
        ax.bar([i + k * w for i in range(len(rows))], [100 * r["tasks"][t]["accuracy"] for r in rows], w, label=t)
    ax.set_xticks([i + w * (len(tasks) - 1) / 2 for i in range(len(rows))])
    ax.set_xticklabels([r["name"] for r in rows], rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("FuseLLM / FuseChat on llmmix (greedy exact match)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
