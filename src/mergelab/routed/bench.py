"""``mergelab routed bench``: leaderboard rows for the routed methods on a prepared bench suite.

The pieces are ``bench run``'s (:class:`mergelab.bench.run.BenchRunner`: the prepared base, experts,
heads and reference rows; the report writer), and every row goes through the saved format: each
method's folder is written under ``OUT/models/<row>/`` and evaluated through :func:`mergelab.routed.load`.
Rows are ``kind: "routed"`` and add what a static merge does not have: ``sizes`` (bytes and parameters
beyond one model, against one model and all experts), ``inference`` (multiply-adds per token against
one model, measured evaluation time against one static model's) and ``data`` (which split taught the
router; ``test_time`` for WEMoE adapted on the test inputs, as AdaMerging's test-time row).

Held-out tasks are not scored (a routed model has no single encoder to refit a probe on).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple

import torch

from mergelab.errors import MergeLabError

METHODS = ("emr", "twin", "wemoe", "wemoe_tta")
DISPLAY = {"emr": "EMR-Merging", "twin": "Twin-Merging", "wemoe": "WEMoE (routers on validation inputs)",
           "wemoe_tta": "WEMoE (test-time adaptation)"}


@dataclass
class RoutedSettings:
    """Budgets of the runner (CPU-sized; the docs say where they differ from the references)."""

    emr_reduction: str = "tensor_mean"
    twin_method: str = "task_arithmetic"
    twin_lambda: float = 0.3
    twin_density: float = 0.1
    twin_rank: Optional[int] = None
    twin_ranks: Tuple[int, ...] = ()  # a rank sweep: one Twin row per rank (folders twin-r<rank>), one router
    twin_examples: int = 0  # router inputs per task from the validation split (0: all)
    twin_epochs: int = 50
    wemoe_steps: int = 200  # reference 1000
    wemoe_lr: float = 1e-3  # reference 1e-4 over 1000 steps
    wemoe_examples: int = 64  # unlabelled inputs per task
    wemoe_batch: int = 16
    eval_batch: int = 64
    threads: Optional[int] = None


def _kw(b) -> dict:
    return {"input_ids": b.input_ids, "attention_mask": b.attention_mask}


def linear_macs(module) -> int:
    """Multiply-adds per token of the module's Linear maps (what dominates a transformer's cost)."""
    return sum(m.in_features * m.out_features for m in module.modules() if isinstance(m, torch.nn.Linear))


class RoutedBench:
    def __init__(self, suite, cache, merge_tasks: Sequence[str], held_out: Sequence[str], out: Path,
                 base: str = "minilm-l6", seed: int = 0, settings: RoutedSettings = RoutedSettings(),
                 log: Callable[[str], None] = print, runner=None):
        from mergelab.bench.run import BenchRunner, _unprefixed

        if settings.threads:
            torch.set_num_threads(settings.threads)
        self.runner = runner or BenchRunner(suite, cache, merge_tasks, held_out, base, seed, log)
        self.suite, self.seed, self.settings, self.log, self.out = suite, seed, settings, log, Path(out)
        self.tasks = list(self.runner.merge_tasks)
        self.base = _unprefixed(self.runner.base)
        self.experts = [_unprefixed(e) for e in self.runner.experts]
        self.heads = {t: self.runner.heads[t] for t in self.tasks}
        self.config, self.tokenizer = self.runner.config, self.runner.tokenizer
        self._static = None

    model_class = "AutoModel"
    wemoe_logits = None  # the task heads' logits (router training)

    def references(self) -> List[dict]:
        return self.runner.references()

    # ------------------------------------------------------------------ data and evaluation
    def batches(self, split: str, n: int, batch_size: int, test_time: bool = False) -> List[list]:
        from mergelab.calibrate.data import task_texts, tokenize_batches
        from mergelab.evaluate.model import MAX_LENGTH

        return [[_kw(b) for b in tokenize_batches(self.tokenizer, task_texts(
            self.suite.task(t), split, n or None, self.seed, test_time, suite=self.suite.name),
            batch_size, MAX_LENGTH)] for t in self.tasks]

    @torch.no_grad()
    def correct(self, model, split: str = "test") -> dict:
        """task -> correctness bits of the routed ``model`` (task id given; routers ignore it)."""
        from mergelab.evaluate.harness import gold, texts
        from mergelab.evaluate.metrics import correct_bits
        from mergelab.evaluate.model import batches, head_logits

        out = {}
        for t in self.tasks:
            task = self.suite.task(t)
            xs = texts(task, split)
            order = sorted(range(len(xs)), key=lambda i: len(xs[i]))
            pred = torch.empty(len(xs), dtype=torch.long)
            for idx, b in batches(self.tokenizer, xs, self.settings.eval_batch, order=order):
                pooled = model(task=t, **_kw(b)).pooler_output
                pred[idx] = head_logits(pooled, self.heads[t]).argmax(-1)
            out[t] = correct_bits(pred, gold(task, split))
        return out

    def static_seconds(self) -> float:
        """Test-split evaluation time of one static encoder (the base), the unit of the cost column."""
        if self._static is None:
            t0 = time.perf_counter()
            self.runner.evaluator.correct(self.runner.evaluator.encoder(self.base), self.heads, self.tasks)
            self._static = time.perf_counter() - t0
        return self._static

    def row(self, key: str, folder: Path, build_seconds: float, mib: float, data: dict, name: Optional[str] = None,
            **extra) -> dict:
        import mergelab.routed as routed

        model = routed.load(folder)
        t0 = time.perf_counter()
        correct = self.correct(model)
        seconds = time.perf_counter() - t0
        one = linear_macs(model.module)
        static = self.static_seconds()
        inference = {"eval_seconds": round(seconds, 2), "static_eval_seconds": round(static, 2),
                     "time_vs_static": round(seconds / static, 2), "description": model.manifest.get("inference")}
        inference.update(extra.pop("inference", {}))
        inference["linear_macs_per_token"] = inference.get("linear_macs_per_token", one)
        row = self.runner._row(name or DISPLAY[key], "routed", correct, None, method=key, merge_seconds=round(build_seconds, 2),
                               merge_peak_mib=round(mib, 1), eval_seconds=round(seconds, 2), data=data,
                               sizes=model.sizes, inference=inference, folder=str(folder), **extra)
        m = row["metrics"]
        s = model.sizes
        norm = m.get("mean_normalised_accuracy")
        self.log(f"{row['name']}: test mean accuracy {m['mean_accuracy']:.4f}, normalised "
                 f"{'n/a' if norm is None else f'{norm:.4f}'}; {s.get('extra_bytes', 0) / 2**20:.1f} MiB beyond one model "
                 f"({s.get('vs_all_experts', 0):.3f} of all experts); build {build_seconds:.1f} s, eval {seconds:.1f} s")
        return row

    def _timer(self):
        from mergelab.tune.bench import _Timer

        return _Timer()

    # ------------------------------------------------------------------ methods
    def emr(self) -> List[dict]:
        from mergelab.routed.emr import emr_merge, save_emr

        folder = self.out / "models" / "emr"
        with self._timer() as tm:
            res = emr_merge(self.base, self.experts, self.tasks, self.settings.emr_reduction)
            save_emr(folder, res, self.base, self.config, self.tasks, heads=self.heads, model_class=self.model_class)
        data = {"split": None, "examples_per_task": 0, "labels_used": False, "test_time": False}
        return [self.row("emr", folder, tm.seconds, tm.mem.mib, data,
                         params={"rescale_reduction": self.settings.emr_reduction},
                         rescalers=dict(zip(self.tasks, res.rescalers)),
                         inference={"linear_macs_vs_one_model": 1.0, "task_id_needed": True})]

    def twin(self) -> List[dict]:
        """One row at ``twin_rank`` / ``twin_density``, or one per rank of ``twin_ranks`` (a sweep: each rank
        its own folder ``twin-r<rank>``). The router does not depend on the rank: a sweep merges the shared
        model and trains the router once (:func:`mergelab.routed.twin.train_twin_router`) and builds every
        rank with it, the same folders as training it per rank (seeded)."""
        from mergelab.routed.twin import train_twin_router

        s = self.settings
        data = self.batches("validation", s.twin_examples, 64)
        if not s.twin_ranks:
            return [self._twin_row(s.twin_rank, "twin", DISPLAY["twin"], data)]
        with self._timer() as tm:
            router = train_twin_router(self.base, self.experts, self.tasks, self.config, data,
                                       self._twin_config(None), self.model_class, self.log)
        self.log(f"twin: shared merge and router trained once for the {len(s.twin_ranks)} ranks in {tm.seconds:.1f} s")
        return [self._twin_row(r, f"twin-r{r}", f"{DISPLAY['twin']} (rank {r})", data, router, tm)
                for r in s.twin_ranks]

    def _twin_config(self, rank: Optional[int]):
        from mergelab.routed.twin import TwinConfig

        s = self.settings
        return TwinConfig(shared_method=s.twin_method, shared_params=self._twin_shared_params(), rank=rank,
                          density=s.twin_density, router_epochs=s.twin_epochs, seed=self.seed)

    def _twin_shared_params(self) -> dict:
        """``lambda`` for a shared method that takes one (task arithmetic, TIES, ...), else the method's defaults."""
        from mergelab.methods.registry import get_method

        return {"lambda": self.settings.twin_lambda} if get_method(self.settings.twin_method).param("lambda") else {}

    def _twin_row(self, rank: Optional[int], folder_name: str, name: str, data: List[list], router=None,
                  router_timer=None) -> dict:
        """``router``: trained once for a sweep; the row's build time and peak memory then include the
        router's (``router_seconds``), so that each row still says what building that one model costs."""
        from mergelab.routed.twin import build_twin

        s = self.settings
        cfg = self._twin_config(rank)
        folder = self.out / "models" / folder_name
        with self._timer() as tm:
            build_twin(folder, self.base, self.experts, self.tasks, self.config, data, cfg, heads=self.heads,
                       model_class=self.model_class, log=self.log, router=router)
        seconds, mib = tm.seconds, tm.mem.mib
        extra = {}
        if router_timer is not None:
            seconds, mib = seconds + router_timer.seconds, max(mib, router_timer.mem.mib)
            extra = {"router_seconds": round(router_timer.seconds, 2), "router_trained_once_for_sweep": True}
        import mergelab.routed as routed

        m = routed.load(folder)
        one = linear_macs(m.module)
        lowrank = sum(sum(int(d[0].shape[1]) * (d[0].shape[0] + d[2].shape[1]) for d in mod.deltas.get("weight", [])
                          if d is not None and not torch.is_tensor(d))
                      for mod in m.module.modules() if type(mod).__name__ == "RoutedLinear")
        info = {"split": "validation", "examples_per_task": s.twin_examples or "all", "labels_used": False,
                "task_ids_used": True, "test_time": False}
        return self.row("twin", folder, seconds, mib, info, name=name, **extra,
                        params={"shared": " ".join([s.twin_method] + [f"{k}={v}" for k, v in
                                                                      self._twin_shared_params().items()]),
                                "rank": rank or f"{s.twin_density:g} of full"},
                        router_accuracy=m.manifest.get("router_accuracy"),
                        exclusive_relative_error=m.manifest.get("mean_relative_error"),
                        inference={"linear_macs_vs_one_model": round((2 * one + lowrank) / one, 3),
                                   "task_id_needed": False})

    def wemoe(self, test_time: bool) -> List[dict]:
        from mergelab.routed.wemoe import WEMoEConfig, save_wemoe, train_routers, upscale

        s = self.settings
        key = "wemoe_tta" if test_time else "wemoe"
        split = "test" if test_time else "validation"
        cfg = WEMoEConfig(steps=s.wemoe_steps, lr=s.wemoe_lr, seed=self.seed)
        data = self.batches(split, s.wemoe_examples, s.wemoe_batch, test_time)
        folder = self.out / "models" / key
        with self._timer() as tm:
            model = upscale(self.base, self.experts, self.tasks, self.config, cfg, heads=self.heads,
                            model_class=self.model_class)
            hist = train_routers(model, [self.heads[t] for t in self.tasks] if self.heads else None, data, cfg,
                                 log=self.log, logits=self.wemoe_logits)
            save_wemoe(folder, model, {"entropy_first_last": [hist[0], hist[-1]] if hist else None})
        mlp = sum(v.numel() for v in model.taus[0].values() if v.dim() == 2)
        one = linear_macs(model.module)
        info = {"split": split, "examples_per_task": s.wemoe_examples, "labels_used": False, "test_time": test_time}
        return [self.row(key, folder, tm.seconds, tm.mem.mib, info,
                         params={"steps": s.wemoe_steps, "lr": s.wemoe_lr, "batch": s.wemoe_batch,
                                 "examples": s.wemoe_examples, "init_lambda": cfg.init_lambda},
                         entropy_first_last=[hist[0], hist[-1]] if hist else None,
                         inference={"linear_macs_vs_one_model": round((one + len(self.tasks) * mlp) / one, 3),
                                    "task_id_needed": False})]

    def run(self, method: str) -> List[dict]:
        if method not in METHODS:
            raise MergeLabError(f"unknown routed method '{method}'; known: {', '.join(METHODS)}")
        try:
            if method == "emr":
                return self.emr()
            if method == "twin":
                return self.twin()
            return self.wemoe(method == "wemoe_tta")
        except MergeLabError as e:
            self.log(f"{method} failed: {e}")
            return [{"name": DISPLAY[method], "method": method, "kind": "routed", "status": "failed", "reason": str(e)}]


