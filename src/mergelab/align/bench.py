"""Benchmark: merging nets trained from different random initialisations (issue 18, item 3).

Data: scikit-learn's digits (8x8 images, 10 classes; offline), and mnist1d when the ``mnist1d``
package is installed (it generates its data from templates, offline). Nets: two-hidden-layer MLPs,
a plain conv net and a ResNet-style net (:mod:`mergelab.align.resnet`; the conv nets on digits only).
Two settings: **shared** labels (both models learn all classes) and **disjoint** labels (A learns
classes 0-4, B classes 5-9; merged models keep one head per model and are scored on each task with
its own head). Per pair of models (different seeds for initialisation and data order):

* each model alone, and the ensemble (averaged logits; disjoint: both heads side by side);
* plain weight averaging, weight matching + averaging, activation matching + averaging (width 1.0);
  for the conv nets also both matchings + averaging followed by Git Re-Basin's BatchNorm reset
  (running statistics recomputed on the training images);
* for the MLPs and the plain conv net, ZipIt-style merging (:mod:`mergelab.align.zipit`): both hidden
  layers zipped (width 1.0), or only the first (partial zipping: the second stays both models side by side);
* PLeaS at widths 1.0 ... 2.0 with calibration inputs from the training set, and PLeaS-free with
  calibration inputs from another domain (8x8 grayscale patches of scikit-learn's two sample photos).

Everything runs on CPU in about four CPU-minutes (``quick=True``: seconds, for the tests).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import torch

from mergelab.align.matching import activation_matching, weight_matching
from mergelab.align.pleas import mlp_forward, pleas_mlp
from mergelab.align.spec import Axis, apply_permutations, chain_spec
from mergelab.align.zipit import zipit_conv, zipit_mlp

WIDTHS = (1.0, 1.25, 1.5, 1.75, 2.0)


@dataclass
class Data:
    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    other_domain: torch.Tensor  # unlabelled inputs of another domain, same shape


def _standardise(train, *others):
    mu, sd = train.mean(0, keepdim=True), train.std(0, keepdim=True).clamp_min(1.0)  # constant pixels stay tame
    return [(t - mu) / sd for t in (train, *others)]


def _photo_patches(n: int, side: int, seed: int) -> np.ndarray:
    """Grayscale ``side x side`` patches of scikit-learn's bundled sample photos (china, flower)."""
    from sklearn.datasets import load_sample_images

    rng = np.random.default_rng(seed)
    out = []
    for img in load_sample_images().images:
        g = img.mean(2)
        for _ in range(n // 2):
            s = int(rng.integers(side * 2, side * 8))
            r, c = rng.integers(0, g.shape[0] - s), rng.integers(0, g.shape[1] - s)
            patch = g[r:r + s, c:c + s]
            idx = (np.arange(side) * s // side)
            out.append(patch[np.ix_(idx, idx)].reshape(-1))
    return np.asarray(out, dtype=np.float32)


def load_digits_data(seed: int = 0) -> Data:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    xtr, xte, ytr, yte = train_test_split(d.data.astype(np.float32), d.target, test_size=0.3, random_state=seed,
                                          stratify=d.target)
    other = _photo_patches(1000, 8, seed)
    other = other / other.max() * 16.0  # the digits' pixel range, 0..16
    xtr, xte, other = _standardise(*(torch.as_tensor(a) for a in (xtr, xte, other)))
    return Data("digits", xtr, torch.as_tensor(ytr), xte, torch.as_tensor(yte), other)


def load_mnist1d_data(seed: int = 0) -> Optional[Data]:
    try:
        from mnist1d.data import get_dataset_args, make_dataset
    except ImportError:
        return None
    args = get_dataset_args()
    args.seed = seed
    d = make_dataset(args)
    xtr, xte = torch.as_tensor(d["x"], dtype=torch.float32), torch.as_tensor(d["x_test"], dtype=torch.float32)
    other = torch.cumsum(torch.randn(1000, xtr.shape[1], generator=torch.Generator().manual_seed(seed)), 1)
    xtr, xte, other = _standardise(xtr, xte, other)
    return Data("mnist1d", xtr, torch.as_tensor(d["y"]), xte, torch.as_tensor(d["y_test"]), other)


def _fit(net, x, y, seed: int, epochs: int) -> None:
    """Adam (lr 2e-3, weight decay 1e-4) on cross-entropy, minibatches of 64 in a seeded order."""
    opt = torch.optim.Adam(net.parameters(), lr=2e-3, weight_decay=1e-4)
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=g).split(64):
            loss = torch.nn.functional.cross_entropy(net(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()


def train_mlp(x, y, classes: int, hidden: int, seed: int, epochs: int) -> Dict[str, torch.Tensor]:
    """A two-hidden-layer ReLU MLP from its own random initialisation (Adam, minibatches of 64)."""
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(x.shape[1], hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, hidden),
                              torch.nn.ReLU(), torch.nn.Linear(hidden, classes))
    _fit(net, x, y, seed, epochs)
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


class ConvDigits(torch.nn.Module):
    """conv 3x3 - BN - ReLU, strided conv 3x3 - BN - ReLU, flatten, linear (8x8 single-channel inputs)."""

    def __init__(self, c1: int, c2: int, classes: int):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(1, c1, 3, padding=1)
        self.bn1 = torch.nn.BatchNorm2d(c1)
        self.conv2 = torch.nn.Conv2d(c1, c2, 3, stride=2, padding=1)
        self.bn2 = torch.nn.BatchNorm2d(c2)
        self.fc = torch.nn.Linear(c2 * 16, classes)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x.reshape(-1, 1, 8, 8))))
        return self.fc(torch.relu(self.bn2(self.conv2(x))).flatten(1))


