"""Declared dependencies are used: every optional extra names only packages some module imports."""

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# Distribution name -> import name, where they differ beyond '-' -> '_'.
IMPORT_NAME = {"scikit-learn": "sklearn"}


def _imported_modules() -> set:
    found = set()
    for f in (ROOT / "src").rglob("*.py"):
        for m in re.finditer(r"^\s*(?:from|import)\s+([A-Za-z_][\w]*)", f.read_text(), re.M):
            found.add(m.group(1))
    return found


def test_every_extra_is_imported_by_the_package():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    imported = _imported_modules()
    unused = []
    for extra, reqs in project.get("optional-dependencies", {}).items():
        if extra == "dev":  # test tools, imported by tests/
            continue
        for req in reqs:
            dist = re.match(r"[A-Za-z0-9_.\-]+", req).group(0)
            name = IMPORT_NAME.get(dist.lower(), dist.lower().replace("-", "_"))
            if name not in imported:
                unused.append(f"{extra}: {dist}")
    assert not unused, f"declared but never imported under src/: {unused}"
