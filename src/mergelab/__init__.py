"""mergelab: merge fine-tuned neural networks, faithfully and in bounded memory.

Python API:

* :func:`merge` runs a recipe (YAML path, dict or :class:`Recipe`) into a Hugging Face folder;
* :func:`merge_state_dicts` merges in-memory state dicts with any registered method;
* :func:`available_methods` lists the registered methods.
"""

__version__ = "0.1.0"

from mergelab.errors import MergeLabError  # noqa: E402
from mergelab.merge import MergeResult, merge, merge_state_dicts  # noqa: E402
from mergelab.methods.registry import available_methods  # noqa: E402
from mergelab.recipe import Recipe, load_recipe  # noqa: E402

__all__ = ["merge", "merge_state_dicts", "available_methods", "load_recipe", "Recipe", "MergeResult",
           "MergeLabError", "__version__"]
