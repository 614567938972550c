"""The files around the weights: config, tokenizer, model card, manifest; and the safe output folder.

The output is built in ``OUT.partial/`` and renamed to ``OUT`` only when complete. An existing ``OUT``
is never replaced without ``overwrite``; a leftover ``OUT.partial`` is continued only with ``resume``.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
from pathlib import Path
from typing import Optional

import yaml

from mergelab.errors import OutputError

DONOR_FILES = (
    "tokenizer_config.json", "special_tokens_map.json", "tokenizer.json", "tokenizer.model",
    "added_tokens.json", "merges.txt", "vocab.json", "vocab.txt", "spiece.model", "chat_template.jinja",
    "chat_template.json", "generation_config.json", "preprocessor_config.json",
)


def partial_path(out: Path) -> Path:
    return out.with_name(out.name + ".partial")


def prepare_output(out: Path, inputs: list, overwrite: bool, resume: bool) -> tuple:
    """Check the output location and create ``OUT.partial``; returns ``(partial, created_fresh)``."""
    out = Path(out)
    resolved = out.resolve()
    for p in inputs:
        p = Path(p).resolve()
        if resolved == p or p in resolved.parents or resolved in p.parents:
            raise OutputError(f"output '{out}' overlaps input '{p}'; choose another output folder")
    if out.exists() and not overwrite:
        raise OutputError(f"output '{out}' already exists; pass --overwrite to replace it")
    partial = partial_path(out)
    if partial.exists():
        if resume:
            return partial, False
        if not overwrite:
            raise OutputError(
                f"'{partial}' holds an unfinished merge; pass --resume to continue it or --overwrite to start over"
            )
        shutil.rmtree(partial)
    parent = partial.parent
    if not parent.exists():
        try:
            parent.mkdir(parents=True)
        except OSError as e:
            raise OutputError(f"cannot create output folder '{parent}': {e.strerror}")
    if not os.access(parent, os.W_OK):
        raise OutputError(f"cannot write output folder '{out}': '{parent}' is not writable")
    try:
        partial.mkdir()
    except OSError as e:
        raise OutputError(f"cannot write output folder '{out}': {e.strerror}")
    return partial, True


def publish(partial: Path, out: Path, overwrite: bool) -> None:
    """Rename the finished ``OUT.partial`` to ``OUT`` (replacing ``OUT`` only with ``overwrite``)."""
    old = None
    if out.exists():
        if not overwrite:
            raise OutputError(f"output '{out}' appeared during the merge; pass --overwrite to replace it")
        old = out.with_name(f"{out.name}.old-{os.getpid()}")
        os.replace(out, old)
    os.replace(partial, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def write_config(donor_config: Optional[dict], folder: Path, out_dtype: Optional[str], updates: dict) -> None:
    """``config.json`` from the donor with the output dtype (and e.g. vocab size) updated."""
    if donor_config is None:
        return
    cfg = dict(donor_config)
    if out_dtype:
        cfg["torch_dtype"] = out_dtype
        cfg["dtype"] = out_dtype
    cfg.update(updates)
    (folder / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def copy_donor_files(donor: Path, folder: Path) -> list:
    """Copy tokenizer and generation files from the donor model; returns the names copied."""
    copied = []
    for name in DONOR_FILES:
        src = donor / name
        if src.is_file():
            shutil.copy2(src, folder / name)
            copied.append(name)
    return copied


def donor_files_bytes(donor: Optional[Path]) -> int:
    """Bytes of the files :func:`copy_donor_files` would copy from ``donor``."""
    if donor is None:
        return 0
    return sum((Path(donor) / name).stat().st_size for name in DONOR_FILES if (Path(donor) / name).is_file())


def write_model_card(folder: Path, recipe_data: dict, method_summary: str, reference: str) -> None:
    models = [m["model"] for m in recipe_data.get("models") or []]
    card = [
        "---",
        "library_name: transformers",
        "tags: [merge, mergelab]",
        "---",
        f"# {recipe_data.get('name') or folder.name}",
        "",
        f"This model was merged with [mergelab](https://pypi.org/project/mergelab/) using "
        f"**{recipe_data['merge_method']}**: {method_summary}",
        "",
        f"Method reference: {reference}",
        "",
    ]
    if recipe_data.get("base_model"):
        card += [f"Base model: `{recipe_data['base_model']}`", ""]
    if models:
        card += ["Models merged:", ""] + [f"- `{m}`" for m in models] + [""]
    card += ["## Recipe", "", "```yaml", yaml.safe_dump(_prune(recipe_data), sort_keys=False).rstrip(), "```", ""]
    (folder / "README.md").write_text("\n".join(card))


def _prune(data: dict) -> dict:
    """Drop empty/default-only keys so the card shows the recipe as a person wrote it."""
    return {k: v for k, v in data.items() if v not in (None, [], {}) and not (k == "seed" and v == 0)
            and not (k == "vocab_policy" and v == "error")}


def write_manifest(folder: Path, manifest: dict) -> None:
    (folder / "mergelab.json").write_text(json.dumps(manifest, indent=2, default=str) + "\n")


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for pkg in ("mergelab", "torch", "safetensors", "transformers", "numpy"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out