class LlmRoutedBench(RoutedBench):
    """The routed rows on ``llmmix``'s causal-LM experts: greedy exact match (or pass@1) through the llmmix
    runner (:class:`mergelab.llmmix.run.LlmRunner`), on the first ``eval_limit`` test examples of each task
    (the experts' reference bits on the same examples; held-out text perplexity is not measured: a routed
    model's route on running text is not what its rows measure). Routers read prompts only (rendered and encoded
    as fine-tuning and evaluation do, left-padded); Twin-Merging and WEMoE route on the prompt and keep
    the route for the generated tokens (:meth:`mergelab.routed.common.RoutedModel.generate`). WEMoE's
    routers minimise the entropy of the answer's first token (:func:`mergelab.routed.wemoe.next_token_logits`)."""

    model_class = "AutoModelForCausalLM"

    def __init__(self, tasks: Sequence, out: Path, base_dir: Path, experts_dir: Path,
                 eval_limit: Optional[int] = None, seed: int = 0, settings: RoutedSettings = RoutedSettings(),
                 log: Callable[[str], None] = print):
        from mergelab.llmmix.run import LlmRunner
        from mergelab.routed.wemoe import next_token_logits

        if settings.threads:
            torch.set_num_threads(settings.threads)
        self.eval_limit = eval_limit
        # no perplexity pass (no text): routed rows do not report it
        self.runner = LlmRunner(tasks, [], base_dir, experts_dir, ("", "not measured"), seed, log,
                                eval_limit=eval_limit)
        self.suite, self.seed, self.settings, self.log, self.out = None, seed, settings, log, Path(out)
        self.specs = {t.name: t for t in tasks}
        self.tasks = [t.name for t in tasks]
        self.base, self.experts = self.runner.base, self.runner.experts
        self.heads = None
        self.config, self.tokenizer = self.runner.model.config, self.runner.tokenizer
        self.wemoe_logits = next_token_logits
        self._static = None

    def references(self) -> List[dict]:
        r = self.runner
        return [r._row("pretrained", "reference", r.base_eval["correct"], None, note="the base model, no fine-tuning"),
                r._row("individual", "reference", dict(r.expert_correct), None,
                       note="each task's own fine-tuned expert")]

    def batches(self, split: str, n: int, batch_size: int, test_time: bool = False) -> List[list]:
        """Per task, left-padded batches of the first ``n`` prompts of ``split`` (all with ``n`` 0)."""
        from mergelab.llmmix.tasks.format import encode_prompt

        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        out = []
        for t in self.tasks:
            ex = self.specs[t].split(split)
            enc = [encode_prompt(self.tokenizer, e.prompt) for e in (ex[:n] if n else ex)]
            bs = []
            for i in range(0, len(enc), batch_size):
                chunk = enc[i:i + batch_size]
                width = max(map(len, chunk))
                ids = torch.full((len(chunk), width), pad, dtype=torch.long)
                mask = torch.zeros((len(chunk), width), dtype=torch.long)
                for j, e in enumerate(chunk):
                    ids[j, width - len(e):] = torch.tensor(e, dtype=torch.long)
                    mask[j, width - len(e):] = 1
                bs.append({"input_ids": ids, "attention_mask": mask})
            out.append(bs)
        return out

    @torch.no_grad()
    def correct(self, model, split: str = "test") -> dict:
        from mergelab.llmmix.generate import evaluate_task
        from mergelab.llmmix.run import _bits

        return {t: _bits(evaluate_task(model.causal_lm(t), self.tokenizer, self.specs[t], split,
                                       limit=self.eval_limit, batch_size=self.runner.batch_size).records)
                for t in self.tasks}

    def static_seconds(self) -> float:
        """Test evaluation time of one static model (the base), the unit of the cost column."""
        if self._static is None:
            self.runner._load(self.base)
            t0 = time.perf_counter()
            for t in self.tasks:
                self.runner._eval_split(self.specs[t], "test")
            self._static = time.perf_counter() - t0
        return self._static