def train_conv(x, y, classes: int, width: int, seed: int, epochs: int) -> ConvDigits:
    torch.manual_seed(seed)
    net = ConvDigits(width, width, classes)
    _fit(net, x, y, seed, epochs)
    return net.eval()


def _conv_from(state) -> ConvDigits:
    net = ConvDigits(state["conv1.weight"].shape[0], state["conv2.weight"].shape[0], state["fc.weight"].shape[0])
    net.load_state_dict(state)
    return net.eval()


def _accuracy(logits, y, tasks) -> float:
    """Mean over tasks of the accuracy on that task's test examples, argmax within its own logits."""
    accs = []
    for cols, classes in tasks:
        mask = torch.isin(y, torch.tensor(classes))
        pred = logits[mask][:, cols].argmax(1)
        accs.append(float((torch.tensor(classes)[pred] == y[mask]).float().mean()))
    return float(np.mean(accs))


def _average(a, b, heads: str):
    out = {}
    last = list(a)[-2:]  # the output layer's weight and bias
    for k in a:
        out[k] = torch.cat([a[k], b[k]]) if heads == "concat" and k in last else (a[k] + b[k]) / 2
    return out


def run_pair(data: Data, setting: str, seed_a: int, seed_b: int, hidden: int, epochs: int,
             widths=WIDTHS, arch: str = "mlp") -> Dict[str, float]:
    """Accuracy of every row for one pair of models (the keys name the rows)."""
    if arch in ("conv", "resnet"):
        return _run_pair_conv(data, setting, seed_a, seed_b, hidden, epochs, widths, arch)
    if setting == "shared":
        splits = [(slice(None), list(range(10)))] * 2
        tasks = [(list(range(10)), list(range(10)))]
        heads = "average"
    else:
        splits = [(data.y_train < 5, list(range(5))), (data.y_train >= 5, list(range(5, 10)))]
        tasks = [(list(range(5)), list(range(5))), (list(range(5, 10)), list(range(5, 10)))]
        heads = "concat"
    models = []
    for (mask, classes), seed in zip(splits, (seed_a, seed_b)):
        x, y = data.x_train[mask], data.y_train[mask]
        models.append(train_mlp(x, y - classes[0], len(classes), hidden, seed, epochs))
    a, b = models
    xt, yt = data.x_test, data.y_test
    fa, fb = mlp_forward(a, xt).float(), mlp_forward(b, xt).float()
    rows: Dict[str, float] = {}
    if setting == "shared":
        rows["model A"], rows["model B"] = _accuracy(fa, yt, tasks), _accuracy(fb, yt, tasks)
        rows["ensemble"] = _accuracy((fa + fb) / 2, yt, tasks)
    else:  # each model on its own task; the ensemble is both heads side by side (exact)
        rows["model A"] = _accuracy(fa, yt, tasks[:1])
        rows["model B"] = _accuracy(fb, yt, [(list(range(5)), list(range(5, 10)))])
        rows["ensemble"] = _accuracy(torch.cat([fa, fb], 1), yt, tasks)
    spec = chain_spec({k: tuple(v.shape) for k, v in a.items()})
    rows["average"] = _accuracy(mlp_forward(_average(a, b, heads), xt).float(), yt, tasks)
    wm = apply_permutations(b, spec, weight_matching(spec, a, b))
    rows["weight matching + average"] = _accuracy(mlp_forward(_average(a, wm, heads), xt).float(), yt, tasks)
    calib = data.x_train

    def hidden_feats(state):
        h, feats = calib, {}
        for i, k in enumerate([k for k in state if k.endswith(".weight")][:-1]):
            h = torch.relu(h @ state[k].T + state[k[:-6] + "bias"])
            feats[f"P{i}"] = [(Axis(f"P{i}"), h)]
        return feats

    am = apply_permutations(b, spec, activation_matching(spec, hidden_feats(a), hidden_feats(b)))
    rows["activation matching + average"] = _accuracy(mlp_forward(_average(a, am, heads), xt).float(), yt, tasks)
    for depth, name in ((-1, "ZipIt (both hidden layers zipped)"), (1, "ZipIt partial (first layer zipped)")):
        z = zipit_mlp(a, b, calib, depth=depth, heads=heads)
        rows[name] = _accuracy(mlp_forward(z, xt).float(), yt, tasks)
    for w in widths:
        r = pleas_mlp(a, b, calib, width=float(w), heads=heads)
        rows[f"PLeaS w={w:g}"] = _accuracy(mlp_forward(r.state, xt).float(), yt, tasks)
        r = pleas_mlp(a, b, data.other_domain, width=float(w), heads=heads)
        rows[f"PLeaS-free w={w:g}"] = _accuracy(mlp_forward(r.state, xt).float(), yt, tasks)
    return rows


