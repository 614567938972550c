"""Multi-stage merges (``mergekit-multi`` files): order, errors before any work, skip, resume, values."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from mergelab.errors import MergeLabError
from mergelab.multi import load_stages, merge_multi
from tests.conftest import run_cli


def load_folder(folder):
    out = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def write_multi(path: Path, docs) -> Path:
    path.write_text(yaml.safe_dump_all(docs, sort_keys=False))
    return path


def chain(base, experts):
    """The final stage first, then 'avg' (uses 'soup'), then 'soup': the file order is not the run order."""
    e0, e1, e2 = (str(e) for e in experts)
    final = {"merge_method": "linear", "models": [{"model": "avg", "parameters": {"weight": 0.75}},
                                                  {"model": str(base), "parameters": {"weight": 0.25}}],
             "dtype": "float32"}
    avg = {"name": "avg", "merge_method": "task_arithmetic", "base_model": str(base),
           "models": [{"model": "soup", "parameters": {"weight": 1.0}},
                      {"model": e2, "parameters": {"weight": 0.5}}], "dtype": "float32"}
    soup = {"name": "soup", "merge_method": "linear",
            "models": [{"model": e0, "parameters": {"weight": 0.5}}, {"model": e1, "parameters": {"weight": 0.5}}],
            "dtype": "float32"}
    return [final, avg, soup]


def test_stages_run_in_dependency_order_and_give_the_chained_values(tiny_family, tmp_path, capsys):
    base, experts = tiny_family
    recipe = write_multi(tmp_path / "multi.yaml", chain(base, experts))
    out, inter = tmp_path / "final", tmp_path / "inter"
    code, stdout, err = run_cli(["merge", recipe, "-o", out, "--intermediate-dir", inter], capsys)
    assert code == 0, err
    lines = [ln for ln in stdout.splitlines() if "stage" in ln]
    assert [ln.split(":")[0] for ln in lines[:3]] == ["stage 'soup'", "stage 'avg'", "the final (unnamed) stage"]
    assert (inter / "soup" / "config.json").is_file() and (inter / "avg" / "mergelab.json").is_file()
    # Independent float64 computation of the three stages.
    b = {k: v.double() for k, v in load_folder(base).items()}
    e = [{k: v.double() for k, v in load_folder(x).items()} for x in experts]
    got = load_folder(out)
    assert sorted(got) == sorted(b)
    for k in b:
        soup = 0.5 * e[0][k] + 0.5 * e[1][k]
        avg = b[k] + (soup - b[k]) + 0.5 * (e[2][k] - b[k])
        final = 0.75 * avg + 0.25 * b[k]
        assert torch.allclose(got[k].double(), final, atol=1e-6, rtol=0), k


def test_cycle_is_an_error_before_any_work(tiny_family, tmp_path, capsys):
    base, experts = tiny_family
    a = {"name": "a", "merge_method": "linear", "models": [{"model": "b", "parameters": {"weight": 1.0}},
                                                           {"model": str(experts[0]), "parameters": {"weight": 1.0}}]}
    b = {"name": "b", "merge_method": "linear", "models": [{"model": "c", "parameters": {"weight": 1.0}},
                                                           {"model": str(experts[1]), "parameters": {"weight": 1.0}}]}
    c = {"name": "c", "merge_method": "linear", "models": [{"model": "a", "parameters": {"weight": 1.0}},
                                                           {"model": str(experts[2]), "parameters": {"weight": 1.0}}]}
    ok = {"name": "ok", "merge_method": "linear", "models": [{"model": str(e), "parameters": {"weight": 1.0}}
                                                             for e in experts]}
    recipe = write_multi(tmp_path / "multi.yaml", [ok, a, b, c])
    inter = tmp_path / "inter"
    code, _, err = run_cli(["merge", recipe, "--intermediate-dir", inter], capsys)
    assert code == 2
    assert "cycle" in err and "'a' -> 'b' -> 'c' -> 'a'" in err, err
    assert "Traceback" not in err
    assert not inter.exists()  # not even the independent stage 'ok' ran


def test_unknown_name_is_an_error_naming_the_stage(tiny_family, tmp_path, capsys):
    base, experts = tiny_family
    docs = chain(base, experts)
    docs[1]["models"][0]["model"] = "sopu"  # a typo of 'soup'
    recipe = write_multi(tmp_path / "multi.yaml", docs)
    out, inter = tmp_path / "final", tmp_path / "inter"
    code, _, err = run_cli(["merge", recipe, "-o", out, "-I", inter], capsys)
    assert code == 2
    assert "stage 'avg'" in err and "'sopu'" in err and "'soup'" in err, err
    assert not inter.exists() and not out.exists()


def test_file_level_errors(tiny_family, tmp_path, capsys):
    base, experts = tiny_family
    docs = chain(base, experts)
    recipe = write_multi(tmp_path / "multi.yaml", docs)
    code, _, err = run_cli(["merge", recipe, "-o", tmp_path / "o"], capsys)
    assert code == 2 and "--intermediate-dir" in err
    code, _, err = run_cli(["merge", recipe, "-I", tmp_path / "i"], capsys)
    assert code == 2 and "unnamed final stage (document 1)" in err and "-o OUT" in err
    dup = write_multi(tmp_path / "dup.yaml", [docs[2], dict(docs[2])])
    with pytest.raises(MergeLabError, match="documents 1 and 2 are both named 'soup'"):
        load_stages(dup, tmp_path / "i", None)
    named = write_multi(tmp_path / "named.yaml", docs[1:])
    with pytest.raises(MergeLabError, match="no unnamed final stage"):
        load_stages(named, tmp_path / "i", tmp_path / "o")
    bad = dict(docs[2], merge_method="linaer")
    with pytest.raises(MergeLabError, match=r"document 2 \(stage 'soup'\).*did you mean 'linear'"):
        load_stages(write_multi(tmp_path / "bad.yaml", [docs[1], bad]), tmp_path / "i", None)


def test_complete_stage_is_skipped_and_a_stale_one_refused(tiny_family, tmp_path, capsys):
    base, experts = tiny_family
    docs = chain(base, experts)
    recipe = write_multi(tmp_path / "multi.yaml", docs)
    out, inter = tmp_path / "final", tmp_path / "inter"
    assert run_cli(["merge", recipe, "-o", out, "-I", inter], capsys)[0] == 0
    stamp = {p: p.stat().st_mtime_ns for p in inter.rglob("*.safetensors")}
    first = load_folder(out)
    import shutil

    shutil.rmtree(out)
    code, stdout, err = run_cli(["merge", recipe, "-o", out, "-I", inter], capsys)
    assert code == 0, err
    assert "stage 'soup': skipped" in stdout and "stage 'avg': skipped" in stdout
    assert "the final (unnamed) stage: merged" in stdout
    assert {p: p.stat().st_mtime_ns for p in inter.rglob("*.safetensors")} == stamp
    again = load_folder(out)
    assert all(torch.equal(first[k], again[k]) for k in first)
    # The recipe of 'soup' changes: its output is stale, which is an error, not a silent reuse.
    docs[2]["models"][0]["parameters"]["weight"] = 0.9
    write_multi(recipe, docs)
    code, _, err = run_cli(["merge", recipe, "-o", tmp_path / "final2", "-I", inter], capsys)
    assert code == 2 and "stage 'soup'" in err and "another recipe" in err
    # --overwrite merges every stage again.
    code, stdout, err = run_cli(["merge", recipe, "-o", out, "-I", inter, "--overwrite"], capsys)
    assert code == 0 and "stage 'soup': merged" in stdout, err
    assert not torch.equal(load_folder(out)["model.norm.weight"], first["model.norm.weight"])
    # A folder without a complete model is not taken for a finished stage.
    (inter / "avg" / "config.json").unlink()
    with pytest.raises(MergeLabError, match="stage 'avg'.*no complete model"):
        merge_multi(recipe, tmp_path / "final3", inter)


KILLER = """
import os, signal, sys
from mergelab.io import writer
done = {"n": 0}
orig = writer.ShardWriter._finish_shard
def finish_then_die(self, shard):
    orig(self, shard)
    done["n"] += 1
    if done["n"] == int(os.environ["KILL_AFTER"]):
        os.kill(os.getpid(), signal.SIGKILL)
