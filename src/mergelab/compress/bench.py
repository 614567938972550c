"""``mergelab bench compress``: size against accuracy for SkillPacks, plain low-rank and BitDelta.

For each expert (an llmmix causal LM fine-tuned on one task, or a textmix MiniLM fine-tuned on one
task: :func:`bench_compress_textmix`) and its base: the expert's and the base's test accuracy on the
expert's task, then for each GraftLLM pack size (``LEVELS``) the accuracy of the
rebuilt model (``mergelab graft BASE PACK``), next to the plain low-rank pack (float16 factors) whose
attention + MLP bytes match the GraftLLM pack's, and BitDelta. Embeddings and the other tensors are
stored the same way in every scheme (``embed_density``), so the packs differ only in how the
attention and MLP deltas are stored; bytes are reported for those matrices and in total.

Writes ``compress.json``, ``compress.md`` (a table) and ``compress.png`` (accuracy against matrix bytes,
one column per expert, accuracy above test NLL, at most four experts a row) to ``out``.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, Optional, Sequence, Tuple

from mergelab.errors import MergeLabError

# GraftLLM pack sizes: (label, attention energy kept, MLP rank as a fraction of min(out, in)).
LEVELS: Tuple[Tuple[str, float, float], ...] = (("graft-s", 0.5, 0.0625), ("graft-m", 0.8, 0.125),
                                                  ("graft-l", 0.95, 0.25), ("graft-xl", 0.99, 0.5))
MATRIX = ("attention", "mlp")
PLOT_COLUMNS = 4


def _matrix_bytes(tensors: dict) -> int:
    return sum(e["bytes"] for e in tensors.values() if e["module"] in MATRIX)


def _mean_error(tensors: dict) -> float:
    errs = [e["rel_error"] for e in tensors.values() if e["module"] in MATRIX and e["kind"] != "zero"]
    return sum(errs) / len(errs) if errs else 0.0


def lowrank_fraction_for(tensors: dict, target: int) -> float:
    """The rank fraction f whose low-rank pack (float16 U, Vh; float32 S) stores ``target`` bytes of
    attention + MLP matrices, to first order: bytes = sum_m round(f * min_m) * (4 + 2 (out_m + in_m))."""
    per_unit = sum(min(e["shape"]) * (4 + 2 * sum(e["shape"])) for e in tensors.values() if e["module"] in MATRIX)
    return min(1.0, max(1e-6, target / per_unit)) if per_unit else 1.0


def bench_compress(base: Path, experts: Dict[str, Path], out: Path, *, limit: int = 50, task_seed: int = 0,
                   embed_density: float = 1.0, levels: Sequence[Tuple[str, float, float]] = LEVELS,
                   device: str = "cpu", command: str = "", log: Callable[[str], None] = print) -> dict:
    """Run the size-against-accuracy study on llmmix experts (see the module docstring); returns the report."""
    from mergelab.llmmix.generate import evaluate_task, load_causal_lm
    from mergelab.llmmix.tasks import build_task

    if not experts:
        raise MergeLabError("bench compress: no experts given")
    tasks = {name: build_task(name, seed=task_seed) for name in experts}

    def score(name: str, folder: Path) -> Tuple[float, float]:
        task = tasks[name]
        model, tok = load_causal_lm(str(folder), device=device)
        acc = evaluate_task(model, tok, task, split="test", limit=limit).accuracy
        return acc, answer_nll(model, tok, task.split("test")[:limit], device)

    report = {"suite": "llmmix", "base": str(base), "limit": limit, "task_seed": task_seed,
              "embed_density": embed_density, "levels": [list(x) for x in levels], "command": command,
              "protocol": "greedy exact match on the first LIMIT test examples of the expert's own task; "
                          "each pack rebuilt on the base with `mergelab graft` (task_arithmetic, weight 1)",
              "metric": "exact match", "nll": "answer NLL", "experts": {}}
    sizes = {name: min(limit, len(t.split("test"))) for name, t in tasks.items()}
    return _study(base, experts, score, sizes, out, report, embed_density, levels, device, log)


def bench_compress_textmix(suite, cache, tasks: Sequence[str], out: Path, *, base: str = "minilm-l6",
                           embed_density: float = 1.0,
                           levels: Sequence[Tuple[str, float, float]] = LEVELS, device: str = "cpu",
                           command: str = "", log: Callable[[str], None] = print) -> dict:
    """The same study on textmix's fully fine-tuned experts (``bench prepare``'s cache): each expert's
    encoder and the base encoder are written as BertModel folders, the pack is made from the two, and
    the rebuilt encoder is scored with the expert's own head on the task's whole test split (accuracy,
    and the mean cross-entropy of the head's logits as the continuous companion)."""
    import torch

    from mergelab.bench.cache import float_state, save_encoder
    from mergelab.evaluate.harness import Evaluator, gold
    from mergelab.evaluate.model import (base_model_path, head_logits, load_config, load_tokenizer, read_state,
                                         split_state)
    from mergelab.evaluate.metrics import accuracy, correct_bits

    if not tasks:
        raise MergeLabError("bench compress: no experts given")
    path = base_model_path(base)
    config, tokenizer = load_config(path), load_tokenizer(path)
    evaluator = Evaluator(suite, config, tokenizer)
    heads = {}
    work = Path(tempfile.mkdtemp(prefix="mergelab-bench-compress-textmix-"))
    try:
        base_dir = work / "base"
        base_dir.mkdir()
        save_encoder(base_dir, config, tokenizer, float_state(split_state(read_state(path))[0]))
        experts = {}
        for t in tasks:
            enc, heads[t], _ = cache.expert(t)
            experts[t] = work / f"expert-{t}"
            experts[t].mkdir()
            save_encoder(experts[t], config, tokenizer, float_state(enc))

        def score(name: str, folder: Path) -> Tuple[float, float]:
            task = suite.task(name)
            enc = evaluator.encoder(float_state(split_state(read_state(folder))[0]))
            with torch.no_grad():
                logits = head_logits(evaluator.features(enc, task, "test"), heads[name])
            labels = gold(task, "test")
            nll = float(torch.nn.functional.cross_entropy(logits.float(), labels.long()))
            return accuracy(correct_bits(logits.argmax(-1), labels)), nll

        report = {"suite": suite.name, "suite_fingerprint": suite.fingerprint(), "base": str(path),
                  "cache": str(cache.dir), "limit": None, "embed_density": embed_density,
                  "levels": [list(x) for x in levels], "command": command,
                  "protocol": "accuracy of the expert's own head on the rebuilt encoder, whole test split of the "
                              "expert's task; each pack rebuilt on the base with `mergelab graft` "
                              "(task_arithmetic, weight 1)",
                  "metric": "accuracy", "nll": "test NLL", "experts": {}}
        sizes = {t: len(suite.task(t).split("test")) for t in tasks}
        return _study(base_dir, experts, score, sizes, out, report, embed_density, levels, device, log)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _study(base: Path, experts: Dict[str, Path], score: Callable[[str, Path], Tuple[float, float]],
           sizes: Dict[str, int], out: Path, report: dict, embed_density: float,
           levels: Sequence[Tuple[str, float, float]], device: str, log: Callable[[str], None]) -> dict:
    """For each expert: its score and the base's, then each GraftLLM level, the low-rank pack at its
    matrix bytes and BitDelta, each rebuilt with ``mergelab graft`` and scored by ``score(name, folder)``
    (``(accuracy, nll)``); the report is written after every expert."""
    from mergelab.compress.graft import graft
    from mergelab.compress.skillpack import PackSettings, compress

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="mergelab-bench-compress-"))
    try:
        for name, expert in experts.items():
            rows = []
            (acc_expert, nll_expert), (acc_base, nll_base) = score(name, expert), score(name, base)
            log(f"{name}: expert {acc_expert:.3f} ({report['nll']} {nll_expert:.3f}), base {acc_base:.3f} "
                f"({nll_base:.3f})")

            def run(label: str, scheme: str, settings: PackSettings, level: Optional[str] = None) -> dict:
                pack = work / f"{name}-{label}"
                res = compress(str(base), str(expert), str(pack), settings, device=device, overwrite=True)
                (work / "last.json").write_text(json.dumps(res.tensors))
                rebuilt = work / f"{name}-{label}-model"
                graft(str(base), [str(pack)], str(rebuilt), device=device, overwrite=True)
                row = {"label": label, "scheme": scheme, "level": level or label, "matrix_bytes": _matrix_bytes(res.tensors),
                       "pack_bytes": res.bytes, "dense_bytes": res.dense_bytes,
                       "mean_matrix_rel_error": round(_mean_error(res.tensors), 6),
                       }
                row["accuracy"], row["answer_nll"] = score(name, rebuilt)
                shutil.rmtree(rebuilt, ignore_errors=True)
                shutil.rmtree(pack, ignore_errors=True)
                log(f"{name}: {label} {row['matrix_bytes']} matrix bytes, error {row['mean_matrix_rel_error']:.3f}, "
                    f"accuracy {row['accuracy']:.3f}, {report['nll']} {row['answer_nll']:.3f}")
                rows.append(row)
                return row

            shapes = {}
            for label, energy, mlp_rank in levels:
                g = run(label, "graft", PackSettings(attn_energy=energy, mlp_rank=mlp_rank, embed_density=embed_density),
                        label)
                if not shapes:  # the graft pack's entries give every matrix's shape and module kind
                    shapes = json.loads((work / "last.json").read_text())
                # the plain low-rank pack at the graft pack's matrix bytes
                f = lowrank_fraction_for(shapes, g["matrix_bytes"])
                run(f"lowrank@{label}", "lowrank", PackSettings(scheme="lowrank", rank=f, embed_density=embed_density),
                    label)
            run("bitdelta", "bitdelta", PackSettings(scheme="bitdelta", embed_density=embed_density))
            report["experts"][name] = {"path": str(expert), "task": name, "accuracy_expert": acc_expert,
                                       "accuracy_base": acc_base, "answer_nll_expert": nll_expert,
                                       "answer_nll_base": nll_base, "n": sizes[name], "rows": rows}
            report["seconds"] = round(time.perf_counter() - started, 1)
            _write(report, out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return report


def answer_nll(model, tokenizer, examples, device: str = "cpu") -> float:
    """Mean over ``examples`` of the per-token negative log-likelihood of the answer (and EOS) given
    the prompt, in the fine-tuning format (:func:`mergelab.llmmix.tasks.format.encode_for_training`):
    a continuous companion to exact match, which small experts rarely reach."""
    import torch

    from mergelab.llmmix.tasks.format import encode_for_training

    losses = []
    with torch.no_grad():
        for ex in examples:
            enc = encode_for_training(tokenizer, ex)
            ids = torch.tensor([enc["input_ids"]], device=device)
            labels = torch.tensor([enc["labels"]], device=device)
            losses.append(float(model(input_ids=ids, labels=labels).loss))
    return sum(losses) / len(losses) if losses else float("nan")


def _write(report: dict, out: Path) -> None:
    (out / "compress.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / "compress.md").write_text(markdown(report))
    plot(report, out / "compress.png")


def markdown(report: dict) -> str:
    examples = f"first {report['limit']}" if report.get("limit") else "all"
    lines = [f"Size against accuracy ({report['suite']}, {examples} test examples of each expert's task; "
             f"embedding density {report['embed_density']}).", "",
             f"| expert | pack | scheme | attn+MLP bytes | pack bytes | mean rel. error | accuracy | "
             f"{report.get('nll', 'answer NLL')} |",
             "|---|---|---|---:|---:|---:|---:|---:|"]
    for name, e in report["experts"].items():
        lines.append(f"| {name} | fine-tuned expert | - | - | - | 0 | {e['accuracy_expert']:.3f} | "
                     f"{e['answer_nll_expert']:.3f} |")
        lines.append(f"| {name} | base | - | 0 | 0 | 1 | {e['accuracy_base']:.3f} | {e['answer_nll_base']:.3f} |")
        for r in e["rows"]:
            lines.append(f"| {name} | {r['label']} | {r['scheme']} | {r['matrix_bytes']:,} | {r['pack_bytes']:,} | "
                         f"{r['mean_matrix_rel_error']:.3f} | {r['accuracy']:.3f} | {r['answer_nll']:.3f} |")
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(report["experts"])
    cols = min(len(names), PLOT_COLUMNS)  # experts side by side; more wrap to further pairs of rows
    blocks = -(-len(names) // cols)
    fig, axes = plt.subplots(2 * blocks, cols, figsize=(4.2 * cols, 3.2 * 2 * blocks), squeeze=False)
    for i in range(len(names), blocks * cols):
        block, col = divmod(i, cols)
        axes[2 * block][col].set_visible(False)
        axes[2 * block + 1][col].set_visible(False)
    for i, name in enumerate(names):
        e = report["experts"][name]
        block, col = divmod(i, cols)
        for row, (key, ylabel) in enumerate((("accuracy", f"test {report.get('metric', 'exact match')}"),
                                              ("answer_nll", f"{report.get('nll', 'answer NLL')} (lower is better)"))):
            ax = axes[2 * block + row][col]
            for scheme, style in (("graft", "o-"), ("lowrank", "s--"), ("bitdelta", "D")):
                rows = sorted((r for r in e["rows"] if r["scheme"] == scheme), key=lambda r: r["matrix_bytes"])
                if rows:
                    ax.plot([r["matrix_bytes"] / 1e3 for r in rows], [r[key] for r in rows], style,
                            label={"graft": "GraftLLM pack", "lowrank": "low-rank, same bytes",
                                   "bitdelta": "BitDelta"}[scheme])
            ax.axhline(e[f"{key}_expert"], color="k", lw=0.8, ls=":", label="expert")
            ax.axhline(e[f"{key}_base"], color="grey", lw=0.8, ls="-.", label="base")
            ax.set_xscale("log")
            ax.set_title(name if row == 0 else "")
            ax.set_xlabel("attention + MLP bytes (KB)")
            ax.set_ylabel(ylabel)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
