"""``chat_template:`` in a recipe: the chat template the merged model's tokenizer carries.

mergekit's setting (``merge.py``, ``_set_chat_template``, 0.1.5):

* ``auto``: the most common template among the input models (compared after stripping surrounding
  whitespace; a tokenizer's named templates count by their ``default``). With none, the output keeps
  the donor's files as copied. mergekit breaks a tie in the iteration order of a set of model
  references, which is arbitrary; mergelab takes the template met first in recipe order (base model
  first, then the models as listed).
* An inline Jinja template: a string with ``{`` of at least 20 characters.
* A built-in name (mergekit ships ``alpaca``, ``chatml``, ``llama3``, ``mistral``, ``exaone``):
  mergelab does not ship those templates and refuses the names rather than guess their text.

mergekit applies the template only when it builds a tokenizer (``tokenizer_source`` / ``tokenizer:``)
and otherwise warns and drops it. mergelab applies it to the output's tokenizer in both cases: to the
built one, and to the donor's tokenizer files when they are copied as they are.

The template is written as ``chat_template.jinja`` (transformers' file for it); a ``chat_template`` key
in ``tokenizer_config.json`` and a ``chat_template.json`` copied from the donor are removed, so the
template given is the only one the folder holds.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Iterable, Optional, Tuple

from mergelab.errors import MergeLabError

BUILTIN_NAMES = ("alpaca", "chatml", "llama3", "mistral", "exaone")


def check_setting(value: str) -> None:
    """The recipe's ``chat_template`` value is usable (raises a :class:`MergeLabError` naming it otherwise)."""
    if value == "auto":
        return
    name_like = len(value) < 256 and "\n" not in value and "{" not in value
    if name_like and value in BUILTIN_NAMES:
        raise MergeLabError(f"chat_template: '{value}' is one of mergekit's built-in template names, whose text "
                            f"mergelab does not ship; give the Jinja template inline or 'auto'")
    if len(value) < 20 or "{" not in value:
        raise MergeLabError(f"chat_template: {value!r} is neither 'auto' nor a Jinja template (a string with '{{' "
                            f"of at least 20 characters)")


def read_template(folder: Path) -> Optional[str]:
    """The chat template a HF folder carries (``chat_template.jinja``, ``chat_template.json`` or the
    ``chat_template`` key of ``tokenizer_config.json``; a list or mapping of named templates gives its
    ``default``), or None."""
    folder = Path(folder)
    if (folder / "chat_template.jinja").is_file():
        return (folder / "chat_template.jinja").read_text(encoding="utf-8")
    for name in ("chat_template.json", "tokenizer_config.json"):
        p = folder / name
        if not p.is_file():
            continue
        try:
            t = json.loads(p.read_text(encoding="utf-8")).get("chat_template")
        except (ValueError, AttributeError):
            continue
        if isinstance(t, list):
            t = {e.get("name"): e.get("template") for e in t if isinstance(e, dict)}
        if isinstance(t, dict):
            t = t.get("default")
        if isinstance(t, str) and t:
            return t
    return None


def resolve(value: str, folders: Iterable[Optional[Path]]) -> Tuple[Optional[str], str]:
    """``(template, where it came from)`` for the recipe's setting; ``(None, ...)`` for ``auto`` when no
    input carries a template. ``folders`` are the inputs in recipe order (base first); None for an input
    that is not a folder."""
    check_setting(value)
    if value != "auto":
        return value, "recipe"
    found = [t.strip() for t in (read_template(f) for f in folders if f is not None and Path(f).is_dir()) if t]
    if not found:
        return None, "auto: no input carries a chat template"
    counts = Counter(found)
    best = max(counts.values())
    chosen = next(t for t in found if counts[t] == best)
    return chosen, f"auto: carried by {best} of {len(found)} inputs with a template"


def write_template(folder: Path, template: str) -> None:
    """Make ``template`` the only chat template of the tokenizer files in ``folder``."""
    folder = Path(folder)
    cfg = folder / "tokenizer_config.json"
    if cfg.is_file():
        data = json.loads(cfg.read_text(encoding="utf-8"))
        if "chat_template" in data:
            del data["chat_template"]
            cfg.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    (folder / "chat_template.json").unlink(missing_ok=True)
    (folder / "chat_template.jinja").write_text(template, encoding="utf-8")