def _pct(x) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}"


def routed_markdown(report: dict) -> str:
    """The routed rows with what they keep beyond one model and what they cost (``routed.md``)."""
    head = ["model", "mean acc", "norm. acc", "extra MiB", "total / one model", "total / all experts",
            "linear MACs / one model", "eval time / static", "task id needed", "data"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in report["rows"]:
        if r.get("status") != "ok" or r.get("kind") != "routed":
            continue
        m, s, inf, d = r["metrics"], r["sizes"], r["inference"], r.get("data", {})
        data = "none" if not d.get("split") else d["split"] + (" (test-time adaptation)" if d.get("test_time") else "")
        lines.append("| " + " | ".join([
            r["name"], f"{100 * m['mean_accuracy']:.1f}", _pct(m.get("mean_normalised_accuracy")),
            f"{s['extra_bytes'] / 2**20:.1f}", f"{s['vs_one_model']:.2f}", f"{s['vs_all_experts']:.2f}",
            f"{inf.get('linear_macs_vs_one_model', 0):.2f}", f"{inf.get('time_vs_static', 0):.2f}",
            "yes" if inf.get("task_id_needed") else "no", data]) + " |")
    return "\n".join(lines) + "\n"


def _check(methods: Sequence[str], out: Path, settings: RoutedSettings = RoutedSettings()) -> list:
    methods = list(methods)
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise MergeLabError(f"unknown routed method(s) {unknown}; known: {', '.join(METHODS)}" if unknown
                            else f"no routed method given; known: {', '.join(METHODS)}")
    ranks = list(settings.twin_ranks)
    bad = [r for r in ranks if isinstance(r, bool) or not isinstance(r, int) or r < 1]
    if bad or len(set(ranks)) != len(ranks):
        raise MergeLabError(f"twin ranks must be distinct integers >= 1, got {ranks}")
    folders = [f"twin-r{r}" for r in ranks] if "twin" in methods and ranks else []
    folders += [m for m in methods if not (m == "twin" and ranks)]
    taken = [m for m in folders if (Path(out) / "models" / m).exists()]
    if taken:
        raise MergeLabError(f"'{Path(out) / 'models' / taken[0]}' exists; remove it or choose another --out")
    return methods


def _sweep(report: dict) -> List[dict]:
    """The Twin rows of a rank sweep (those with an integer rank), by rank."""
    rows = [r for r in report["rows"] if r.get("status") == "ok" and r.get("method") == "twin"
            and isinstance(r.get("params", {}).get("rank"), int)]
    return sorted(rows, key=lambda r: r["params"]["rank"])


def twin_rank_markdown(report: dict) -> str:
    """Rank against accuracy and bytes for a Twin-Merging rank sweep (``twin_ranks.md``)."""
    head = ["rank", "mean acc", "norm. acc", "exclusive rel. error", "router task-id acc", "extra MiB",
            "total / one model", "total / all experts", "linear MACs / one model"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in _sweep(report):
        m, s = r["metrics"], r["sizes"]
        err, acc = r.get("exclusive_relative_error"), r.get("router_accuracy")
        lines.append("| " + " | ".join([
            str(r["params"]["rank"]), f"{100 * m['mean_accuracy']:.1f}", _pct(m.get("mean_normalised_accuracy")),
            "n/a" if err is None else f"{err:.3f}", "n/a" if acc is None else f"{acc:.3f}",
            f"{s['extra_bytes'] / 2**20:.1f}", f"{s['vs_one_model']:.2f}", f"{s['vs_all_experts']:.2f}",
            f"{r['inference'].get('linear_macs_vs_one_model', 0):.2f}"]) + " |")
    return "\n".join(lines) + "\n"


def write_twin_rank_chart(report: dict, path: Path) -> Path:
    """``twin_ranks.png``: normalised accuracy against the rank kept, with the bytes kept beyond one model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from mergelab.evaluate.plots import _save

    rows = _sweep(report)
    ranks = [r["params"]["rank"] for r in rows]
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    ax.plot(ranks, [100 * (r["metrics"].get("mean_normalised_accuracy") or 0) for r in rows], "o-", color="C0")
    ax.set_xlabel("rank of each task's exclusive part")
    ax.set_ylabel("normalised accuracy (% of experts)", color="C0")
    ax.set_ylim(0, 105)
    ax.axhline(100, color="grey", lw=0.8, ls="--")
    ax2 = ax.twinx()
    ax2.plot(ranks, [r["sizes"]["vs_one_model"] for r in rows], "s--", color="C1", label="routed folder")
    s = rows[0]["sizes"] if rows else {}
    if s.get("experts_bytes") and s.get("one_model_bytes"):
        ax2.axhline(s["experts_bytes"] / s["one_model_bytes"], color="C1", lw=0.8, ls=":", label="all experts")
        ax2.legend(loc="lower right", fontsize=8)
    ax2.set_ylabel("total bytes / one model", color="C1")
    ax2.set_ylim(0, None)
    ax.set_title(f"{report['suite']}: Twin-Merging, rank vs accuracy vs bytes ({len(report['merge_tasks'])} tasks)")
    _save(fig, Path(path))
    plt.close(fig)
    return Path(path)


def _run_methods(bench: RoutedBench, methods: Sequence[str], out: Path, report: dict, start: float) -> dict:
    from mergelab.evaluate.report import write_report

    for m in methods:
        report["rows"].extend(bench.run(m))
        report["seconds"] = round(time.perf_counter() - start, 1)
        report["complete"] = m == methods[-1]
        write_report(report, out)
        (out / "routed.md").write_text(routed_markdown(report))
        if bench.settings.twin_ranks and m == "twin" and _sweep(report):
            (out / "twin_ranks.md").write_text(twin_rank_markdown(report))
            write_twin_rank_chart(report, out / "twin_ranks.png")
    return report


def run_routed_bench(suite, cache, methods: Sequence[str], out: Path, base: str = "minilm-l6",
                     merge_tasks: Optional[Sequence[str]] = None, held_out: Optional[Sequence[str]] = None,
                     seed: int = 0, settings: RoutedSettings = RoutedSettings(), references: bool = True,
                     log: Callable[[str], None] = print) -> dict:
    """Run the routed ``methods`` on the prepared suite; write the report and the model folders to ``out``."""
    from mergelab import __version__

    out = Path(out)
    methods = _check(methods, out, settings)
    held = list(suite.held_out if held_out is None else held_out)
    tasks = list(merge_tasks) if merge_tasks else [t for t in suite.task_names if t not in held]
    if len(tasks) < 2:
        raise MergeLabError(f"a routed model needs at least 2 merged tasks; got {tasks}")
    start = time.perf_counter()
    bench = RoutedBench(suite, cache, tasks, held, out, base, seed, settings, log)
    (out / "models").mkdir(parents=True, exist_ok=True)
    rows = bench.references() if references else []
    report = {
        "suite": suite.name, "suite_fingerprint": suite.fingerprint(), "suite_source": suite.source,
        "base_model": base, "cache": str(cache.dir), "merge_tasks": tasks, "held_out": held,
        "test_sizes": {t: len(suite.task(t).split("test")) for t in tasks}, "methods": methods, "seed": seed,
        "mergelab_version": __version__, "settings": asdict(settings), "seconds": 0.0, "complete": False,
        "protocol": ("routed models built from the prepared experts, saved, reloaded with mergelab.routed.load and "
                     "evaluated on the test splits with each task's own expert head; routers taught on validation "
                     "inputs (test inputs only for the row marked test-time adaptation); held-out tasks not scored"),
        "rows": rows,
    }
    return _run_methods(bench, methods, out, report, start)


def run_routed_llmmix(methods: Sequence[str], out: Path, size: str = "3m", root: Optional[Path] = None,
                      merge_tasks: Optional[Sequence[str]] = None, eval_limit: Optional[int] = 100, seed: int = 0,
                      settings: RoutedSettings = RoutedSettings(), references: bool = True,
                      log: Callable[[str], None] = print, sizes: Optional[dict] = None) -> dict:
    """The routed ``methods`` on ``llmmix``'s prepared causal-LM experts (``ROOT/experts-SIZE``, as
    ``bench run --suite llmmix``), evaluated on the first ``eval_limit`` test examples per task
    (``sizes``: the task split sizes the experts were prepared with, default the built-in ones)."""
    import json

    from mergelab import __version__
    from mergelab.llmmix.prepare import experts_folder
    from mergelab.llmmix.pretrain import base_folder, default_root
    from mergelab.llmmix.run import prepared_tasks
    from mergelab.llmmix.tasks import build_task, get_spec

    out = Path(out)
    methods = _check(methods, out, settings)
    if eval_limit is not None and eval_limit < 1:
        raise MergeLabError(f"--eval-limit must be >= 1, got {eval_limit}")
    root = Path(root) if root else default_root()
    folder = experts_folder(root, size, 0)
    if not (folder / "prepare.json").is_file():
        raise MergeLabError(f"{folder}: no prepared llmmix experts (run `mergelab bench prepare --suite llmmix "
                            f"--size {size}`)")
    prep = json.loads((folder / "prepare.json").read_text(encoding="utf-8"))
    base_dir = Path(prep["base"]) if prep.get("base") else base_folder(size, root)
    prepared = prepared_tasks(prep)
    names = list(merge_tasks) if merge_tasks else prepared
    unknown = [n for n in names if n not in prepared]
    if unknown:
        raise MergeLabError(f"--tasks: no prepared expert for {', '.join(unknown)} in {folder} "
                            f"(prepared: {', '.join(prepared)})")
    bad = [n for n in names if get_spec(n).held_out]
    if bad:
        raise MergeLabError(f"--tasks: {', '.join(bad)} held out (no expert may see a held-out task)")
    if len(names) < 2:
        raise MergeLabError(f"a routed model needs at least 2 merged tasks; got {names}")
    start = time.perf_counter()
    tasks = [build_task(n, seed=0, sizes=sizes) for n in names]
    bench = LlmRoutedBench(tasks, out, base_dir, folder, eval_limit, seed, settings, log)
    (out / "models").mkdir(parents=True, exist_ok=True)
    report = {
        "suite": "llmmix", "suite_fingerprint": "+".join(t.fingerprint()[:8] for t in tasks),
        "suite_source": "mergelab.llmmix.tasks", "base_model": str(base_dir), "cache": str(folder),
        "merge_tasks": names, "held_out": [],
        "test_sizes": {t.name: len(t.split("test")[:eval_limit] if eval_limit else t.split("test")) for t in tasks},
        "eval_limit": eval_limit, "methods": methods, "seed": seed, "mergelab_version": __version__,
        "settings": asdict(settings), "seconds": 0.0, "complete": False,
        "protocol": ("routed causal LMs built from the prepared experts, saved, reloaded with mergelab.routed.load; "
                     "greedy exact match (or pass@1) on the first eval_limit test examples of each task (the "
                     "experts' reference on the same examples); routers read the prompts of the validation "
                     "splits (the test prompts only for the row marked test-time adaptation) and route each "
                     "generation on its prompt; EMR is given the task id"),
        "rows": bench.references() if references else [],
    }
    return _run_methods(bench, methods, out, report, start)
