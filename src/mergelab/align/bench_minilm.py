"""Different-bases benchmark, MiniLM part: two encoders fine-tuned on one textmix task from two
different starting points (issue 18, item 3).

* **A** is the textmix cache's expert for the task: the pretrained MiniLM-L6 fine-tuned on it
  (``mergelab bench prepare``; 3 epochs).
* **B** starts from the pretrained MiniLM-L6 with its top ``reinit_layers`` encoder layers
  re-initialised (BERT's initialisation: weights normal(0, 0.02), biases 0, LayerNorm 1 and 0; seeded).
  That is what a user meets when a checkpoint's top layers were re-initialised before fine-tuning
  (a common recipe for small data). B is then fine-tuned on ``train_examples`` training examples of
  the same task for ``epochs`` epochs with the textmix trainer (``mergelab.bench.training.train``).
  B's lower layers still descend from the same pretrained weights as A's; its top layers do not.

Rows: each model alone, the ensemble (averaged logits), plain averaging, weight matching + averaging,
activation matching + averaging, and PLeaS for BERT (:mod:`mergelab.align.pleas_bert`) at the given
FFN widths. The classifier heads (shared labels) are averaged. Accuracy on the task's test split.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path
from typing import Dict, Sequence

import torch

from mergelab.align.spec import apply_permutations


def _reinit(state: dict, config, layers: Sequence[int], seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    out = dict(state)
    for k, v in state.items():
        if not any(k.startswith(f"encoder.layer.{i}.") for i in layers):
            continue
        if "LayerNorm" in k:
            out[k] = torch.ones_like(v) if k.endswith("weight") else torch.zeros_like(v)
        elif k.endswith("bias"):
            out[k] = torch.zeros_like(v)
        else:
            out[k] = torch.randn(v.shape, generator=g) * config.initializer_range
    return out


def _accuracy(config: dict, state: dict, texts, labels, tokenizer) -> tuple:
    """``(accuracy, logits)`` of a BertForSequenceClassification state on ``texts``, through the
    evaluation harness's encoder and head (:mod:`mergelab.evaluate.model`)."""
    from transformers import BertConfig

    from mergelab.evaluate.model import build_encoder, head_logits, pooled_features, split_state

    encoder, head = split_state(state)
    logits = head_logits(pooled_features(build_encoder(BertConfig(**config), encoder), tokenizer, texts), head)
    return float((logits.argmax(1) == torch.tensor(labels)).float().mean()), logits


