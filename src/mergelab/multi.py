"""Multi-stage merges: several recipes in one YAML file, later ones merging earlier ones' results.

The file format and meaning are mergekit 0.1.5's ``mergekit-multi``: YAML documents separated by
``---``, each an ordinary recipe plus an optional ``name:``. A named stage is written to
``INTERMEDIATE_DIR/NAME``; the one unnamed stage (at most one) is the final result, written to ``OUT``.
Wherever a recipe names a model (``base_model``, ``models[].model``, ``slices[].sources[].model``,
``slices[].base_model``, ``tokenizer_source``) by a stage's name, it means that stage's output, and
the stage depends on it. Stages run in dependency order (document order otherwise); a stage whose
output folder already holds a complete model is skipped, as ``mergekit-multi``'s default ``--lazy``
does.

mergelab adds, before any tensor is read: every document is validated as a recipe; a model that is
neither a stage's name nor an existing checkpoint, a cycle, a duplicate name, a missing or unused
``-o`` and a leftover unfinished stage without ``--resume``/``--overwrite`` are errors naming the
stage. A killed stage leaves ``DIR/NAME.partial`` and continues with ``resume`` like any merge; a
skipped stage whose ``mergelab.json`` records another recipe is an error (its output is stale).
``overwrite`` reruns every stage (mergekit's ``--no-lazy``).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Union

import yaml

from mergelab.errors import MergeLabError, OutputError, RecipeError
from mergelab.io.output import partial_path

# A folder holds a complete model when it has config.json and one of these (mergekit-multi's test).
MODEL_FILES = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json", "pytorch_model.bin.index.json")


@dataclass
class Stage:
    """One document of a multi-stage file."""

    name: Optional[str]  # None: the final, unnamed stage
    document: int  # 1-based position in the file
    recipe: dict  # the document with stage names replaced by their output folders
    out: Path
    depends: List[str] = field(default_factory=list)

    @property
    def label(self) -> str:
        return f"stage '{self.name}'" if self.name is not None else "the final (unnamed) stage"


@dataclass
class StageRun:
    stage: Stage
    status: str  # "merged", "resumed", "skipped"
    result: Any = None  # MergeResult for merged/resumed stages


def read_documents(path: Union[str, Path]) -> List[Any]:
    """The YAML documents of ``path`` (empty ones, e.g. after a trailing ``---``, dropped)."""
    path = Path(path)
    if not path.exists():
        raise RecipeError(f"recipe file '{path}' does not exist")
    try:
        docs = list(yaml.safe_load_all(path.read_text()))
    except yaml.YAMLError as e:
        raise RecipeError(f"recipe '{path}' is not valid YAML: {e}")
    return [d for d in docs if d is not None]


def is_multi_stage(path: Union[str, Path]) -> bool:
    """Whether ``path`` holds more than one YAML document (a ``mergekit-multi`` file)."""
    try:
        return len(read_documents(path)) > 1
    except MergeLabError:
        return False  # the single-recipe loader reports the problem


def _where(path: Path, k: int, name: Optional[str]) -> str:
    return f"'{path}' document {k}" + (f" (stage '{name}')" if name is not None else " (final stage)")


def _patch_refs(doc: dict, names: Dict[str, Path], used: List[str]) -> dict:
    """A copy of ``doc`` whose model references to stage names point at those stages' outputs."""

    def ref(value):
        if isinstance(value, str) and value in names:
            if value not in used:
                used.append(value)
            return str(names[value])
        return value

    doc = json.loads(json.dumps(doc))  # deep copy of plain YAML data
    if "base_model" in doc:
        doc["base_model"] = ref(doc["base_model"])
    if "tokenizer_source" in doc:
        doc["tokenizer_source"] = ref(doc["tokenizer_source"])
    if isinstance(doc.get("tokenizer"), dict) and "source" in doc["tokenizer"]:
        doc["tokenizer"]["source"] = ref(doc["tokenizer"]["source"])
    for entry in doc.get("models") or []:
        if isinstance(entry, dict) and "model" in entry:
            entry["model"] = ref(entry["model"])
    for sl in doc.get("slices") or []:
        if not isinstance(sl, dict):
            continue
        if "base_model" in sl:
            sl["base_model"] = ref(sl["base_model"])
        for src in sl.get("sources") or []:
            if isinstance(src, dict) and "model" in src:
                src["model"] = ref(src["model"])
    return doc