writer.ShardWriter._finish_shard = finish_then_die
from mergelab.cli import main
main(sys.argv[1:])
"""


def test_killed_stage_resumes_to_identical_bytes(tiny_family, tmp_path, capsys):
    base, experts = tiny_family
    recipe = write_multi(tmp_path / "multi.yaml", chain(base, experts))
    full = tmp_path / "full"
    merge_multi(recipe, full / "out", full / "inter", shard_size="20KB")
    shards_soup = len(list((full / "inter" / "soup").glob("model-*.safetensors")))
    assert shards_soup > 3
    out, inter = tmp_path / "out", tmp_path / "inter"
    args = ["merge", str(recipe), "-o", str(out), "-I", str(inter), "--shard-size", "20KB", "-q"]
    import os

    env = dict(os.environ, KILL_AFTER=str(shards_soup + 2), PYTHONPATH=str(Path(__file__).parents[2] / "src"))
    proc = subprocess.run([sys.executable, "-c", KILLER, *args], capture_output=True, env=env,
                          cwd=str(Path(__file__).parents[2]))
    assert proc.returncode == -9, proc.stderr.decode()[-2000:]
    assert (inter / "soup" / "config.json").is_file()
    assert (inter / "avg.partial").is_dir() and not (inter / "avg").exists() and not out.exists()
    code, _, err = run_cli(args, capsys)
    assert code == 2 and "stage 'avg'" in err and "--resume" in err
    code, stdout, err = run_cli(args[:-1] + ["--resume"], capsys)
    assert code == 0, err
    assert "stage 'soup': skipped" in stdout and "stage 'avg': resumed" in stdout
    assert json.loads((inter / "avg" / "mergelab.json").read_text())["tensors_resumed"] > 0
    digest = lambda f: hashlib.sha256(f.read_bytes()).hexdigest()  # noqa: E731
    for a, b in ((full / "inter" / "avg", inter / "avg"), (full / "out", out)):
        names = sorted(p.name for p in a.glob("model*"))
        assert names == sorted(p.name for p in b.glob("model*"))
        for name in names:
            assert digest(a / name) == digest(b / name), name


def test_dry_run_says_what_each_stage_would_do(tiny_family, tmp_path, capsys):
    base, experts = tiny_family
    recipe = write_multi(tmp_path / "multi.yaml", chain(base, experts))
    code, stdout, err = run_cli(["merge", recipe, "-o", tmp_path / "o", "-I", tmp_path / "i", "--dry-run"], capsys)
    assert code == 0, err
    assert "stage 'avg' (uses 'soup'): would merge into" in stdout
    assert not (tmp_path / "i").exists()


def test_stage_names_in_slices_and_tokenizer_source(tiny_family, tmp_path, capsys):
    base, experts = tiny_family
    soup = chain(base, experts)[2]
    final = {"merge_method": "passthrough", "dtype": "float32", "tokenizer_source": "soup",
             "slices": [{"sources": [{"model": "soup", "layer_range": [0, 2]}]}]}
    recipe = write_multi(tmp_path / "multi.yaml", [final, soup])
    stages = load_stages(recipe, tmp_path / "inter", tmp_path / "out")
    assert [s.name for s in stages] == ["soup", None] and stages[1].depends == ["soup"]
    assert stages[1].recipe["tokenizer_source"] == str(tmp_path / "inter" / "soup")
    code, _, err = run_cli(["merge", recipe, "-o", tmp_path / "out", "-I", tmp_path / "inter"], capsys)
    assert code == 0, err
    a, b = load_folder(tmp_path / "inter" / "soup"), load_folder(tmp_path / "out")
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_stage_name_in_a_tokenizer_block_source(tiny_family, tmp_path):
    base, experts = tiny_family
    soup = chain(base, experts)[2]
    final = {"merge_method": "passthrough", "dtype": "float32", "tokenizer": {"source": "soup"},
             "slices": [{"sources": [{"model": "soup", "layer_range": [0, 2]}]}]}
    recipe = write_multi(tmp_path / "multi.yaml", [final, soup])
    stages = load_stages(recipe, tmp_path / "inter", tmp_path / "out")
    assert stages[1].depends == ["soup"]
    assert stages[1].recipe["tokenizer"]["source"] == str(tmp_path / "inter" / "soup")
