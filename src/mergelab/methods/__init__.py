"""Merge methods. Importing this package registers every built-in method family.

Each module in this package that is not infrastructure (registry, transforms, selection, shared
parameters) defines one family and registers its methods on import. Third-party packages add methods
through the ``mergelab.methods`` entry-point group: each entry point names a module to import.
"""

import importlib
import pkgutil
from importlib.metadata import entry_points

_INFRASTRUCTURE = {"registry", "transforms", "select", "common"}

for _mod in sorted(m.name for m in pkgutil.iter_modules(__path__)):
    if _mod not in _INFRASTRUCTURE and not _mod.startswith("_"):
        importlib.import_module(f"{__name__}.{_mod}")

for _ep in entry_points(group="mergelab.methods"):
    _ep.load()
