"""Third-party methods through the ``mergelab.methods`` entry-point group, loaded on first need."""

import torch

import mergelab
import mergelab.methods as methods_pkg
from mergelab.methods.registry import (BaseUse, MergeMethod, _REGISTRY, available_methods, get_method,
                                       register)


class _FakeEntryPoint:
    def __init__(self, calls):
        self.calls = calls

    def load(self):
        self.calls.append("load")
        if "plugin_half" not in _REGISTRY:
            register(MergeMethod(name="plugin_half", summary="Half of the first model.", reference="test plugin",
                                 merge=lambda x: 0.5 * x.models[0], base=BaseUse.IGNORED))


def test_plugins_load_on_first_unknown_name_only(monkeypatch):
    calls = []
    monkeypatch.setattr(methods_pkg, "entry_points", lambda group: [_FakeEntryPoint(calls)] if group == "mergelab.methods" else [])
    monkeypatch.setattr(methods_pkg, "_PLUGINS_LOADED", False)
    monkeypatch.delitem(_REGISTRY, "plugin_half", raising=False)
    try:
        get_method("ties")  # a built-in: no scan of the installed packages
        assert calls == []
        assert get_method("plugin_half").name == "plugin_half"
        assert calls == ["load"]
        assert "plugin_half" in available_methods() and calls == ["load"]  # loaded once
        out = mergelab.merge_state_dicts(None, [{"w": torch.ones(2, 3)}], "plugin_half")
        assert torch.equal(out["w"], torch.full((2, 3), 0.5))
    finally:
        _REGISTRY.pop("plugin_half", None)