def load_stages(path: Union[str, Path], intermediate_dir: Union[str, Path], out: Optional[Union[str, Path]]) -> List[Stage]:
    """Read, validate and order the stages of a multi-stage file (see the module docstring). Reads no
    tensor; opens the headers of every input that is not a stage's output."""
    from mergelab.io.adapted import open_model
    from mergelab.recipe import load_recipe

    path = Path(path)
    inter = Path(intermediate_dir)
    docs = read_documents(path)
    if not docs:
        raise RecipeError(f"recipe '{path}' holds no merge document")
    raw: List[tuple] = []
    seen: Dict[Optional[str], int] = {}
    for k, doc in enumerate(docs, 1):
        if not isinstance(doc, dict):
            raise RecipeError(f"'{path}' document {k} must be a mapping (a recipe with merge_method), "
                              f"got {type(doc).__name__}")
        doc = dict(doc)
        name = doc.pop("name", None)
        if name is not None:
            if not isinstance(name, str) or not name or name in (".", "..") or "/" in name or "\\" in name:
                raise RecipeError(f"'{path}' document {k}: name {name!r} must be a plain folder name "
                                  f"(it becomes {inter}/NAME)")
        if name in seen:
            if name is None:
                raise RecipeError(f"'{path}' documents {seen[name]} and {k} are both unnamed; only the final "
                                  f"stage may be unnamed, give the others a `name:`")
            raise RecipeError(f"'{path}' documents {seen[name]} and {k} are both named '{name}'")
        seen[name] = k
        raw.append((k, name, doc))
    has_final = None in seen
    if has_final and out is None:
        raise RecipeError(f"'{path}' has an unnamed final stage (document {seen[None]}): give its output "
                          f"folder with -o OUT")
    if not has_final and out is not None:
        raise RecipeError(f"'{path}' has no unnamed final stage, so nothing would be written to '{out}': "
                          f"drop -o, or remove the `name:` of the stage that is the final result")
    outputs = {name: inter / name for _, name, _ in raw if name is not None}
    stages: Dict[Optional[str], Stage] = {}
    order_in_file: List[Optional[str]] = []
    for k, name, doc in raw:
        used: List[str] = []
        patched = _patch_refs(doc, outputs, used)
        where = _where(path, k, name)
        try:
            r = load_recipe(dict(patched, name=name) if name is not None else patched)
        except RecipeError as e:
            raise RecipeError(f"{where}: {e}") from None
        stage_names = {str(p) for p in (outputs[u] for u in used)}
        for ref in r.model_refs():
            if ref in stage_names:
                continue
            try:
                open_model(ref)
            except MergeLabError as e:
                known = ", ".join(f"'{n}'" for n in outputs) or "none"
                raise RecipeError(f"{where}: model '{ref}' is neither the name of a stage in this file "
                                  f"(stages: {known}) nor a usable checkpoint: {e}") from None
        stage_out = outputs[name] if name is not None else Path(out)
        stages[name] = Stage(name, k, patched if name is None else dict(patched, name=name), stage_out, used)
        order_in_file.append(name)
    return _ordered(path, stages, order_in_file)


def _ordered(path: Path, stages: Dict[Optional[str], Stage], order_in_file: List[Optional[str]]) -> List[Stage]:
    """Stages in dependency order (depth first, in document order); a cycle is an error naming it."""
    done: List[Stage] = []
    state: Dict[Optional[str], str] = {}

    def visit(name: Optional[str], trail: List[Optional[str]]) -> None:
        if state.get(name) == "done":
            return
        if state.get(name) == "active":
            cycle = trail[trail.index(name):] + [name]
            raise RecipeError(f"'{path}': the stages form a cycle: "
                              + " -> ".join(f"'{n}'" if n is not None else "(final)" for n in cycle)
                              + f"; {stages[name].label} cannot use its own result")
        state[name] = "active"
        for dep in stages[name].depends:
            visit(dep, trail + [name])
        state[name] = "done"
        done.append(stages[name])

    for name in order_in_file:
        visit(name, [])
    return done


