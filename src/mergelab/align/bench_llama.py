"""Two small Llamas pretrained from different random initialisations, merged: averaging, matching +
averaging, PLeaS for decoders (:mod:`mergelab.align.pleas_llama`) at several MLP widths.

Both models have the llmmix ``1m`` shape (``mergelab.llmmix.model``: hidden 64, 4 layers, 2 heads,
intermediate 256, tied embeddings) and read the llmmix ``1m`` base's tokenizer and pretraining token files
(``ROOT/base-1m/final``, ``ROOT/tokens-*``; made by ``mergelab bench pretrain --size 1m``). Each is trained
from its own seed (initialisation and data order) for ``steps`` AdamW steps on blocks of ``seq_len``
tokens. Scores: perplexity and next-token accuracy on the held-out token file. Calibration for
activation matching and PLeaS: ``calib_blocks`` training blocks, decoded to text. **PLeaS-free** rows
(``free_widths``) calibrate on as many spans of uniformly random token ids, decoded: inputs of no domain.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Dict, Optional

import numpy as np
import torch


def _train(tok, size: str, train: np.ndarray, seed: int, steps: int, seq_len: int, batch: int, lr: float, out: Path):
    from mergelab.llmmix.model import build_model

    model = build_model(size, len(tok), seed, bos_id=tok.bos_token_id, eos_id=tok.eos_token_id,
                        pad_id=tok.pad_token_id)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1)
    warm = max(1, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))))
    rng = np.random.default_rng(seed)
    n = (len(train) - 1) // seq_len
    model.train()
    for _ in range(steps):
        idx = rng.integers(0, n, batch)
        x = torch.as_tensor(np.stack([train[i * seq_len:i * seq_len + seq_len + 1] for i in idx]).astype(np.int64))
        loss = model(input_ids=x[:, :-1], labels=x[:, :-1]).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
    model.eval().save_pretrained(out)
    tok.save_pretrained(out)
    return float(loss.detach())


def _score(state_or_dir, held: torch.Tensor, cfg_dir: Optional[Path] = None, probs_only: bool = False):
    """``(perplexity, next-token accuracy)`` of a model folder (or a state dict with ``cfg_dir``'s config)
    on held-out blocks ``[N, L]``; with ``probs_only`` the next-token probabilities instead."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if isinstance(state_or_dir, (str, Path)):
        model = AutoModelForCausalLM.from_pretrained(str(state_or_dir)).eval()
    else:
        cfg = AutoConfig.from_pretrained(str(cfg_dir))
        model = AutoModelForCausalLM.from_config(cfg).eval()
        model.load_state_dict(state_or_dir, strict=False)
        model.tie_weights()
    with torch.no_grad():
        logits = torch.cat([model(input_ids=held[i:i + 16, :-1]).logits for i in range(0, len(held), 16)])
    probs = logits.float().softmax(-1)
    if probs_only:
        return probs
    return _metrics(probs, held)


def _metrics(probs: torch.Tensor, held: torch.Tensor):
    target = held[:, 1:]
    p = probs.gather(-1, target[..., None]).squeeze(-1)
    return float(torch.exp(-p.clamp_min(1e-12).log().mean())), float((probs.argmax(-1) == target).float().mean())


def run_llama(out, root=None, size: str = "1m", steps: int = 300, seq_len: int = 64, batch: int = 16,
              lr: float = 3e-3, widths=(1.0, 1.25, 1.5, 2.0), free_widths=(1.0, 1.5), calib_blocks: int = 96,
              held_blocks: int = 256, attention=(),
              log=print) -> dict:
    """Train (or reuse, under ``OUT/llama-seed{0,1}``) the two models, merge them and score every row;
    writes ``OUT/llama.json`` and ``OUT/llama.md``. ``attention``: ``(mlp width, attention width)`` pairs,
    PLeaS rows with the attention refitted (``attention_width``)."""
    from transformers import AutoTokenizer

    from mergelab.align.api import align
    from mergelab.align.pleas import write_folder
    from mergelab.align.pleas_llama import pleas_llama
    from mergelab.llmmix.pretrain import default_root

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    root = Path(root) if root else default_root()
    base = root / f"base-{size}" / "final"
    meta = json.loads((root / f"base-{size}" / "pretrain.json").read_text())
    tokens = root / ("tokens-" + Path(meta["tokenizer"]).name.split("-", 1)[1])
    tok = AutoTokenizer.from_pretrained(str(base))
    train = np.memmap(tokens / "train.u16", dtype=np.uint16, mode="r")
    held_all = np.memmap(tokens / "heldout.u16", dtype=np.uint16, mode="r")
    L = seq_len + 1  # scored at the trained context length
    held = torch.as_tensor(np.stack([held_all[i * L:i * L + L] for i in range(held_blocks)]).astype(np.int64))
    t0 = time.time()
    dirs, losses = [], {}
    for seed in (0, 1):
        d = out / f"llama-seed{seed}"
        if not (d / "model.safetensors").is_file():
            log(f"training seed {seed}: {steps} steps of {batch} x {seq_len} tokens ...")
            losses[seed] = _train(tok, size, train, seed, steps, seq_len, batch, lr, d)
        dirs.append(d)
    train_s = time.time() - t0
    rng = np.random.default_rng(123)
    starts = rng.integers(0, len(train) - 65, calib_blocks)
    calib = out / "calib.txt"
    calib.write_text("\n".join(tok.decode(train[s:s + 64].astype(np.int64)).replace("\n", " ") for s in starts) + "\n")
    noise = out / "calib-random.txt"
    ids = rng.integers(3, len(tok), (calib_blocks, 64))  # past the special tokens
    noise.write_text("\n".join(tok.decode(row).replace("\n", " ") for row in ids) + "\n")

    t1 = time.time()
    rows: Dict[str, list] = {}
    pa, pb = _score(dirs[0], held, probs_only=True), _score(dirs[1], held, probs_only=True)
    rows["model A (seed 0)"] = list(_metrics(pa, held))
    rows["model B (seed 1)"] = list(_metrics(pb, held))
    rows["ensemble (mean of probabilities)"] = list(_metrics((pa + pb) / 2, held))
    del pa, pb
    from safetensors.torch import load_file

    sa = load_file(str(dirs[0] / "model.safetensors"))

    def avg(sb):
        return {k: (v + sb[k]) / 2 for k, v in sa.items()}

    rows["average"] = list(_score(avg(load_file(str(dirs[1] / "model.safetensors"))), held, dirs[0]))
    for method in ("weight", "activation"):
        aligned = out / f"aligned-{method}"
        if not aligned.exists():
            align(dirs[0], dirs[1], aligned, method=method, calibration=calib if method == "activation" else None)
        rows[f"{method} matching + average"] = list(_score(avg(load_file(str(aligned / "model.safetensors"))), held,
                                                           dirs[0]))
    n = json.loads((dirs[0] / "config.json").read_text())["intermediate_size"]
    for w in widths:
        r = pleas_llama(dirs[0], dirs[1], calib, width=float(w))
        folder = out / f"pleas-{w:g}"
        write_folder(r, dirs[0], folder, overwrite=True)
        rows[f"PLeaS w={w:g} (intermediate {r.width})"] = list(_score(folder, held))
        tokens_calib = r.tokens
    for w, aw in attention:
        r = pleas_llama(dirs[0], dirs[1], calib, width=float(w), attention_width=float(aw))
        folder = out / f"pleas-{w:g}-attn-{aw:g}"
        write_folder(r, dirs[0], folder, overwrite=True)
        rows[f"PLeaS w={w:g}, attention refit at {aw:g} x heads ({r.config['num_key_value_heads']} KV heads)"] = list(
            _score(folder, held))
        tokens_calib = r.tokens
    for w in free_widths:
        r = pleas_llama(dirs[0], dirs[1], noise, width=float(w))
        folder = out / f"pleas-free-{w:g}"
        write_folder(r, dirs[0], folder, overwrite=True)
        rows[f"PLeaS-free w={w:g} (random-token calibration)"] = list(_score(folder, held))
    report = {"size": size, "steps": steps, "seq_len": seq_len, "batch": batch, "lr": lr, "intermediate_size": n,
              "final_train_loss": losses, "calibration_tokens": tokens_calib, "held_out_tokens": int(held[:, 1:].numel()),
              "train_seconds": round(train_s, 1), "merge_seconds": round(time.time() - t1, 1),
              "rows": {k: {"perplexity": round(v[0], 2), "next_token_accuracy": round(v[1], 4)} for k, v in rows.items()}}
    (out / "llama.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = ["| row | perplexity | next-token accuracy |", "|---|---|---|"]
    lines += [f"| {k} | {v['perplexity']:.2f} | {v['next_token_accuracy']:.3f} |" for k, v in report["rows"].items()]
    (out / "llama.md").write_text("\n".join(lines) + "\n")
    return report
