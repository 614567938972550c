"""Running mergekit 0.1.5 for the parity tests, and comparing its outputs with mergelab's.

mergekit lives in a venv of its own (``benchmarks/setup_mergekit_venv.sh``): ``MERGEKIT_PYTHON`` names
that venv's python, ``MERGEKIT_YAML`` (default: the ``mergekit-yaml`` beside it) its command line. A
test module that needs it sets ``pytestmark`` to :data:`NEEDS_MERGEKIT` (or :data:`NEEDS_MERGEKIT_CLI`):
marker ``mergekit``, skipped without the variable::

    MERGEKIT_PYTHON=/path/to/mergekit-venv/bin/python .venv/bin/python -m pytest -m mergekit tests/parity

Three ways to run mergekit, each checking that it is version 0.1.5:

* :func:`merge_tensors`: one process runs mergekit's ``merge_tensors`` on named tensors (method level);
* :func:`run_configs`: one process runs many config files with ``run_merge``, as ``mergekit-yaml`` does;
* :func:`run_both`: one recipe file through ``mergekit-yaml`` and ``mergelab merge`` (two processes).

The scripts run inside mergekit's venv: they read a ``spec.json`` the helper writes beside them.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Callable, Dict, List, Optional

import pytest
import torch
import yaml
from safetensors import safe_open

MERGEKIT_PYTHON = os.environ.get("MERGEKIT_PYTHON")


def _mergekit_yaml() -> Optional[Path]:
    if os.environ.get("MERGEKIT_YAML"):
        return Path(os.environ["MERGEKIT_YAML"])
    if MERGEKIT_PYTHON:
        return Path(MERGEKIT_PYTHON).parent / "mergekit-yaml"
    return None


MERGEKIT_YAML = _mergekit_yaml()

NEEDS_MERGEKIT = [
    pytest.mark.mergekit,
    pytest.mark.skipif(not MERGEKIT_PYTHON, reason="set MERGEKIT_PYTHON to a python with mergekit 0.1.5"),
]
NEEDS_MERGEKIT_CLI = [
    pytest.mark.mergekit,
    pytest.mark.slow,
    pytest.mark.skipif(MERGEKIT_YAML is None, reason="set MERGEKIT_PYTHON or MERGEKIT_YAML to mergekit 0.1.5's venv"),
]

# Method level. Each case: "id", "method", "tensors" (input names, the base first when there is one),
# "parameters", optionally "base_index" (default 0; null: no base), "name" (the tensor's name) and
# "bernoulli": names of uniform tensors u that replace torch.bernoulli(p) by (u < p), in draw order,
# so that mergekit's random drops are mergelab's.
TENSORS_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import torch
    from safetensors.torch import load_file, save_file
    from importlib.metadata import version
    from mergekit.merge_methods.api import merge_tensors

    spec = json.load(open(sys.argv[1]))
    t = load_file(spec["inputs"])
    out = {}
    real_bernoulli = torch.bernoulli
    for case in spec["cases"]:
        queue = [t[k] for k in case.get("bernoulli", [])]

        def fake_bernoulli(p, *args, **kwargs):
            u = queue.pop(0)
            return (u.reshape(p.shape) < p).to(p.dtype)

        if queue:
            torch.bernoulli = fake_bernoulli
        try:
            res = merge_tensors([t[k] for k in case["tensors"]], case["method"],
                                parameters=case["parameters"], base_index=case.get("base_index", 0),
                                name=case.get("name"), dtype=torch.float32)
        finally:
            torch.bernoulli = real_bernoulli
        assert not queue, "unused bernoulli draws in " + case["id"]
        out[case["id"]] = res.contiguous()
    out["__version__"] = torch.tensor([int(x) for x in version("mergekit").split(".")[:3]])
    save_file(out, spec["output"])
    """
)

