"""Merge methods. Importing this package registers every built-in method family.

Each module in this package that is not infrastructure (registry, transforms, selection, shared
parameters) defines one family and registers its methods on import. Third-party packages add methods
through the ``mergelab.methods`` entry-point group: each entry point names a module to import. Plugins
are loaded on first need (a name the built-ins lack, or a listing of every method), because scanning
the installed packages' metadata costs about 0.1 s of every start-up.
"""

import importlib
import pkgutil
from importlib.metadata import entry_points

_INFRASTRUCTURE = {"registry", "transforms", "select", "common"}

for _mod in sorted(m.name for m in pkgutil.iter_modules(__path__)):
    if _mod not in _INFRASTRUCTURE and not _mod.startswith("_"):
        importlib.import_module(f"{__name__}.{_mod}")

_PLUGINS_LOADED = False


def load_plugins() -> None:
    """Import every module named in the ``mergelab.methods`` entry-point group (once)."""
    global _PLUGINS_LOADED
    if _PLUGINS_LOADED:
        return
    _PLUGINS_LOADED = True
    for ep in entry_points(group="mergelab.methods"):
        ep.load()