def is_complete(folder: Path) -> bool:
    """``folder`` holds a finished model: ``config.json`` and a weights file (every shard an index lists)."""
    if not (folder / "config.json").is_file():
        return False
    for fname in MODEL_FILES:
        f = folder / fname
        if not f.is_file():
            continue
        if fname.endswith(".index.json"):
            try:
                shards = set(json.loads(f.read_text())["weight_map"].values())
            except (ValueError, KeyError, TypeError, AttributeError):
                return False
            return all((folder / s).is_file() for s in shards)
        return True
    return False


def _stale(folder: Path, recipe: dict) -> bool:
    """Whether ``folder``'s ``mergelab.json`` records a recipe other than ``recipe``. Compared without
    the fields left at their defaults, so an output written by an older mergelab (whose recipes had
    fewer fields) still matches; a folder without a readable record (mergekit's) is not stale."""
    from mergelab.recipe import Recipe, load_recipe

    try:
        recorded = json.loads((folder / "mergelab.json").read_text()).get("recipe")
        if not isinstance(recorded, dict):
            return False
        before = Recipe.model_validate(recorded).model_dump(mode="json", exclude_defaults=True)
    except (OSError, ValueError, AttributeError):
        return False
    return before != load_recipe(recipe).model_dump(mode="json", exclude_defaults=True)


def _in_stage(e: MergeLabError, prefix: str) -> MergeLabError:
    """``e`` with ``prefix`` before its message, of the same class where its constructor allows."""
    try:
        return type(e)(f"{prefix}: {e}")
    except TypeError:
        return MergeLabError(f"{prefix}: {e}")


def merge_multi(
    path: Union[str, Path],
    out: Optional[Union[str, Path]],
    intermediate_dir: Union[str, Path],
    *,
    overwrite: bool = False,
    resume: bool = False,
    dry_run: bool = False,
    log: Callable[[str], None] = lambda s: None,
    **merge_options: Any,
) -> List[StageRun]:
    """Run the stages of the multi-stage file ``path`` (see the module docstring) in dependency order.

    ``merge_options`` go to every stage's :func:`mergelab.merge.merge` (device, shard size, ...).
    ``log`` receives one line per stage. ``dry_run`` validates and says what each stage would do.
    """
    from mergelab.merge import merge

    started = time.perf_counter()
    stages = load_stages(path, intermediate_dir, out)
    plan: List[tuple] = []
    for st in stages:
        partial = partial_path(st.out)
        if overwrite:
            action = "merge"
        elif st.out.exists():
            if not is_complete(st.out):
                raise OutputError(f"{st.label}: '{st.out}' exists but holds no complete model (config.json and "
                                  f"weights); remove it or pass --overwrite")
            if _stale(st.out, st.recipe):
                raise OutputError(f"{st.label}: '{st.out}' was merged from another recipe than this stage's "
                                  f"(see its mergelab.json); pass --overwrite to merge it again")
            action = "skip"
        elif partial.exists():
            if not resume:
                raise OutputError(f"{st.label}: '{partial}' holds an unfinished merge; pass --resume to continue "
                                  f"it or --overwrite to start over")
            action = "resume"
        else:
            action = "merge"
        plan.append((st, action))
    if dry_run:
        for st, action in plan:
            deps = f" (uses {', '.join(repr(d) for d in st.depends)})" if st.depends else ""
            verb = {"merge": "would merge into", "resume": "would resume", "skip": "would skip, complete:"}[action]
            log(f"{st.label}{deps}: {verb} {st.out}")
        return [StageRun(st, "dry-run") for st, _ in plan]
    Path(intermediate_dir).mkdir(parents=True, exist_ok=True)
    runs: List[StageRun] = []
    for st, action in plan:
        if action == "skip":
            log(f"{st.label}: skipped, '{st.out}' already holds a complete model")
            runs.append(StageRun(st, "skipped"))
            continue
        try:
            result = merge(st.recipe, st.out, overwrite=overwrite, resume=action == "resume", **merge_options)
        except MergeLabError as e:
            raise _in_stage(e, f"{st.label} ({_where(Path(path), st.document, st.name)})") from None
        status = "resumed" if action == "resume" else "merged"
        log(f"{st.label}: {status} into {st.out} in {result.seconds:.1f} s")
        for note in result.notes:
            log(f"{st.label}: note: {note}")
        runs.append(StageRun(st, status, result))
    log(f"{len(stages)} stage(s) done in {time.perf_counter() - started:.1f} s")
    return runs
