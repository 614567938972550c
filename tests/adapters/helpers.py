"""PEFT adapters on a tiny random Llama (test helper). peft is a test-only dependency."""

from __future__ import annotations

from pathlib import Path
from typing import Dict, Optional

import torch

TARGETS = ["q_proj", "v_proj", "down_proj"]


def load_base(base: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32).eval()


def random_adapter(base: Path, out: Path, seed: int, r: int = 4, alpha: float = 8, targets=TARGETS,
                   use_rslora: bool = False, rank_pattern: Optional[Dict] = None,
                   alpha_pattern: Optional[Dict] = None, scale: float = 0.05, **kw) -> Path:
    """A PEFT LoRA with random (non-zero) A and B saved by PEFT itself."""
    from peft import LoraConfig, get_peft_model

    model = load_base(base)
    cfg = LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets), use_rslora=use_rslora,
                     rank_pattern=rank_pattern or {}, alpha_pattern=alpha_pattern or {},
                     init_lora_weights=False, lora_dropout=0.0, **kw)
    pm = get_peft_model(model, cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * scale)
    pm.save_pretrained(str(out))
    return out


def peft_dense(base: Path, adapter: Path) -> Dict[str, torch.Tensor]:
    """PEFT's own ``merge_and_unload`` of ``adapter`` onto ``base`` (float32)."""
    from peft import PeftModel

    pm = PeftModel.from_pretrained(load_base(base), str(adapter))
    return {k: v.detach().clone() for k, v in pm.merge_and_unload().state_dict().items()}


def state_of(folder: Path) -> Dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    files = sorted(Path(folder).glob("*.safetensors"))
    out = {}
    for f in files:
        out.update(load_file(str(f)))
    return out
