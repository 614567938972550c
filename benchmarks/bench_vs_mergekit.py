#!/usr/bin/env python
"""Wall time and peak memory of ``mergelab merge`` against ``mergekit-yaml`` (0.1.5) on the same recipes.

What it does, in one run:

1. Writes synthetic Llama checkpoints (base + 3 experts) with :func:`mergelab.synthetic.make_llama_family`
   into ``--workdir`` (default ``bench-out/``, git-ignored) and reuses them on later runs.
   The default size (``156m``) is hidden 1024, 8 layers, intermediate 2816, vocab 32000, bf16.
2. Writes one recipe YAML per method, in mergekit's format, and gives the *same file* to both tools.
3. Runs each tool as a separate process, ``--runs`` times per method (median reported), alternating
   which tool goes first so that slow drift of the machine's load hits both alike. Each process's
   wall time is taken around the process (interpreter start and imports included, as a user sees it)
   and its peak resident memory is the ``ru_maxrss`` that the kernel reports for that child when it
   is reaped: the high-water mark of the merge process itself (measured from a tiny wrapper process,
   see ``_MEASURE``, because a child forked from a large process inherits its high-water mark).
4. Prints a table of medians, spreads (min-max) and ratios (mergekit / mergelab), writes it to
   ``<workdir>/results-<time>.json`` and ``.md``, and removes every output right after its run.

``--sizes llmmix-3m`` merges the llmmix suite's really trained ``3m`` base and three of its experts
(``mergelab bench prepare --suite llmmix`` makes them) instead of synthetic checkpoints.

``--sizes 156m,156m-2xlayers`` also merges a second, larger model (twice the layers, same largest
tensor) to show that mergelab's peak memory follows the largest tensor, not the model size.

Both tools use their default shard size, 5e9 bytes (mergelab ``--shard-size 5GB``, mergekit
``--out-shard-size 5B``, which mergekit compares against bytes); the flags are passed explicitly.
mergekit keeps a whole output shard in memory before writing it; mergelab writes each tensor in place.

mergekit is found through ``--mergekit-yaml``, else the ``MERGEKIT_YAML`` or ``MERGEKIT_PYTHON``
environment variable, else ``.venv-mergekit/`` in the repository (``benchmarks/setup_mergekit_venv.sh``).

Example (about 10 minutes on 2 cores)::

    bash benchmarks/setup_mergekit_venv.sh
    .venv/bin/python benchmarks/bench_vs_mergekit.py --runs 3 --sizes 156m,156m-2xlayers
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

REPO = Path(__file__).resolve().parent.parent

# name -> make_llama_family arguments. "156m" is the size of the issue (about 159.9M parameters with
# 4 attention heads and 2 key/value heads, the make_llama_family defaults).
SIZES: Dict[str, dict] = {
    "156m": dict(hidden=1024, layers=8, intermediate=2816, vocab=32000),
    "156m-2xlayers": dict(hidden=1024, layers=16, intermediate=2816, vocab=32000),
    "156m-2xhidden": dict(hidden=2048, layers=8, intermediate=5632, vocab=32000),
    "tiny": dict(hidden=128, layers=2, intermediate=256, vocab=1000),  # for checking the script itself
}
METHODS = ("linear", "task_arithmetic", "ties", "dare_ties", "dare_linear", "breadcrumbs", "breadcrumbs_ties",
           "della", "della_linear", "sce", "model_stock", "multislerp", "karcher", "nuslerp", "slerp", "nearswap",
           "arcee_fusion", "passthrough", "ram", "ramplus_tl")
# Methods mergekit does not have: timed with mergelab alone on the same checkpoints (``--methods papers``).
MERGELAB_ONLY = ("pcb", "widen", "lines", "tsv", "varm", "mwa", "ota", "doge_ta", "ramplus")
# How each method's recipe is built (the same file for both tools): which inputs it takes ("all": base
# and every expert; "experts": the experts without a base; "pair": the base and the first expert;
# "two": the first two experts), per-model parameters besides the weight, and global parameters.
RECIPE_SHAPE: Dict[str, dict] = {
    "linear": dict(inputs="experts"),
    "task_arithmetic": dict(inputs="all"),
    "ties": dict(inputs="all", model={"density": 0.5}),
    "dare_ties": dict(inputs="all", model={"density": 0.5}),
    "dare_linear": dict(inputs="all", model={"density": 0.5}),
    "breadcrumbs": dict(inputs="all", model={"density": 0.5, "gamma": 0.01}),
    "breadcrumbs_ties": dict(inputs="all", model={"density": 0.5, "gamma": 0.01}),
    "della": dict(inputs="all", model={"density": 0.5, "epsilon": 0.1}),
    "della_linear": dict(inputs="all", model={"density": 0.5, "epsilon": 0.1}),
    "sce": dict(inputs="all", weights=False, globals={"select_topk": 0.5}),
    "model_stock": dict(inputs="all", weights=False),
    "multislerp": dict(inputs="experts"),
    "karcher": dict(inputs="experts", weights=False),
    "nuslerp": dict(inputs="two"),
    "slerp": dict(inputs="pair", weights=False, globals={"t": 0.5}),
    "nearswap": dict(inputs="pair", weights=False, globals={"t": 0.001}),
    "arcee_fusion": dict(inputs="pair", weights=False),
    "passthrough": dict(inputs="slices"),
    "ram": dict(inputs="all", weights=False),
    "ramplus_tl": dict(inputs="all", weights=False),
    "ramplus": dict(inputs="all", weights=False),
    "pcb": dict(inputs="all", globals={"ratio": 0.1}),
    "widen": dict(inputs="all", weights=False),
    "lines": dict(inputs="pair", weights=False, globals={"alpha": 0.5}),
    "tsv": dict(inputs="all"),
    "varm": dict(inputs="all", weights=False),
    "mwa": dict(inputs="experts", weights=False, per_model={"loss": [0.9, 0.8, 0.7]}),
    "ota": dict(inputs="all", weights=False, per_model={"second_moments": "moments"}),
    "doge_ta": dict(inputs="all", weights=False),
}
# Targets of the issue: minimum speed-up (mergekit time / mergelab time) per method; peak memory of
# mergelab at most half of mergekit's everywhere.
SPEED_TARGETS = {"ties": 5.0, "dare_ties": 4.0, "linear": 2.5, "task_arithmetic": 2.5}
MEMORY_TARGET = 0.5
SHARD_BYTES = 5_000_000_000
TOOLS = ("mergelab", "mergekit")


# --------------------------------------------------------------------------- inputs
def model_folders(workdir: Path, size: str, experts: int = 3) -> List[Path]:
    root = workdir / "models" / size
    return [root / "base"] + [root / f"expert_{i}" for i in range(experts)]


LLMMIX_TASKS = ("string_ops", "list_ops", "arithmetic")  # the trained experts merged for an llmmix-SIZE size


def llmmix_models(size: str) -> List[Path]:
    """The really trained llmmix base and experts of ``llmmix-SIZE`` (``mergelab bench prepare --suite
    llmmix --size SIZE`` made them; float32, tied embeddings): trained task vectors, not synthetic ones."""
    from mergelab.llmmix.pretrain import default_root

    root = default_root()
    tag = size.split("-", 1)[1]
    folders = [root / f"base-{tag}" / "final"] + [root / f"experts-{tag}" / t / "final" for t in LLMMIX_TASKS]
    missing = [f for f in folders if not (f / "model.safetensors").is_file()]
    if missing:
        raise SystemExit(f"--sizes {size}: {missing[0]} is missing; run `mergelab bench prepare --suite llmmix "
                         f"--size {tag}` first")
    return folders


def llmmix_layers(folder: Path) -> int:
    return json.loads((folder / "config.json").read_text())["num_hidden_layers"]


def ensure_models(workdir: Path, size: str, seed: int = 0, experts: int = 3) -> List[Path]:
    """Synthetic bf16 checkpoints of ``size`` under ``workdir/models/size``, made once and reused
    (``llmmix-SIZE``: the llmmix suite's trained base and experts, see :func:`llmmix_models`).

    A ``.complete`` file records the arguments; a folder without it (or with other arguments) is
    written again, so an interrupted generation is never mistaken for a finished one.
    """
    if size.startswith("llmmix-"):
        return llmmix_models(size)
    spec = dict(SIZES[size], experts=experts, dtype="bfloat16", seed=seed)
    root = workdir / "models" / size
    marker = root / ".complete"
    if marker.exists() and json.loads(marker.read_text()) == spec:
        return model_folders(workdir, size, experts)
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    print(f"writing synthetic checkpoints '{size}' {spec} to {root} ...", flush=True)
    t = time.perf_counter()
    # In a child process, so that this script stays small (see _MEASURE) and frees the memory at once.
    code = (f"from pathlib import Path; from mergelab.synthetic import make_llama_family; "
            f"make_llama_family(Path({str(root)!r}), **{spec!r})")
    subprocess.run([sys.executable, "-c", code], check=True)
    marker.write_text(json.dumps(spec))
    print(f"  done in {time.perf_counter() - t:.0f} s", flush=True)
    return model_folders(workdir, size, experts)


def parameter_count(folder: Path) -> int:
    from safetensors import safe_open

    n = 0
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as st:
            for k in st.keys():
                count = 1
                for s in st.get_slice(k).get_shape():
                    count *= s
                n += count
    return n


def second_moments_path(model: Path) -> Path:
    return model.parent / f"{model.name}-exp_avg_sq.safetensors"


def ensure_second_moments(folders: Sequence[Path]) -> None:
    """Adam second moments for each expert (for OTA), made once: ``(0.1 * (expert - base))^2 + 1e-12``
    per tensor in float32, a stand-in with the shape and scale of a fine-tuning run's ``exp_avg_sq``."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    base = folders[0]
    for expert in folders[1:]:
        target = second_moments_path(expert)
        if target.exists():
            continue
        out = {}
        for f in sorted(expert.glob("*.safetensors")):
            with safe_open(str(f), framework="pt") as e, safe_open(str(base / f.name), framework="pt") as b:
                for k in e.keys():
                    d = e.get_tensor(k).float() - b.get_tensor(k).float()
                    out[k] = (0.1 * d).square_().add_(1e-12)
        partial = target.with_name(target.name + ".partial")
        save_file(out, str(partial))
        partial.replace(target)


def warm_page_cache(folders: Sequence[Path]) -> None:
    """Read every input file once so that both tools start from the same (warm) page cache."""
    for folder in folders:
        for f in sorted(folder.glob("*.safetensors")):
            with open(f, "rb") as fh:
                while fh.read(1 << 24):
                    pass


# --------------------------------------------------------------------------- recipes
def recipe_text(method: str, folders: Sequence[Path], dtype: str, layers: int = 8) -> str:
    """A mergekit-format recipe for ``method`` over ``folders`` (base first), identical for both tools."""
    base, experts = folders[0], folders[1:]
    shape = RECIPE_SHAPE[method]
    lines = [f"merge_method: {method}"]
    if shape["inputs"] == "slices":  # layer stacking: all of the base, then the top half of an expert
        lines += ["slices:",
                  f"  - sources: [{{model: {base}, layer_range: [0, {layers}]}}]",
                  f"  - sources: [{{model: {experts[0]}, layer_range: [{layers // 2}, {layers}]}}]",
                  f"dtype: {dtype}"]
        return "\n".join(lines) + "\n"
    if shape["inputs"] in ("all", "pair"):
        lines.append(f"base_model: {base}")
    members = {"all": experts, "experts": experts, "two": experts[:2], "pair": experts[:1]}[shape["inputs"]]
    weights = {"two": [0.5, 0.5]}.get(shape["inputs"], [0.5, 0.3, 0.2, 0.1, 0.1])
    lines.append("models:")
    for k, (path, w) in enumerate(zip(members, weights)):
        params = {"weight": w} if shape.get("weights", True) else {}
        params.update(shape.get("model", {}))
        for key, values in shape.get("per_model", {}).items():
            params[key] = second_moments_path(path) if values == "moments" else values[k]
        inner = ", ".join(f"{k}: {v}" for k, v in params.items())
        lines.append(f"  - model: {path}")
        if inner:
            lines.append(f"    parameters: {{{inner}}}")
    if shape.get("globals"):
        lines.append("parameters: {" + ", ".join(f"{k}: {v}" for k, v in shape["globals"].items()) + "}")
    lines.append(f"dtype: {dtype}")
    return "\n".join(lines) + "\n"


def write_recipes(workdir: Path, size: str, folders: Sequence[Path], methods: Sequence[str], dtype: str) -> Dict[str, Path]:
    out = {}
    layers = llmmix_layers(folders[0]) if size.startswith("llmmix-") else SIZES[size]["layers"]
    rdir = workdir / "recipes"
    rdir.mkdir(parents=True, exist_ok=True)
    for m in methods:
        p = rdir / f"{size}-{m}-{dtype}.yml"
        p.write_text(recipe_text(m, folders, dtype, layers))
        out[m] = p
    return out


# --------------------------------------------------------------------------- tools
def find_mergekit_yaml(explicit: Optional[str]) -> Path:
    """The ``mergekit-yaml`` executable, from the flag, the environment, or ``.venv-mergekit``."""
    candidates = []
    if explicit:
        candidates.append(Path(explicit))
    if os.environ.get("MERGEKIT_YAML"):
        candidates.append(Path(os.environ["MERGEKIT_YAML"]))
    if os.environ.get("MERGEKIT_PYTHON"):
        candidates.append(Path(os.environ["MERGEKIT_PYTHON"]).parent / "mergekit-yaml")
    candidates.append(REPO / ".venv-mergekit" / "bin" / "mergekit-yaml")
    for c in candidates:
        if c.is_file() and os.access(c, os.X_OK):
            return c
    raise SystemExit(
        "mergekit-yaml not found (tried: " + ", ".join(str(c) for c in candidates) + "). Create its venv with "
        "`bash benchmarks/setup_mergekit_venv.sh`, or set MERGEKIT_YAML / MERGEKIT_PYTHON, or pass --mergekit-yaml."
    )


def mergelab_command() -> List[str]:
    exe = Path(sys.executable).parent / "mergelab"
    return [str(exe)] if exe.is_file() else [sys.executable, "-m", "mergelab.cli"]


def command(tool: str, recipe: Path, out: Path, mergekit_yaml: Path, device: str) -> List[str]:
    if tool == "mergelab":
        return mergelab_command() + ["merge", str(recipe), "-o", str(out), "--quiet", "--shard-size",
                                     str(SHARD_BYTES), "--device", device]
    cmd = [str(mergekit_yaml), str(recipe), str(out), "--out-shard-size", "5B", "--quiet"]
    if device != "cpu":
        cmd += ["--device", device]
    return cmd


@dataclass
class Run:
    tool: str
    method: str
    size: str
    seconds: float
    peak_rss_bytes: int
    returncode: int
    output_bytes: int = 0
    cpu_seconds: float = 0.0  # user + system time of the merge process


# Runs one command and reports its wall time and peak RSS. It is a separate, small process on purpose:
# a child's ru_maxrss also counts the memory of the process it was forked from (Linux records the
# high-water mark of the old address space at exec), so measuring straight from this script, which
# may hold hundreds of MB, would overstate small merges. Forked from this ~10 MB wrapper instead,
# the child's ru_maxrss is its own peak.
_MEASURE = r"""
import json, os, resource, sys, time
out, cmd = sys.argv[1], sys.argv[2:]
t = time.perf_counter()
pid = os.posix_spawn(cmd[0], cmd, os.environ)
_, status = os.waitpid(pid, 0)
seconds = time.perf_counter() - t
usage = resource.getrusage(resource.RUSAGE_CHILDREN)
with open(out, "w") as f:
    json.dump({"seconds": seconds, "maxrss": usage.ru_maxrss, "cpu": usage.ru_utime + usage.ru_stime,
               "exit": os.waitstatus_to_exitcode(status)}, f)
"""


def measure(cmd: Sequence[str], log: Path, cwd: Path) -> tuple:
    """(wall seconds, peak RSS bytes, exit code, CPU seconds) of ``cmd``, with its output in ``log``."""
    result = log.with_suffix(".measure.json")
    with open(log, "w") as fh:
        fh.write(" ".join(cmd) + "\n")
        fh.flush()
        subprocess.run([sys.executable, "-I", "-S", "-c", _MEASURE, str(result)] + list(cmd),
                       stdout=fh, stderr=subprocess.STDOUT, cwd=str(cwd), check=True)
    data = json.loads(result.read_text())
    result.unlink()
    unit = 1 if sys.platform == "darwin" else 1024
    return data["seconds"], data["maxrss"] * unit, data["exit"], data["cpu"]


def run_once(tool: str, method: str, size: str, recipe: Path, workdir: Path, mergekit_yaml: Path,
             device: str) -> Run:
    """Run one merge in a fresh process: its wall time and its own peak RSS. The output is removed."""
    out = workdir / "out" / f"{tool}-{size}-{method}"
    for p in (out, out.with_name(out.name + ".partial")):
        shutil.rmtree(p, ignore_errors=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    log = workdir / "logs" / f"{tool}-{size}-{method}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    seconds, peak, code, cpu = measure(command(tool, recipe, out, mergekit_yaml, device), log, workdir)
    size_bytes = sum(f.stat().st_size for f in out.glob("*.safetensors")) if out.exists() else 0
    shutil.rmtree(out, ignore_errors=True)
    if code != 0:
        tail = log.read_text()[-3000:]
        raise SystemExit(f"{tool} failed on {recipe} (exit {code}); log {log}:\n{tail}")
    if size_bytes == 0:
        raise SystemExit(f"{tool} wrote no safetensors for {recipe}; log {log}")
    return Run(tool, method, size, seconds, peak, code, size_bytes, cpu)


# --------------------------------------------------------------------------- reporting
@dataclass
class Cell:
    """The runs of one tool on one method and size."""

    seconds: List[float] = field(default_factory=list)
    peak: List[int] = field(default_factory=list)
    cpu: List[float] = field(default_factory=list)

    @property
    def t(self) -> float:
        return statistics.median(self.seconds)

    @property
    def m(self) -> float:
        return statistics.median(self.peak)

    @property
    def c(self) -> float:
        return statistics.median(self.cpu)

    def spread(self) -> str:
        return f"{min(self.seconds):.1f}-{max(self.seconds):.1f}"

    def mem_spread(self) -> str:
        return f"{min(self.peak) / 1e9:.2f}-{max(self.peak) / 1e9:.2f}"


def gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB"


def table(cells: Dict[tuple, Cell], methods: Sequence[str], size: str) -> List[str]:
    rows = [
        "| method | mergelab time (s) | mergekit time (s) | speed-up | target | CPU s mergelab / mergekit (ratio) | mergelab peak | mergekit peak | memory ratio | met |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for m in methods:
        a, b = cells.get(("mergelab", m, size)), cells.get(("mergekit", m, size))
        if not a or not b:
            continue
        speed = b.t / a.t
        mem = a.m / b.m
        target = SPEED_TARGETS.get(m)
        ok = (target is None or speed >= target) and mem <= MEMORY_TARGET
        rows.append(
            f"| {m} | {a.t:.2f} ({a.spread()}) | {b.t:.2f} ({b.spread()}) | {speed:.1f}x | "
            f"{'>= %.1fx' % target if target else '-'} | {a.c:.1f} / {b.c:.1f} ({b.c / a.c:.1f}x) | "
            f"{gb(a.m)} ({a.mem_spread()}) | {gb(b.m)} ({b.mem_spread()}) | "
            f"{mem:.2f} | {'yes' if ok else 'NO'} |"
        )
    return rows


def size_table(cells: Dict[tuple, Cell], methods: Sequence[str], sizes: Sequence[str], params: Dict[str, int]) -> List[str]:
    rows = ["| tool | method | " + " | ".join(f"{s} ({params[s] / 1e6:.0f}M params): time, peak" for s in sizes) + " |",
            "|---|---|" + "---|" * len(sizes)]
    for tool in TOOLS:
        for m in methods:
            cs = [cells.get((tool, m, s)) for s in sizes]
            if sum(c is not None for c in cs) < 2:
                continue
            rows.append(f"| {tool} | {m} | " + " | ".join(
                f"{c.t:.1f} s, {gb(c.m)}" if c else "-" for c in cs) + " |")
    return rows


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = ""
    try:
        import psutil

        mem = f", {psutil.virtual_memory().total / 2**30:.0f} GiB RAM"
    except ImportError:
        pass
    return f"{os.cpu_count()} cores ({cpu}){mem}, {platform.system()} {platform.release()}"


def versions(mergekit_yaml: Path) -> dict:
    import torch

    import mergelab

    py = mergekit_yaml.parent / "python"
    mk = subprocess.run([str(py), "-c", "from importlib.metadata import version as v; import torch; "
                         "print(v('mergekit'), torch.__version__)"], capture_output=True, text=True)
    mk_version, mk_torch = (mk.stdout.split() + ["?", "?"])[:2]
    return {"mergelab": mergelab.__version__, "mergelab_torch": torch.__version__,
            "mergekit": mk_version, "mergekit_torch": mk_torch, "python": platform.python_version()}


# --------------------------------------------------------------------------- main
def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", default="linear,task_arithmetic,ties,dare_ties",
                    help=f"comma-separated, from {', '.join(METHODS + MERGELAB_ONLY)}; 'all' for every "
                         f"mergekit method, 'papers' for every mergelab-only one (timed without mergekit)")
    ap.add_argument("--runs", type=int, default=3, help="runs per tool and method; the median is reported")
    ap.add_argument("--sizes", default="156m",
                    help=f"comma-separated model sizes; the first is compared with mergekit, the others are "
                         f"run with --size-tools only (to show memory vs model size). Known: {', '.join(SIZES)}, and "
                         f"llmmix-SIZE (the llmmix suite's trained experts, e.g. llmmix-3m)")
    ap.add_argument("--size-tools", default="mergelab", help="tools run on the extra sizes: mergelab or mergelab,mergekit")
    ap.add_argument("--size-methods", default=None, help="methods run on the extra sizes (default: all of --methods)")
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"),
                    help="the recipe's dtype: (bfloat16 as a user would; float32 makes mergekit compute in float32)")
    ap.add_argument("--tools", default="mergelab,mergekit", help="which tools to run on the first size")
    ap.add_argument("--workdir", type=Path, default=REPO / "bench-out", help="checkpoints, recipes, logs, results")
    ap.add_argument("--mergekit-yaml", default=None, help="path to mergekit-yaml (else MERGEKIT_YAML / MERGEKIT_PYTHON)")
    ap.add_argument("--device", default="cpu", help="compute device for both tools")
    ap.add_argument("--no-warm", action="store_true", help="do not read the inputs once before timing")
    args = ap.parse_args(argv)

    groups = {"all": list(METHODS), "papers": list(MERGELAB_ONLY)}
    methods = [m for part in args.methods.split(",") if part.strip() for m in groups.get(part.strip(), [part.strip()])]
    sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
    for m in methods:
        if m not in METHODS + MERGELAB_ONLY:
            ap.error(f"unknown method '{m}'; known: {', '.join(METHODS + MERGELAB_ONLY)}")
    for s in sizes:
        if s not in SIZES and not s.startswith("llmmix-"):
            ap.error(f"unknown size '{s}'; known: {', '.join(SIZES)}")
    tools = [t.strip() for t in args.tools.split(",") if t.strip()]
    size_tools = [t.strip() for t in args.size_tools.split(",") if t.strip()]
    size_methods = methods if not args.size_methods else [m.strip() for m in args.size_methods.split(",") if m.strip()]
    if args.runs < 1:
        ap.error("--runs must be at least 1")
    workdir = args.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    mergekit_yaml = find_mergekit_yaml(args.mergekit_yaml) if "mergekit" in tools + size_tools else Path("?")

    # (tool, method, size) -> Cell, and the order of the runs.
    plan: List[tuple] = []
    recipes: Dict[tuple, Path] = {}
    params: Dict[str, int] = {}
    for k, size in enumerate(sizes):
        folders = ensure_models(workdir, size)
        params[size] = parameter_count(folders[0])
        these = methods if k == 0 else size_methods
        for m, p in write_recipes(workdir, size, folders, these, args.dtype).items():
            recipes[(m, size)] = p
        if "ota" in these:
            ensure_second_moments(folders)
        for m in these:
            run_tools = tools if k == 0 else size_tools
            if m in MERGELAB_ONLY:
                run_tools = [t for t in run_tools if t == "mergelab"]
            plan.append((m, size, run_tools))
        if not args.no_warm:
            warm_page_cache(folders)

    started = _dt.datetime.now()
    load_before = os.getloadavg()
    cells: Dict[tuple, Cell] = {}
    runs: List[Run] = []
    print(f"{len(plan)} method/size pairs x {args.runs} runs; machine: {machine()}; load {load_before[0]:.2f}", flush=True)
    for r in range(args.runs):
        for m, size, these_tools in plan:
            order = list(these_tools) if r % 2 == 0 else list(reversed(these_tools))
            for tool in order:
                run = run_once(tool, m, size, recipes[(m, size)], workdir, mergekit_yaml, args.device)
                runs.append(run)
                cell = cells.setdefault((tool, m, size), Cell())
                cell.seconds.append(run.seconds)
                cell.peak.append(run.peak_rss_bytes)
                cell.cpu.append(run.cpu_seconds)
                print(f"  run {r + 1}/{args.runs} {size:>14} {m:>16} {tool:>8}: {run.seconds:7.2f} s  "
                      f"cpu {run.cpu_seconds:6.1f} s  peak {gb(run.peak_rss_bytes)}  (load {os.getloadavg()[0]:.2f})",
                      flush=True)
    load_after = os.getloadavg()

    info = {
        "date": started.isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, "benchmarks/bench_vs_mergekit.py"] + list(argv or sys.argv[1:])),
        "machine": machine(),
        "versions": versions(mergekit_yaml) if "mergekit" in tools + size_tools else {},
        "load_average_1min": [round(load_before[0], 2), round(load_after[0], 2)],
        "dtype": args.dtype,
        "shard_bytes": SHARD_BYTES,
        "parameters": params,
        "runs": [asdict(r) for r in runs],
    }
    lines = [
        f"Date: {info['date']}; machine: {info['machine']}; {args.runs} runs per cell (median, min-max in brackets); "
        f"recipe dtype {args.dtype}; load average (1 min) {load_before[0]:.2f} before, {load_after[0]:.2f} after.",
        f"Versions: {info['versions']}",
        "",
        f"Model '{sizes[0]}': base + 3 experts, {params[sizes[0]] / 1e6:.1f}M parameters each. "
        f"Speed-up = mergekit time / mergelab time (medians of wall time); CPU s = user + system seconds of "
        f"the merge process (less sensitive to other load on the machine); memory ratio = mergelab peak RSS / "
        f"mergekit peak RSS (target <= {MEMORY_TARGET}).",
        "",
    ] + (table(cells, methods, sizes[0]) if any(("mergekit", m, sizes[0]) in cells for m in methods) else [])
    only = [m for m in methods if m in MERGELAB_ONLY and ("mergelab", m, sizes[0]) in cells]
    if only:
        lines += ["", "Methods mergekit does not have (mergelab alone, same checkpoints):", "",
                  "| method | mergelab time (s) | CPU s | peak |", "|---|---|---|---|"]
        for m in only:
            c = cells[("mergelab", m, sizes[0])]
            lines.append(f"| {m} | {c.t:.2f} ({c.spread()}) | {c.c:.1f} | {gb(c.m)} ({c.mem_spread()}) |")
    if len(sizes) > 1:
        lines += ["", "Peak memory against model size (the largest tensor, the 32000 x hidden embedding, is "
                  "the same size in the first two):", ""] + size_table(cells, methods, sizes, params)
    text = "\n".join(lines)
    print()
    print(text)
    stamp = started.strftime("%Y%m%d-%H%M%S")
    (workdir / f"results-{stamp}.json").write_text(json.dumps(info, indent=2))
    (workdir / f"results-{stamp}.md").write_text(text + "\n")
    print(f"\nresults: {workdir / f'results-{stamp}.json'} and .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