def run_minilm(out: Path, cache: Path, task: str = "sentiment", reinit_layers: int = 2, train_examples: int = 800,
               epochs: float = 2.0, calibration_texts: int = 150, widths=(1.0, 1.5), seed: int = 1, log=print) -> dict:
    """Build B, run every merge, write ``minilm.json`` and ``minilm.md`` into ``out``; see the module doc."""
    from safetensors.torch import load_file
    from transformers import AutoTokenizer, BertConfig

    from mergelab.align.api import align
    from mergelab.align.pleas_bert import pleas_bert
    from mergelab.bench.cache import save_classifier
    from mergelab.bench.training import TrainConfig, train
    from mergelab.evaluate.model import base_model_path, read_state
    from mergelab.evaluate.tasks import load_suite

    t0, cpu0 = time.time(), time.process_time()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    a_dir = Path(cache) / "experts" / task
    t = next(x for x in load_suite("textmix").tasks if x.name == task)
    tok = AutoTokenizer.from_pretrained(str(a_dir))
    train_rows = t.split("train")
    rng = random.Random(seed)
    sub = rng.sample(train_rows, min(train_examples, len(train_rows)))
    test = t.split("test")
    texts, labels = [e.text for e in test], [e.label for e in test]

    b_dir = out / f"{task}-reinit{reinit_layers}"
    if not (b_dir / "model.safetensors").is_file():
        base = base_model_path("minilm-l6")
        config = BertConfig.from_pretrained(str(base))
        n = config.num_hidden_layers
        start = _reinit(read_state(base), config, range(n - reinit_layers, n), seed)
        enc, heads, info = train(config, start, tok, [([e.text for e in sub], [e.label for e in sub], t.num_labels)],
                                 TrainConfig(epochs=epochs, seed=seed))
        b_dir.mkdir(parents=True, exist_ok=True)
        save_classifier(b_dir, config, tok, enc, heads[0], t.labels)
        (b_dir / "training.json").write_text(json.dumps({"reinit_layers": reinit_layers, "train_examples": len(sub),
                                                         "epochs": epochs, "seed": seed, **info}, indent=2) + "\n")
        log(f"B trained: {info}")
    calib = out / "calibration.txt"
    calib.write_text("\n".join(e.text.replace("\n", " ") for e in rng.sample(train_rows, calibration_texts)) + "\n")

    cfg = json.loads((a_dir / "config.json").read_text())
    sa, sb = load_file(str(a_dir / "model.safetensors")), load_file(str(b_dir / "model.safetensors"))
    avg = lambda x, y: {k: (x[k] + y[k]) / 2 if x[k].is_floating_point() else x[k] for k in x}  # noqa: E731
    rows: Dict[str, float] = {}
    rows["model A"], la = _accuracy(cfg, sa, texts, labels, tok)
    rows["model B"], lb = _accuracy(cfg, sb, texts, labels, tok)
    rows["ensemble"] = float((((la + lb) / 2).argmax(1) == torch.tensor(labels)).float().mean())
    rows["average"] = _accuracy(cfg, avg(sa, sb), texts, labels, tok)[0]
    for method in ("weight", "activation"):
        r = align(a_dir, b_dir, None, method=method, calibration=calib if method == "activation" else None,
                  write=False)
        rows[f"{method} matching + average"] = _accuracy(cfg, avg(sa, apply_permutations(sb, r.spec, r.perms)),
                                                         texts, labels, tok)[0]
        log(f"{method} matching: squared distance {r.distance_before:.4g} -> {r.distance_after:.4g}")
    for w in widths:
        r = pleas_bert(a_dir, b_dir, calib, width=float(w))
        rows[f"PLeaS w={w:g} (intermediate {r.width})"] = _accuracy(r.config, r.state, texts, labels, tok)[0]
        log(f"PLeaS w={w:g}: {rows[f'PLeaS w={w:g} (intermediate {r.width})']:.3f} ({r.tokens} calibration tokens)")
    report = {"task": task, "test_examples": len(texts), "reinit_layers": reinit_layers,
              "train_examples": len(sub), "epochs": epochs, "calibration_texts": calibration_texts,
              "seconds": round(time.time() - t0, 1), "cpu_seconds": round(time.process_time() - cpu0, 1),
              "results": rows}
    (out / "minilm.json").write_text(json.dumps(report, indent=2) + "\n")
    md = [f"| row | {task}: A from MiniLM, B from MiniLM with top {reinit_layers} layers re-initialised |", "|---|---|"]
    md += [f"| {k} | {v:.3f} |" for k, v in rows.items()]
    (out / "minilm.md").write_text("\n".join(md) + "\n")
    plot(report, out / "minilm_accuracy_vs_width.png")
    return report


def plot(report: dict, path: Path) -> None:
    """Test accuracy against the FFN width (x intermediate_size): PLeaS, the averages at 1.0, the ensemble at 2.0."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    res = report["results"]
    fig, ax = plt.subplots(figsize=(5, 3.6))
    pts = sorted((float(k.split("w=")[1].split()[0]), v) for k, v in res.items() if k.startswith("PLeaS w="))
    ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label="PLeaS")
    for r, marker in (("average", "x"), ("weight matching + average", "^"), ("activation matching + average", "v")):
        ax.plot([1.0], [res[r]], marker, markersize=9, label=r)
    ax.plot([2.0], [res["ensemble"]], "*", markersize=12, label="ensemble")
    ax.axhline(res["model A"], color="grey", ls=":", label="model A")
    ax.axhline(res["model B"], color="grey", ls="--", label="model B")
    ax.set_title(f"MiniLM, {report['task']}: B's top {report['reinit_layers']} layers re-initialised", fontsize=9)
    ax.set_xlabel("FFN width (x intermediate_size)")
    ax.set_ylabel("test accuracy")
    ax.legend(fontsize=6, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