def _setting(data: Data, setting: str):
    if setting == "shared":
        return ([(slice(None), list(range(10)))] * 2, [(list(range(10)), list(range(10)))], "average")
    return ([(data.y_train < 5, list(range(5))), (data.y_train >= 5, list(range(5, 10)))],
            [(list(range(5)), list(range(5))), (list(range(5, 10)), list(range(5, 10)))], "concat")


def train_resnet(x, y, classes: int, width: int, seed: int, epochs: int):
    """A :class:`~mergelab.align.resnet.ResNet` (``width`` channels in the stream and in each of its two
    blocks) from its own random initialisation, trained as the other nets."""
    from mergelab.align.resnet import ResNet

    torch.manual_seed(seed)
    net = ResNet(width, width, classes, blocks=2)
    _fit(net, x, y, seed, epochs)
    return net.eval()


def _run_pair_conv(data: Data, setting: str, seed_a: int, seed_b: int, width: int, epochs: int, widths,
                   arch: str = "conv"):
    """As :func:`run_pair` for :class:`ConvDigits` or the ResNet (``arch="resnet"``; digits only); averaging
    averages BatchNorm statistics too. The ResNet is aligned with its own spec (the residual stream is one
    permutation shared by every block), the plain conv net with the inferred chain spec."""
    from mergelab.align.features import record
    from mergelab.align.pleas import pleas_conv
    from mergelab.align.resnet import ResNet, pleas_resnet, resnet_spec

    splits, tasks, heads = _setting(data, setting)
    train = train_resnet if arch == "resnet" else train_conv
    nets = [train(data.x_train[m], data.y_train[m] - c[0], len(c), width, seed, epochs)
            for (m, c), seed in zip(splits, (seed_a, seed_b))]
    from_state, pleas = (ResNet.from_state, pleas_resnet) if arch == "resnet" else (_conv_from, pleas_conv)
    a, b = (n.state_dict() for n in nets)
    xt, yt = data.x_test, data.y_test
    with torch.no_grad():
        fa, fb = nets[0](xt), nets[1](xt)
        rows: Dict[str, float] = {}
        if setting == "shared":
            rows["model A"], rows["model B"] = _accuracy(fa, yt, tasks), _accuracy(fb, yt, tasks)
            rows["ensemble"] = _accuracy((fa + fb) / 2, yt, tasks)
        else:
            rows["model A"] = _accuracy(fa, yt, tasks[:1])
            rows["model B"] = _accuracy(fb, yt, [(list(range(5)), list(range(5, 10)))])
            rows["ensemble"] = _accuracy(torch.cat([fa, fb], 1), yt, tasks)
        spec = resnet_spec(nets[0]) if arch == "resnet" else chain_spec({k: tuple(v.shape) for k, v in a.items()})

        def avg(sb):
            out = {}
            for k in a:
                if k.endswith("num_batches_tracked"):
                    out[k] = a[k]
                elif heads == "concat" and k.startswith("fc."):
                    out[k] = torch.cat([a[k], sb[k]])
                else:
                    out[k] = (a[k] + sb[k]) / 2
            return out

        calib = data.x_train.reshape(-1, 1, 8, 8)
        batches = list(calib.split(256))

        def score(state, reset=False):
            net = from_state(state)
            if reset:  # Git Re-Basin's BatchNorm reset: statistics recomputed on the calibration images
                for m in net.modules():
                    if isinstance(m, torch.nn.BatchNorm2d):
                        m.reset_running_stats()
                        m.momentum = None  # cumulative average over the batches
                net.train()
                for x in batches:
                    net(x)
                net.eval()
            return _accuracy(net(xt), yt, tasks)

        rows["average"] = score(avg(b))
        wm = avg(apply_permutations(b, spec, weight_matching(spec, a, b)))
        rows["weight matching + average"] = score(wm)
        feats = [record(n, spec, batches, lambda m, x: (m(x), None)[1]) for n in nets]
        am = avg(apply_permutations(b, spec, activation_matching(spec, *feats)))
        rows["activation matching + average"] = score(am)
        rows["weight matching + average + BN reset"] = score(wm, reset=True)
        rows["activation matching + average + BN reset"] = score(am, reset=True)
        if arch == "conv":  # ZipIt for the plain chain (the ResNet's stream would need its own zip)
            for depth, name in ((-1, "ZipIt (both hidden layers zipped)"), (1, "ZipIt partial (first layer zipped)")):
                rows[name] = score(zipit_conv(nets[0], nets[1], calib, depth=depth, heads=heads))
        for w in widths:
            rows[f"PLeaS w={w:g}"] = score(pleas(nets[0], nets[1], calib, width=float(w), heads=heads).state)
            other = data.other_domain.reshape(-1, 1, 8, 8)
            rows[f"PLeaS-free w={w:g}"] = score(pleas(nets[0], nets[1], other, width=float(w), heads=heads).state)
    return rows


