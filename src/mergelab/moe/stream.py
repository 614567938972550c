"""A transformers decoder run one layer's weights at a time: bounded memory for any model size.

The model is built by transformers on the ``meta`` device (no memory), so its own forward code runs
(attention masks, rotary embeddings, the exact operations of that transformers version). Only the
embeddings and the final norm are materialised up front; a hook loads each decoder layer's tensors
from the checkpoint (:class:`mergelab.io.checkpoint.Checkpoint`) just before that layer runs and
drops them right after. Peak memory is therefore the embeddings plus one layer plus activations,
whatever the number of layers. Each forward pass reads every layer once more from disk (the page
cache, in practice).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Dict, Optional

import torch

from mergelab.errors import CheckpointError
from mergelab.io.checkpoint import Checkpoint


class StreamedDecoder:
    """The decoder stack (``AutoModel``, no LM head) of the HF folder ``folder`` in ``dtype``.

    ``layer_input(l, hidden_states)`` is called with the residual stream entering decoder layer ``l``,
    ``mlp_input(l, hidden_states)`` with the input of its MLP (after attention and its norm);
    ``module_output`` maps a sub-module suffix (e.g. ``"mlp.gate"``) to a callback
    ``(l, output)`` called with that sub-module's output in layer ``l``.
    """

    def __init__(self, folder: Path, dtype: torch.dtype = torch.bfloat16, label: str = "model"):
        from transformers import AutoConfig, AutoModel

        self.folder = Path(folder)
        self.dtype = dtype
        self.ckpt = Checkpoint.open(str(folder), label)
        try:
            self.config = AutoConfig.from_pretrained(str(folder))
        except Exception as e:  # transformers raises many kinds for a config it cannot read
            raise CheckpointError(f"{label}: transformers cannot read the config of '{folder}': {e}")
        with torch.device("meta"):
            model = AutoModel.from_config(self.config, dtype=dtype)
        model.eval()
        self.model = model
        self.layers = model.layers
        names = self.ckpt.tensors
        self.prefix = "model." if any(n.startswith("model.") for n in names) else ""
        # Rotary tables are buffers computed in __init__: rebuild them for real.
        if hasattr(model, "rotary_emb"):
            model.rotary_emb = type(model.rotary_emb)(config=self.config)
        own = {}
        for name, p in list(model.named_parameters()) + list(model.named_buffers()):
            if name.startswith("layers.") or name.startswith("rotary_emb."):
                continue
            own[name] = self._read(name, p.dtype)
        model.load_state_dict(own, strict=False, assign=True)
        for name, t in list(model.named_parameters()) + list(model.named_buffers()):
            if t.is_meta and not name.startswith("layers."):
                raise CheckpointError(f"{label}: '{folder}' has no tensor for '{self.prefix}{name}'")
        self.layer_input: Optional[Callable] = None
        self.mlp_input: Optional[Callable] = None
        self.module_output: Dict[str, Callable] = {}
        for idx, layer in enumerate(self.layers):
            layer.register_forward_pre_hook(self._loader(idx))
            layer.register_forward_hook(self._unloader(idx))
            layer.mlp.register_forward_pre_hook(self._mlp_recorder(idx))
            for suffix in ("mlp.gate",):
                try:
                    sub = layer.get_submodule(suffix)
                except AttributeError:
                    continue
                sub.register_forward_hook(self._recorder(idx, suffix))

    def _read(self, name: str, dtype: torch.dtype) -> torch.Tensor:
        full = self.prefix + name
        if full not in self.ckpt.tensors and name in self.ckpt.tensors:
            full = name
        return self.ckpt.read(full, dtype=dtype if dtype.is_floating_point else None)

    def _loader(self, idx: int):
        def hook(layer, args):
            state = {name: self._read(f"layers.{idx}.{name}", t.dtype)
                     for name, t in list(layer.named_parameters()) + list(layer.named_buffers())}
            layer.load_state_dict(state, strict=True, assign=True)
            if self.layer_input is not None:
                self.layer_input(idx, args[0])
        return hook

    def _unloader(self, idx: int):
        def hook(layer, args, output):
            layer.to_empty(device="meta")
        return hook

    def _mlp_recorder(self, idx: int):
        def hook(module, args):
            if self.mlp_input is not None:
                self.mlp_input(idx, args[0])
        return hook

    def _recorder(self, idx: int, suffix: str):
        def hook(module, args, output):
            fn = self.module_output.get(suffix)
            if fn is not None:
                fn(idx, output)
        return hook

    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> None:
        """One pass over a batch, as ``model(input_ids=..., attention_mask=...)`` (no cache)."""
        self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
