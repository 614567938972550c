"""docs/methods.md is generated from the registry and must list every method as registered now."""

from pathlib import Path

from mergelab.docs import render
from mergelab.methods.registry import all_methods

ROOT = Path(__file__).resolve().parents[2]


def test_methods_doc_is_current():
    current = (ROOT / "docs" / "methods.md").read_text()
    assert current == render(ROOT), "docs/methods.md is stale: run `python -m mergelab.docs`"
    for m in all_methods():
        assert f"### {m.name}" in current
        for p in m.params + m.model_params:
            assert f"`{p.name}`" in current