def run(out: Path, pairs: int = 3, hidden=(16, 64), epochs: int = 30, quick: bool = False,
        datasets=("digits", "mnist1d"), log=print, conv: bool = True, resnet: int = 16) -> dict:
    """Run every dataset, setting and hidden width over ``pairs`` seed pairs; write ``report.json``,
    ``report.md`` and ``accuracy_vs_width.png`` into ``out``."""
    if quick:
        pairs, hidden, epochs, resnet = 1, (16,), 3, 8 if resnet else 0
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    t0 = time.time()
    results: Dict[str, Dict[str, List[float]]] = {}
    skipped = []
    try:
        for name in datasets:
            data = load_digits_data() if name == "digits" else load_mnist1d_data()
            if data is None:
                skipped.append(f"{name} (package not installed)")
                continue
            archs = [("mlp", h) for h in hidden] + ([("conv", 8)] if conv and name == "digits" else []) \
                + ([("resnet", resnet)] if resnet and name == "digits" else [])
            label = {"mlp": "hidden {}", "conv": "conv {} channels", "resnet": "ResNet {} channels"}
            for arch, h in archs:
                for setting in ("shared", "disjoint"):
                    key = f"{name} / {setting} / " + label[arch].format(h)
                    for p in range(pairs):
                        rows = run_pair(data, setting, 100 + 2 * p, 101 + 2 * p, h, epochs,
                                        widths=(1.0, 2.0) if quick else WIDTHS, arch=arch)
                        for r, v in rows.items():
                            results.setdefault(key, {}).setdefault(r, []).append(v)
                    log(f"{key}: " + ", ".join(f"{r} {np.mean(v):.3f}" for r, v in results[key].items()))
    finally:
        torch.set_num_threads(threads)
    report = {"pairs": pairs, "hidden": list(hidden), "epochs": epochs, "seconds": round(time.time() - t0, 1),
              "skipped": skipped,
              "results": {k: {r: {"mean": float(np.mean(v)), "std": float(np.std(v)), "runs": v} for r, v in rows.items()}
                          for k, rows in results.items()}}
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "report.md").write_text(markdown(report))
    plot(report, out / "accuracy_vs_width.png")
    return report


