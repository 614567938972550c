"""mergelab: merge fine-tuned neural networks, faithfully and in bounded memory.

Python API:

* :func:`merge` runs a recipe (YAML path, dict or :class:`Recipe`) into a Hugging Face folder;
* :func:`merge_state_dicts` merges in-memory state dicts with any registered method;
* :func:`available_methods` lists the registered methods.
"""

__version__ = "0.1.0"

import gc as _gc

# Importing torch creates a few hundred thousand long-lived objects, and the cyclic garbage collector
# would traverse them again and again while they are created (about a tenth of the start-up time of
# every command here). Nothing imported is garbage, so collection waits until the imports are done,
# and the imported objects are then moved out of the collector's sight (gc.freeze) so that later
# collections during a merge do not traverse them either.
_collecting = _gc.isenabled()
_gc.disable()
try:
    from mergelab.errors import MergeLabError  # noqa: E402
    from mergelab.merge import MergeResult, merge, merge_state_dicts  # noqa: E402
    from mergelab.methods.registry import available_methods  # noqa: E402
    from mergelab.recipe import Recipe, load_recipe  # noqa: E402
finally:
    if _collecting:
        _gc.freeze()
        _gc.enable()

__all__ = ["merge", "merge_state_dicts", "available_methods", "load_recipe", "Recipe", "MergeResult",
           "MergeLabError", "__version__"]