# Config level: every run is (config file, output folder); with "record_errors" a failing config is
# recorded in the report instead of stopping the process (a refused config may fail in mergekit too).
CONFIGS_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import yaml
    from importlib.metadata import version
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.merge_methods.registry import registered_methods
    from mergekit.options import MergeOptions

    spec = json.load(open(sys.argv[1]))
    errors = {}
    for name, (config, out) in spec["runs"].items():
        source = open(config).read()
        try:
            run_merge(MergeConfiguration.model_validate(yaml.safe_load(source)), out,
                      options=MergeOptions(quiet=True, **spec["options"]), config_source=source)
        except Exception as e:
            if not spec["record_errors"]:
                raise
            errors[name] = f"{type(e).__name__}: {e}"
    json.dump({"version": version("mergekit"), "errors": errors,
               "methods": sorted(m.spec.name for m in registered_methods())}, open(spec["report"], "w"))
    """
)


def run_script(script: str, spec: dict, folder: Path, timeout: int = 600, threads: Optional[int] = None) -> None:
    """Write ``spec.json`` and ``run_mergekit.py`` (``script``, after setting torch's thread count when
    ``threads`` is given) into ``folder`` and run it with mergekit's python; it must succeed."""
    folder = Path(folder)
    (folder / "spec.json").write_text(json.dumps(spec))
    prelude = f"import torch\ntorch.set_num_threads({threads})\n" if threads else ""
    (folder / "run_mergekit.py").write_text(prelude + script)
    proc = subprocess.run([MERGEKIT_PYTHON, str(folder / "run_mergekit.py"), str(folder / "spec.json")],
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"mergekit run failed:\n{proc.stderr[-4000:]}"


def merge_tensors(tensors: Dict[str, torch.Tensor], cases: List[dict], folder: Path, timeout: int = 300) -> dict:
    """mergekit's ``merge_tensors`` on every case of :data:`TENSORS_SCRIPT` (inputs from ``tensors``),
    in one process; returns its results by case id."""
    from safetensors.torch import load_file, save_file

    folder = Path(folder)
    save_file(tensors, str(folder / "inputs.safetensors"))
    spec = {"inputs": str(folder / "inputs.safetensors"), "output": str(folder / "out.safetensors"), "cases": cases}
    run_script(TENSORS_SCRIPT, spec, folder, timeout)
    out = load_file(str(folder / "out.safetensors"))
    assert out.pop("__version__").tolist() == [0, 1, 5], "parity is defined against mergekit 0.1.5"
    return out


def write_configs(configs: Dict[str, dict], folder: Path) -> Dict[str, Path]:
    """Write each config as ``folder/<case>.yml``; returns the paths by case."""
    paths = {}
    for case, config in configs.items():
        paths[case] = Path(folder) / f"{case}.yml"
        paths[case].write_text(yaml.safe_dump(config, sort_keys=False))
    return paths


def run_configs(paths: Dict[str, Path], folder: Path, record_errors: bool = False, options: Optional[dict] = None,
                threads: Optional[int] = None, timeout: int = 600) -> dict:
    """Run every config file in one mergekit process (``run_merge``, ``options`` added to
    ``MergeOptions(quiet=True)``), case ``c`` into ``folder/mergekit/c``. Returns mergekit's report:
    ``version``, ``errors`` (case -> message, with ``record_errors``) and ``methods`` (its registry)."""
    folder = Path(folder)
    spec = {"runs": {case: [str(p), str(folder / "mergekit" / case)] for case, p in paths.items()},
            "report": str(folder / "report.json"), "options": options or {}, "record_errors": record_errors}
    run_script(CONFIGS_SCRIPT, spec, folder, timeout, threads)
    report = json.loads((folder / "report.json").read_text())
    assert report["version"] == "0.1.5", "parity is defined against mergekit 0.1.5"
    return report


def mergelab_cmd() -> List[str]:
    """The ``mergelab`` command line of this python."""
    exe = Path(sys.executable).parent / "mergelab"
    return [str(exe)] if exe.is_file() else [sys.executable, "-m", "mergelab.cli"]


def run_both(recipe: dict, tmp_path: Path, seed: Optional[int] = None) -> tuple:
    """Write ``recipe`` once, run ``mergekit-yaml`` and ``mergelab merge`` on that file; return the two
    output folders."""
    path = tmp_path / "recipe.yml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    out_mk, out_ml = tmp_path / "mergekit", tmp_path / "mergelab"
    mk = [str(MERGEKIT_YAML), str(path), str(out_mk), "--quiet"]
    if seed is not None:
        mk += ["--random-seed", str(seed)]
    for cmd in (mk, mergelab_cmd() + ["merge", str(path), "-o", str(out_ml), "--quiet"]):
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        assert res.returncode == 0, f"{' '.join(cmd)} failed ({res.returncode}):\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    return out_mk, out_ml


# --------------------------------------------------------------------------- comparing outputs
def load_tensors(folder: Path) -> Dict[str, torch.Tensor]:
    """Every tensor of the ``*.safetensors`` files in ``folder`` (each name once)."""
    files = sorted(Path(folder).glob("*.safetensors"))
    assert files, f"no safetensors in {folder}"
    out = {}
    for f in files:
        with safe_open(str(f), framework="pt") as st:
            for k in st.keys():
                assert k not in out, f"tensor {k} stored twice in {folder}"
                out[k] = st.get_tensor(k)
    return out


def assert_bit_equal(out_mk: Path, out_ml: Path, case: str, dtype: Optional[torch.dtype] = None,
                     allowed: Optional[Callable[[str], torch.Tensor]] = None) -> tuple:
    """The two output folders hold the same tensor names, shapes and dtypes (``dtype`` when given) and
    equal values bit for bit, except where the bool mask ``allowed(name)`` lets a tensor differ.
    Returns ``(mergekit's tensors, mergelab's tensors, entries that differ where allowed)``."""
    mk, ml = load_tensors(out_mk), load_tensors(out_ml)
    assert sorted(mk) == sorted(ml), f"tensor names differ: {sorted(set(mk) ^ set(ml))[:5]}"
    differ, at_allowed = {}, 0
    for name in mk:
        a, b = mk[name], ml[name]
        assert a.shape == b.shape and a.dtype == b.dtype and (dtype is None or a.dtype == dtype), \
            f"{name}: {tuple(a.shape)} {a.dtype} (mergekit) vs {tuple(b.shape)} {b.dtype} (mergelab)"
        if torch.equal(a, b):
            continue
        if allowed is not None and not ((a != b) & ~allowed(name)).any():
            at_allowed += int((a != b).sum())
            continue
        differ[name] = (int((a != b).sum()), a.numel(), float((a.float() - b.float()).abs().max()))
    assert not differ, f"{case}: {len(differ)} of {len(mk)} tensors differ from mergekit (count, of, max): {differ}"
    return mk, ml, at_allowed


def ulp_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """|a - b| in units of the float32 spacing at max(|a|, |b|) (0 where equal)."""
    a, b = a.float(), b.float()
    mag = torch.maximum(a.abs(), b.abs())
    spacing = torch.nextafter(mag, torch.full_like(mag, math.inf)) - mag
    return (a - b).abs() / spacing


def duplicated_magnitudes(family: Dict[str, str], name: str) -> torch.Tensor:
    """Where some expert's task-vector magnitude ``|tau_i|`` is non-zero and occurs more than once in
    the tensor: the only places a magnitude trim may break a tie at its threshold differently.

    mergekit keeps exactly ``k`` entries in ``argsort`` order, which is not stable, so *which* of
    several equal magnitudes at the threshold it keeps is arbitrary; mergelab's choice among them (its
    tie rule, see docs/methods.md) may differ there and only there.
    """
    base = load_tensors(Path(family["base"]))[name]
    mask = torch.zeros(base.shape, dtype=torch.bool)
    for i in range(3):
        mag = (load_tensors(Path(family[f"expert_{i}"]))[name] - base).abs().reshape(-1)
        _, inverse, counts = torch.unique(mag, return_inverse=True, return_counts=True)
        mask |= ((counts[inverse] > 1) & (mag > 0)).reshape(base.shape)
    return mask


def assert_same_tensors(out_mk: Path, out_ml: Path, max_ulp: float = 1.0, tie_family=None) -> dict:
    """Every tensor: same names, shapes, dtypes; values within ``max_ulp``. Returns counts.

    With ``tie_family`` (magnitude-trim methods), values further apart are allowed only where
    :func:`duplicated_magnitudes` says a threshold tie may be broken differently, and only for a
    small share of the values; they are counted in ``tie_breaks``.
    """
    mk, ml = load_tensors(out_mk), load_tensors(out_ml)
    assert sorted(mk) == sorted(ml), (
        f"tensor names differ: only mergekit {sorted(set(mk) - set(ml))[:5]}, only mergelab {sorted(set(ml) - set(mk))[:5]}")
    exact = total = tie_breaks = 0
    worst = (0.0, None)
    for name in mk:
        a, b = mk[name], ml[name]
        assert a.shape == b.shape, f"{name}: shape {tuple(a.shape)} (mergekit) vs {tuple(b.shape)} (mergelab)"
        assert a.dtype == b.dtype, f"{name}: dtype {a.dtype} (mergekit) vs {b.dtype} (mergelab)"
        d = ulp_distance(a, b)
        exact += int((a == b).sum())
        total += a.numel()
        far = d > max_ulp
        explained = torch.zeros_like(far)
        if tie_family is not None and bool(far.any()):
            explained = far & duplicated_magnitudes(tie_family, name)
            tie_breaks += int(explained.sum())
            assert int(explained.sum()) <= max(2, a.numel() // 200), f"{name}: {int(explained.sum())} tie breaks"
            far = far & ~explained
        rest = d[~explained]
        m = float(rest.max()) if rest.numel() else 0.0
        if m > worst[0]:
            worst = (m, name)
        if bool(far.any()):
            i = int((d * far).reshape(-1).argmax())
            raise AssertionError(
                f"{name}: {int(far.sum())} of {a.numel()} values differ by more than {max_ulp} ulp; "
                f"worst at flat index {i}: mergekit {a.reshape(-1)[i].item()!r} vs mergelab {b.reshape(-1)[i].item()!r} "
                f"({float(d.reshape(-1)[i]):.1f} ulp)")
    return {"tensors": len(mk), "values": total, "exactly_equal": exact, "worst_ulp": worst, "tie_breaks": tie_breaks}


# Fields of config.json that define the model; both tools must write the same values.
CONFIG_FIELDS = ("architectures", "model_type", "hidden_size", "intermediate_size", "num_hidden_layers",
                 "num_attention_heads", "num_key_value_heads", "vocab_size", "max_position_embeddings",
                 "rms_norm_eps", "tie_word_embeddings", "hidden_act", "bos_token_id", "eos_token_id")


def assert_same_config(out_mk: Path, out_ml: Path) -> None:
    """config.json: the fields that define the model are equal as written, and equal once transformers
    has read both (mergekit re-serialises through transformers, which e.g. moves ``rope_theta`` into
    ``rope_parameters``; mergelab keeps the donor's file and updates only the dtype)."""
    mk = json.loads((out_mk / "config.json").read_text())
    ml = json.loads((out_ml / "config.json").read_text())
    for key in CONFIG_FIELDS:
        assert mk.get(key) == ml.get(key), f"config.json '{key}': mergekit {mk.get(key)!r} vs mergelab {ml.get(key)!r}"
    dt_mk = mk.get("dtype", mk.get("torch_dtype"))
    dt_ml = ml.get("dtype", ml.get("torch_dtype"))
    assert dt_mk == dt_ml, f"config.json dtype: mergekit {dt_mk!r} vs mergelab {dt_ml!r}"
    transformers = pytest.importorskip("transformers")
    read_mk = transformers.AutoConfig.from_pretrained(str(out_mk)).to_dict()
    read_ml = transformers.AutoConfig.from_pretrained(str(out_ml)).to_dict()
    ignore = {"transformers_version", "_name_or_path"}
    differ = {k: (read_mk.get(k), read_ml.get(k)) for k in set(read_mk) | set(read_ml)
              if k not in ignore and read_mk.get(k) != read_ml.get(k)}
    assert not differ, f"configs differ once loaded by transformers (mergekit, mergelab): {differ}"