def markdown(report: dict) -> str:
    """One column per setting, one row per merge (a row a setting lacks is shown as '-')."""
    keys = list(report["results"])
    rows: List[str] = []
    for k in keys:
        rows += [r for r in report["results"][k] if r not in rows]
    cell = lambda k, r: (f"{report['results'][k][r]['mean']:.3f} ± {report['results'][k][r]['std']:.3f}"  # noqa: E731
                         if r in report["results"][k] else "-")
    lines = ["| row | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
    for r in rows:
        lines.append(f"| {r} | " + " | ".join(cell(k, r) for k in keys) + " |")
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = list(report["results"])
    cols = 2
    nrows = max(1, (len(keys) + cols - 1) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.6 * cols, 3.6 * nrows), squeeze=False)
    for ax, k in zip(axes.flat, keys):
        res = report["results"][k]
        for prefix, style in (("PLeaS w=", "o-"), ("PLeaS-free w=", "s--")):
            pts = sorted((float(r[len(prefix):]), v["mean"]) for r, v in res.items() if r.startswith(prefix))
            ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=prefix.rstrip(" w="))
        for r, marker, x in (("average", "x", 1.0), ("weight matching + average", "^", 1.0),
                             ("activation matching + average", "v", 1.0),
                             ("weight matching + average + BN reset", "<", 1.0),
                             ("activation matching + average + BN reset", ">", 1.0),
                             ("ZipIt (both hidden layers zipped)", "D", 1.0),
                             ("ZipIt partial (first layer zipped)", "d", 1.5)):  # hidden widths n and 2n
            if r in res:
                ax.plot([x], [res[r]["mean"]], marker, markersize=8, label=r)
        ax.plot([2.0], [res["ensemble"]["mean"]], "*", markersize=12, label="ensemble")
        ax.axhline(np.mean([res["model A"]["mean"], res["model B"]["mean"]]), color="grey", ls=":", label="models alone (mean)")
        ax.set_title(k, fontsize=9)
        ax.set_xlabel("width (x one model's)")
        ax.set_ylabel("test accuracy")
    for ax in axes.flat[len(keys):]:
        ax.axis("off")
    handles = {h.get_label(): h for ax in axes.flat for h in ax.get_lines()}  # every row some panel has
    axes.flat[0].legend(list(handles.values()), list(handles), fontsize=6, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_budget(out: Path, budget_width: float = 1.5, pairs: int = 3, hidden=(16, 64), resnet: int = 16,
               epochs: int = 30, log=print) -> dict:
    """PLeaS's per-layer widths under a FLOPs budget (:mod:`mergelab.align.widths`) against one uniform width,
    on digits (the same pairs, seeds and training as :func:`run`). Per net the budget is the paper's FLOPs
    ratio of the uniform width ``budget_width``, so both rows cost the same; the budget's weights are the
    paper's layerwise benefits scored on the calibration (training) inputs. Writes ``budget.json``."""
    from mergelab.align.resnet import ResNet, pleas_resnet
    from mergelab.align.widths import flops

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    t0 = time.time()
    data = load_digits_data()
    results: Dict[str, dict] = {}
    try:
        for arch, h in [("mlp", h) for h in hidden] + ([("resnet", resnet)] if resnet else []):
            for setting in ("shared", "disjoint"):
                splits, tasks, heads = _setting(data, setting)
                key = f"digits / {setting} / " + (f"hidden {h}" if arch == "mlp" else f"ResNet {h} channels")
                rec = results.setdefault(key, {"uniform": [], "budget": [], "widths": [], "budget_ratio": None,
                                               "flops_uniform": [], "flops_budget": []})
                for p in range(pairs):
                    sa, sb = 100 + 2 * p, 101 + 2 * p
                    if arch == "mlp":
                        a, b = (train_mlp(data.x_train[m], data.y_train[m] - c[0], len(c), h, s, epochs)
                                for (m, c), s in zip(splits, (sa, sb)))
                        merge = lambda w: pleas_mlp(a, b, data.x_train, width=w, heads=heads)  # noqa: E731
                        acc = lambda st: _accuracy(mlp_forward(st, data.x_test).float(), data.y_test, tasks)  # noqa: E731
                        n = {"P0": h, "P1": h}
                        outs = len(tasks) * len(tasks[0][0]) if heads == "concat" else 10
                        terms = [(64.0, None, "P0"), (1.0, "P0", "P1"), (float(outs), "P1", None)]
                    else:
                        nets = [train_resnet(data.x_train[m], data.y_train[m] - c[0], len(c), h, s, epochs)
                                for (m, c), s in zip(splits, (sa, sb))]
                        calib = data.x_train.reshape(-1, 1, 8, 8)
                        merge = lambda w: pleas_resnet(nets[0], nets[1], calib, width=w, heads=heads)  # noqa: E731

                        def acc(st):
                            with torch.no_grad():
                                return _accuracy(ResNet.from_state(st)(data.x_test), data.y_test, tasks)
                        n = {"res": h, "block0": h, "block1": h}
                        outs = 10
                        terms = [(9 * 64.0, None, "res")] + [(9 * 64.0, x, y) for i in range(2) for x, y in
                                                             (("res", f"block{i}"), (f"block{i}", "res"))]
                        terms.append((float(outs), "res", None))
                    base = flops(terms, n, {g: 0.0 for g in n})
                    ratio = flops(terms, n, {g: budget_width - 1 for g in n}) / base
                    rec["budget_ratio"] = round(ratio, 4)
                    u = merge(budget_width)
                    bud = merge({"budget": ratio})
                    rec["uniform"].append(acc(u.state))
                    rec["budget"].append(acc(bud.state))
                    rec["widths"].append(bud.widths)
                    rec["flops_uniform"].append(ratio)
                    rec["flops_budget"].append(bud.budget["flops_ratio"])
                log(f"{key}: budget {rec['budget_ratio']}: uniform {np.mean(rec['uniform']):.3f}, "
                    f"budget {np.mean(rec['budget']):.3f}, widths {rec['widths']}")
    finally:
        torch.set_num_threads(threads)
    report = {"uniform_width": budget_width, "pairs": pairs, "epochs": epochs, "seconds": round(time.time() - t0, 1),
              "results": results}
    (out / "budget.json").write_text(json.dumps(report, indent=2) + "\n")
    return report
