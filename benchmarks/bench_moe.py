#!/usr/bin/env python
"""Wall time and peak memory of ``mergelab moe`` against ``mergekit-moe`` (0.1.5) on the same config files.

What it does, in one run:

1. Writes a synthetic Llama base and ``--experts`` experts (:func:`mergelab.synthetic.make_llama_family`,
   bf16) plus a small byte-level BPE tokenizer into ``--workdir`` (default ``bench-out/moe``), reused later.
   Default size: hidden 512, 8 layers, intermediate 1408, vocab 32000 (about 50 M parameters per model).
   ``--arch qwen2`` turns that family into Qwen2 models (seeded q/k/v biases added; output Qwen2-MoE with
   the base as its shared expert, which is what mergekit-moe 0.1.5 can read) and ``--arch qwen3`` into
   Qwen3 models (seeded q/k norms added; output Qwen3-MoE).
2. Writes one mergekit-moe YAML per gate mode (``hidden``, ``cheap_embed``), four prompts per expert, and
   gives the *same file* to both tools.
3. Runs each tool as its own process, ``--runs`` times per mode (median reported), alternating which goes
   first; wall time around the process and its own peak RSS (``ru_maxrss`` of the reaped child, measured
   from a tiny wrapper: ``bench_vs_mergekit.measure``), and its CPU time (user + system), which moves less
   with the machine's load. mergelab runs with ``--no-routing-report`` (mergekit
   has no such check) and once more with it, reported on its own row.
4. Checks that both outputs have the same tensors (bit for bit; mergekit's per-expert Qwen2-MoE tensors are
   packed as transformers packs them on load first), prints a table with ratios (mergekit / mergelab) and
   writes it to ``<workdir>/results-<time>.json``. ``--no-report-row`` skips the run with the routing report.

Example (a few minutes on 2 cores)::

    .venv/bin/python benchmarks/bench_moe.py --runs 3
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_vs_mergekit import REPO, measure, mergelab_command  # noqa: E402

PROMPTS = {
    0: ["What is 17 + 25?", "Compute 3 * 14 - 5.", "How much is 120 / 8?", "Add 45 and 99."],
    1: ["Reverse the string 'hello'.", "Write 'kitten' in capital letters.", "Sort the letters of 'banana'.",
        "Count the vowels in 'education'."],
    2: ["What does print(len('abc')) output?", "def f(x): return x * 2\nprint(f(4))",
        "for i in range(3): print(i)", "x = [1, 2]; x.append(3); print(x)"],
    3: ["Translate 'bonjour' to English.", "What is the German word for dog?", "Say 'thank you' in Spanish.",
        "How do you write 'cat' in French?"],
}


def make_models(workdir: Path, experts: int, hidden: int, layers: int, intermediate: int, vocab: int) -> list:
    spec = dict(experts=experts, hidden=hidden, layers=layers, intermediate=intermediate, vocab=vocab,
                dtype="bfloat16")
    root = workdir / "models"
    marker = root / "spec.json"
    paths = [root / "base"] + [root / f"expert_{i}" for i in range(experts)]
    if marker.is_file() and json.loads(marker.read_text()) == spec:
        return paths
    shutil.rmtree(root, ignore_errors=True)
    print(f"writing synthetic models {spec} ...", flush=True)
    code = (f"from pathlib import Path; from mergelab.synthetic import make_llama_family; "
            f"make_llama_family(Path({str(root)!r}), **{spec!r})")
    subprocess.run([sys.executable, "-c", code], check=True)
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator([p for ps in PROMPTS.values() for p in ps] * 4,
                           trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "<s>", "</s>"],
                                               initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                               show_progress=False))
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    for p in paths:
        tok.save_pretrained(p)
        cfg = json.loads((p / "config.json").read_text())
        cfg.update(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
        (p / "config.json").write_text(json.dumps(cfg, indent=2))
    marker.write_text(json.dumps(spec))
    return paths


def convert_family(paths: list, arch: str, seed: int = 0) -> None:
    """Turn the synthetic Llama folders into ``arch`` ("qwen2", "qwen3") models in place: config of that
    model type, plus seeded q/k/v biases (Qwen2) or q/k RMSNorm weights (Qwen3), different per model."""
    import torch
    from safetensors.torch import load_file, save_file

    for i, p in enumerate(paths):
        cfg = json.loads((p / "config.json").read_text())
        if cfg["model_type"] == arch:
            continue
        H, heads, kv = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
        hd = H // heads
        files = sorted(p.glob("*.safetensors"))
        tensors = {}
        for f in files:
            tensors.update(load_file(str(f)))
        dtype = tensors["model.embed_tokens.weight"].dtype
        g = torch.Generator().manual_seed(seed * 1000 + i)
        for l in range(cfg["num_hidden_layers"]):
            pre = f"model.layers.{l}.self_attn."
            if arch == "qwen2":
                for name, n in (("q_proj", heads * hd), ("k_proj", kv * hd), ("v_proj", kv * hd)):
                    tensors[pre + name + ".bias"] = (0.1 * torch.randn(n, generator=g)).to(dtype)
            else:
                for name in ("q_norm", "k_norm"):
                    tensors[pre + name + ".weight"] = (1 + 0.05 * torch.randn(hd, generator=g)).to(dtype)
        for f in files:
            f.unlink()
        (p / "model.safetensors.index.json").unlink(missing_ok=True)
        save_file(tensors, str(p / "model.safetensors"))
        cfg.update(architectures=["Qwen2ForCausalLM" if arch == "qwen2" else "Qwen3ForCausalLM"], model_type=arch)
        if arch == "qwen3":
            cfg.update(head_dim=hd, attention_bias=False)
        (p / "config.json").write_text(json.dumps(cfg, indent=2))


def folder_tensors(folder: Path) -> dict:
    """A folder's tensors, mergekit's per-expert Qwen2-MoE layout packed as mergelab writes it
    (:func:`mergelab.moe.build.pack_per_expert`)."""
    from safetensors.torch import load_file

    from mergelab.moe.build import pack_per_expert

    tensors = {}
    for f in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(str(f)))
    return pack_per_expert(tensors)


def find_mergekit_moe() -> Path:
    candidates = []
    if os.environ.get("MERGEKIT_PYTHON"):
        candidates.append(Path(os.environ["MERGEKIT_PYTHON"]).parent / "mergekit-moe")
    candidates.append(REPO / ".venv-mergekit" / "bin" / "mergekit-moe")
    for c in candidates:
        if c.is_file():
            return c
    raise SystemExit("mergekit-moe not found (tried: " + ", ".join(map(str, candidates)) + "); run "
                     "benchmarks/setup_mergekit_venv.sh or set MERGEKIT_PYTHON")


def same_tensors(a: Path, b: Path) -> bool:
    import torch

    x, y = folder_tensors(a), folder_tensors(b)
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workdir", default=str(REPO / "bench-out" / "moe"))
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--experts", type=int, default=4, choices=[2, 3, 4])
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--intermediate", type=int, default=1408)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--modes", default="hidden,cheap_embed")
    ap.add_argument("--arch", default="llama", choices=["llama", "qwen2", "qwen3"],
                    help="input models (output: Mixtral, Qwen2-MoE with a shared expert, Qwen3-MoE)")
    ap.add_argument("--no-report-row", action="store_true", help="skip mergelab's run with the routing report")
    args = ap.parse_args()
    workdir = Path(args.workdir).resolve()
    if args.arch != "llama":
        workdir = workdir / args.arch
    workdir.mkdir(parents=True, exist_ok=True)
    paths = make_models(workdir, args.experts, args.hidden, args.layers, args.intermediate, args.vocab)
    if args.arch != "llama":
        convert_family(paths, args.arch)
    mk = find_mergekit_moe()
    rows = []
    for mode in args.modes.split(","):
        cfg = {"base_model": str(paths[0]), "gate_mode": mode, "dtype": "bfloat16", "experts_per_token": 2,
               "experts": [{"source_model": str(p), "positive_prompts": PROMPTS[i]} for i, p in enumerate(paths[1:])]}
        if args.arch == "qwen2":  # Qwen2 experts need Qwen2-MoE and its one shared expert (mergekit reads the base)
            cfg["shared_experts"] = [{"source_model": str(paths[0]), "positive_prompts": PROMPTS[0][:2],
                                      "residual_scale": 0.5}]
        recipe = workdir / f"moe-{mode}.yml"
        import yaml

        recipe.write_text(yaml.safe_dump(cfg, sort_keys=False))
        outs = {t: workdir / "out" / f"{t}-{mode}" for t in ("mergelab", "mergekit", "mergelab+report")}
        cmds = {
            "mergelab": mergelab_command() + ["moe", str(recipe), "-o", str(outs["mergelab"]), "--overwrite", "-q",
                                              "--no-routing-report"],
            "mergelab+report": mergelab_command() + ["moe", str(recipe), "-o", str(outs["mergelab+report"]),
                                                     "--overwrite", "-q"],
            "mergekit": [str(mk), str(recipe), str(outs["mergekit"])],
        }
        if args.no_report_row:
            del cmds["mergelab+report"]
        res = {t: [] for t in cmds}
        for r in range(args.runs):
            order = ["mergelab", "mergekit"] if r % 2 == 0 else ["mergekit", "mergelab"]
            for tool in order + (["mergelab+report"] if "mergelab+report" in cmds else []):
                shutil.rmtree(outs[tool], ignore_errors=True)
                log = workdir / "logs" / f"{tool}-{mode}-{r}.log"
                log.parent.mkdir(parents=True, exist_ok=True)
                seconds, peak, code, cpu = measure(cmds[tool], log, workdir)
                if code != 0:
                    raise SystemExit(f"{tool} failed on {mode}; see {log}")
                res[tool].append((seconds, peak, cpu))
                print(f"  {mode} {tool}: {seconds:.1f} s wall, {cpu:.1f} s CPU, {peak / 1e6:.0f} MB peak", flush=True)
            equal = same_tensors(outs["mergelab"], outs["mergekit"])
        for tool, runs in res.items():
            rows.append({"mode": mode, "arch": args.arch, "tool": tool,
                         "seconds": statistics.median(r[0] for r in runs),
                         "peak_bytes": statistics.median(r[1] for r in runs),
                         "cpu_seconds": statistics.median(r[2] for r in runs), "runs": len(runs),
                         "tensors_equal_mergekit": equal if tool == "mergelab" else None})
        for o in outs.values():
            shutil.rmtree(o, ignore_errors=True)
    print(f"\n{'mode':<12} {'tool':<16} {'wall s':>8} {'CPU s':>8} {'peak MB':>9}")
    for r in rows:
        print(f"{r['mode']:<12} {r['tool']:<16} {r['seconds']:8.2f} {r['cpu_seconds']:8.2f} "
              f"{r['peak_bytes'] / 1e6:9.0f}")
    print()
    for mode in args.modes.split(","):
        ml = next(r for r in rows if r["mode"] == mode and r["tool"] == "mergelab")
        mk_ = next(r for r in rows if r["mode"] == mode and r["tool"] == "mergekit")
        print(f"{mode}: mergekit/mergelab wall {mk_['seconds'] / ml['seconds']:.2f}x, CPU "
              f"{mk_['cpu_seconds'] / ml['cpu_seconds']:.2f}x, peak memory "
              f"{mk_['peak_bytes'] / ml['peak_bytes']:.2f}x; tensors equal: {ml['tensors_equal_mergekit']}")
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    (workdir / f"results-{stamp}.json").write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
