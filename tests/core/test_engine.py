"""End-to-end merges through the CLI and the API on tiny Llama checkpoints."""

import hashlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

import mergelab
from tests.conftest import run_cli


def write_recipe(path, base, experts, method="ties", params=None, model_params=None, **extra):
    model_params = model_params or {"weight": 1.0, "density": 0.5}
    data = {"merge_method": method, "base_model": str(base),
            "models": [{"model": str(e), "parameters": dict(model_params)} for e in experts],
            "parameters": params or {}, **extra}
    path.write_text(yaml.safe_dump(data))
    return path


def load_folder(folder):
    folder = Path(folder)
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def test_cli_merge_writes_a_loadable_model_with_metadata(tiny_family, tmp_path, capsys):
    base, experts = tiny_family
    (base / "tokenizer_config.json").write_text('{"model_max_length": 64}')
    (base / "generation_config.json").write_text('{"do_sample": false}')
    recipe = write_recipe(tmp_path / "r.yaml", base, experts, out_dtype="bfloat16")
    out = tmp_path / "merged"
    code, stdout, err = run_cli(["merge", recipe, "-o", out], capsys)
    assert code == 0, err
    assert "merged" in stdout and "peak memory" in stdout
    assert not (tmp_path / "merged.partial").exists()
    for name in ("config.json", "tokenizer_config.json", "generation_config.json", "README.md", "mergelab.json",
                 "model.safetensors"):
        assert (out / name).exists(), name
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["torch_dtype"] == "bfloat16"
    manifest = json.loads((out / "mergelab.json").read_text())
    assert manifest["recipe"]["merge_method"] == "ties"
    assert set(manifest["inputs"]) == {str(base)} | {str(e) for e in experts}
    assert all(f["header_sha256"] for i in manifest["inputs"].values() for f in i["files"])
    assert manifest["peak_rss_bytes"] > 0 and manifest["wall_seconds"] > 0 and manifest["versions"]["torch"]
    assert "ties" in (out / "README.md").read_text()

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(out))
    assert model.dtype == torch.bfloat16
    logits = model(input_ids=torch.tensor([[1, 5, 9, 3]])).logits
    assert logits.shape == (1, 4, 128) and torch.isfinite(logits.float()).all()

    # The file path and the in-memory path compute the same tensors.
    sd = lambda p: load_folder(p)
    ref = mergelab.merge_state_dicts(sd(base), [sd(e) for e in experts], "ties", weight=1.0, density=0.5,
                                     out_dtype="bfloat16")
    got = load_folder(out)
    assert set(got) == set(ref)
    assert all(torch.equal(got[k], ref[k]) for k in ref)


def test_shard_size_is_honest_and_index_is_valid(tiny_family, tmp_path):
    base, experts = tiny_family
    recipe = write_recipe(tmp_path / "r.yaml", base, experts, method="task_arithmetic",
                          model_params={"weight": 0.5})
    out = tmp_path / "m"
    mergelab.merge(recipe, out, shard_size="20KB", progress=True)
    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) > 3
    biggest_tensor = max(t.numel() * t.element_size() for t in load_folder(base).values())
    for s in shards:
        assert s.stat().st_size <= max(20_000, biggest_tensor + 1000), s
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {s.name for s in shards}
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in load_folder(out).values())
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(str(out))


@pytest.mark.parametrize("durable", [False, True])
def test_fsync_flushes_every_shard_before_its_rename_only_when_asked(tiny_family, tmp_path, monkeypatch, durable):
    from mergelab.io import writer

    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(writer.os, "fsync", lambda fd: (events.append("fsync"), real_fsync(fd))[1])
    # (os is one module: the final rename of OUT.partial to OUT is seen too and left out here)
    monkeypatch.setattr(writer.os, "replace", lambda a, b: (
        events.append("rename") if str(a).endswith(".incomplete") else None, real_replace(a, b))[1])
    base, experts = tiny_family
    recipe = write_recipe(tmp_path / "r.yaml", base, experts, method="task_arithmetic",
                          model_params={"weight": 0.5})
    out = tmp_path / "m"
    run_cli(["merge", str(recipe), "-o", str(out), "--quiet", "--shard-size", "20KB"] + (["--fsync"] if durable else []))
    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) > 3 and events.count("rename") == len(shards)
    assert events == (["fsync", "rename"] * len(shards) if durable else ["rename"] * len(shards))


def test_existing_output_is_refused_then_replaced_with_overwrite(tiny_family, tmp_path, capsys):
    base, experts = tiny_family
    recipe = write_recipe(tmp_path / "r.yaml", base, experts)
    out = tmp_path / "m"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, _, err = run_cli(["merge", recipe, "-o", out], capsys)
    assert code == 2 and "already exists" in err and "--overwrite" in err
    assert (out / "keep.txt").read_text() == "mine"
    code, _, err = run_cli(["merge", recipe, "-o", out, "--overwrite", "-q"], capsys)
    assert code == 0, err
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").exists()


def test_dry_run_validates_and_writes_nothing(tiny_family, tmp_path, capsys):
    base, experts = tiny_family
    recipe = write_recipe(tmp_path / "r.yaml", base, experts)
    code, stdout, err = run_cli(["merge", recipe, "--dry-run"], capsys)
    assert code == 0, err
    assert "tensors" in stdout and "estimated peak memory" in stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["models", "r.yaml"]


KILLER = """
import os, signal, sys
from mergelab.io import writer
done = {"n": 0}
orig = writer.ShardWriter._finish_shard
def finish_then_die(self, shard):
    orig(self, shard)
    done["n"] += 1
    if done["n"] == 3:
        os.kill(os.getpid(), signal.SIGKILL)
writer.ShardWriter._finish_shard = finish_then_die
from mergelab.cli import main
main(sys.argv[1:])
"""


def test_killed_merge_resumes_to_identical_bytes(tiny_family, tmp_path):
    base, experts = tiny_family
    recipe = write_recipe(tmp_path / "r.yaml", base, experts, method="dare_ties",
                          model_params={"weight": 1.0, "density": 0.5}, seed=3)
    args = ["merge", str(recipe), "--shard-size", "20KB", "-q"]
    full = tmp_path / "full"
    mergelab.merge(recipe, full, shard_size="20KB")
    out = tmp_path / "resumed"
    proc = subprocess.run([sys.executable, "-c", KILLER, *args, "-o", str(out)], capture_output=True)
    assert proc.returncode == -signal.SIGKILL
    partial = tmp_path / "resumed.partial"
    assert partial.exists() and not out.exists()
    assert len(list(partial.glob("model-*.safetensors"))) == 3
    code, _, _ = run_cli(args + ["-o", str(out)])
    assert code == 2  # a leftover partial needs --resume or --overwrite
    code, _, _ = run_cli(args + ["-o", str(out), "--resume"])
    assert code == 0
    manifest = json.loads((out / "mergelab.json").read_text())
    assert manifest["tensors_resumed"] > 0
    digest = lambda f: hashlib.sha256(f.read_bytes()).hexdigest()
    names = sorted(p.name for p in full.glob("model*"))
    assert names == sorted(p.name for p in out.glob("model*"))
    for name in names:
        assert digest(full / name) == digest(out / name), name


def test_resume_refuses_a_different_recipe(tiny_family, tmp_path):
    base, experts = tiny_family
    recipe = write_recipe(tmp_path / "r.yaml", base, experts, method="task_arithmetic", model_params={"weight": 1.0})
    partial = tmp_path / "m.partial"
    partial.mkdir()
    (partial / ".mergelab-progress.json").write_text('{"plan_fingerprint": "other"}')
    with pytest.raises(mergelab.MergeLabError, match="different recipe"):
        mergelab.merge(recipe, tmp_path / "m", resume=True)


def test_resume_fingerprint_covers_auxiliary_inputs(tiny_family, tmp_path):
    from mergelab.merge import build_plan, load_recipe, open_checkpoints, plan_fingerprint

    class Aux:
        def __init__(self, size):
            self.size = size

        def fingerprint(self):
            return {"path": "moments.safetensors", "bytes": self.size}

    base, experts = tiny_family
    recipe = load_recipe(write_recipe(tmp_path / "r.yaml", base, experts, method="task_arithmetic",
                                      model_params={"weight": 1.0}))
    plan = build_plan(recipe, open_checkpoints(recipe))
    plain = plan_fingerprint(plan, 1000, 0)
    assert plan_fingerprint(plan, 1000, 0, {}) == plain
    one = plan_fingerprint(plan, 1000, 0, {"second_moments": [Aux(10)]})
    assert one != plain and one != plan_fingerprint(plan, 1000, 0, {"second_moments": [Aux(11)]})


def test_random_streams_do_not_depend_on_tensor_order():
    g = torch.Generator().manual_seed(0)
    base = {f"layers.{i}.w": torch.randn(20, 10, generator=g) for i in range(4)}
    models = [{k: v + torch.randn(v.shape, generator=g) for k, v in base.items()} for _ in range(2)]
    a = mergelab.merge_state_dicts(base, models, "dare_ties", weight=1.0, density=0.5, seed=11)
    rev = lambda d: dict(reversed(list(d.items())))
    b = mergelab.merge_state_dicts(rev(base), [rev(m) for m in models], "dare_ties", weight=1.0, density=0.5, seed=11)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_chunked_streaming_equals_whole_tensors_for_deterministic_methods():
    g = torch.Generator().manual_seed(1)
    base = {"emb.weight": torch.randn(257, 33, generator=g), "norm.weight": torch.randn(33, generator=g)}
    models = [{k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in base.items()} for _ in range(3)]
    for method, kw in [("ties", dict(weight=[1.0, 0.5, 2.0], density=0.3)),
                       ("ties", dict(weight=1.0, density=0.3, semantics="paper")),
                       ("task_arithmetic", dict(weight=1.0, lambda_=0.4)),
                       ("linear", dict(weight=[1.0, 2.0, 3.0]))]:
        whole = mergelab.merge_state_dicts(base, models, method, **kw)
        chunked = mergelab.merge_state_dicts(base, models, method, chunk_elements=500, **kw)
        assert all(torch.equal(whole[k], chunked[k]) for k in whole), method


def test_bin_and_sharded_inputs(tiny_family, tmp_path):
    base, experts = tiny_family
    sd = load_folder(experts[0])
    as_bin = tmp_path / "as_bin"
    as_bin.mkdir()
    torch.save(sd, as_bin / "pytorch_model.bin")
    (as_bin / "config.json").write_text((experts[0] / "config.json").read_text())
    sharded = tmp_path / "sharded"
    from mergelab.synthetic import write_checkpoint

    write_checkpoint(sharded, load_folder(experts[1]), json.loads((experts[1] / "config.json").read_text()),
                     shard_bytes=30_000)
    assert (sharded / "model.safetensors.index.json").exists()
    recipe = write_recipe(tmp_path / "r.yaml", base, [as_bin, sharded], method="task_arithmetic",
                          model_params={"weight": 1.0})
    out = tmp_path / "m"
    mergelab.merge(recipe, out)
    ref = mergelab.merge_state_dicts(load_folder(base), [sd, load_folder(experts[1])], "task_arithmetic", weight=1.0)
    got = load_folder(out)
    assert all(torch.equal(got[k], ref[k]) for k in ref)


def test_gradient_and_filter_parameters_reach_the_right_tensors(tiny_family, tmp_path):
    base, experts = tiny_family
    recipe = write_recipe(tmp_path / "r.yaml", base, experts[:1], method="task_arithmetic",
                          model_params={"weight": [{"filter": "mlp", "value": 0.0}, {"value": [0.0, 1.0]}]})
    out = tmp_path / "m"
    mergelab.merge(recipe, out)
    got, b, e = load_folder(out), load_folder(base), load_folder(experts[0])
    assert torch.equal(got["model.layers.1.mlp.up_proj.weight"], b["model.layers.1.mlp.up_proj.weight"])
    # 2 layers: layer 0 at t=0 -> weight 0, layer 1 at t=1 -> weight 1; non-layer tensors t=0
    assert torch.equal(got["model.layers.0.self_attn.q_proj.weight"], b["model.layers.0.self_attn.q_proj.weight"])
    assert torch.allclose(got["model.layers.1.self_attn.q_proj.weight"], e["model.layers.1.self_attn.q_proj.weight"])
    assert torch.equal(got["model.embed_tokens.weight"], b["model.embed_tokens.weight"])


def test_methods_command_lists_every_method_with_parameters(capsys):
    code, out, _ = run_cli(["methods"], capsys)
    assert code == 0
    for name in mergelab.available_methods():
        assert name in out
    code, out, _ = run_cli(["methods", "ties", "--json"], capsys)
    data = json.loads(out)
    params = {p["name"]: p for p in data[0]["parameters"] + data[0]["per_model_parameters"]}
    assert params["density"]["default"] == 1.0 and "arXiv:2306.01708" in data[0]["reference"]


def test_elementwise_methods_stream_every_matrix_in_cache_sized_chunks():
    from mergelab.methods.registry import STREAM_ELEMENTS, get_method
    from mergelab.plan import chunking

    ta, ties = get_method("task_arithmetic"), get_method("ties")
    assert chunking(1 << 20, 1 << 22, ta) == (STREAM_ELEMENTS, STREAM_ELEMENTS)
    assert chunking(1 << 20, 1 << 22, ties) == (1 << 20, 1 << 22)  # per-tensor statistics: whole up to 4M
    assert chunking(1000, None, ta) == (1000, 1000)  # an explicit chunk size wins


# --------------------------------------------------------------------------- a full disk (issue 14, 6b)
def shard_digests(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(Path(folder).glob("model*"))}


def test_a_merge_that_cannot_fit_is_refused_before_reading_with_both_numbers(tiny_family, tmp_path, capsys,
                                                                            monkeypatch):
    import collections
    import importlib

    from mergelab.execute.local import LocalExecutor

    merge_module = importlib.import_module("mergelab.merge")  # the package's `merge` is the function

    base, experts = tiny_family
    recipe = write_recipe(tmp_path / "r.yaml", base, experts, method="task_arithmetic", model_params={"weight": 1.0})
    Usage = collections.namedtuple("Usage", "total used free")
    monkeypatch.setattr(merge_module.shutil, "disk_usage", lambda path: Usage(10**6, 10**6 - 12345, 12345))
    ran = []
    monkeypatch.setattr(LocalExecutor, "run", lambda self, plan, sink: ran.append(1))
    out = tmp_path / "out"
    code, _, err = run_cli(["merge", recipe, "-o", out, "-q"], capsys)
    flat = " ".join(err.split())
    plan_bytes = mergelab.merge(recipe, dry_run=True).summary["output_bytes"]
    assert code == 2 and "not enough free space" in flat and "12345 bytes" in flat and "--no-space-check" in flat
    needed = int(flat.split("it needs ")[1].split("(")[1].split(" bytes")[0])
    assert needed > plan_bytes  # the shards' headers and the metadata files on top of the tensors
    assert f"{needed} bytes:" in flat and "Traceback" not in err
    assert not ran and not out.exists() and not (tmp_path / "out.partial").exists()
    monkeypatch.undo()
    code, _, err = run_cli(["merge", recipe, "-o", out, "-q", "--no-space-check"], capsys)
    assert code == 0, err


def _inject_write_error(monkeypatch, code, after_bytes):
    """ShardWriter's writes fail with OSError(code) once ``after_bytes`` bytes have been written."""
    from mergelab.io import writer

    written = {"n": 0}
    real = writer.ShardWriter._pwrite

    def pwrite(self, fd, data, pos):
        if written["n"] + len(data) > after_bytes:
            raise OSError(code, os.strerror(code))
        written["n"] += len(data)
        return real(self, fd, data, pos)

    monkeypatch.setattr(writer.ShardWriter, "_pwrite", pwrite)


@pytest.mark.parametrize("code,fix", [(28, "free some space"), (122, "free some space"), (13, "writable again")])
def test_a_failed_write_is_one_message_and_resume_gives_the_same_bytes(tiny_family, tmp_path, capsys, monkeypatch,
                                                                       code, fix):
    import errno

    base, experts = tiny_family
    recipe = write_recipe(tmp_path / "r.yaml", base, experts, method="dare_ties", seed=5)
    args = ["merge", recipe, "--shard-size", "20KB", "-q"]
    full = tmp_path / "full"
    assert run_cli(args + ["-o", full], capsys)[0] == 0
    out = tmp_path / "out"
    _inject_write_error(monkeypatch, code, after_bytes=50_000)
    status, _, err = run_cli(args + ["-o", out], capsys)
    flat = " ".join(err.split())
    assert status == 2 and "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1  # one message
    assert f"errno {errno.errorcode[code]}" in flat and os.strerror(code) in flat and fix in flat
    assert "--resume" in flat and ".safetensors.incomplete'" in flat and "error: cannot write " in flat
    partial = tmp_path / "out.partial"
    assert not out.exists() and partial.exists()
    kept = sorted(p.name for p in partial.glob("model-*.safetensors"))
    assert kept and not list(partial.glob("*.incomplete"))  # completed shards kept, unfinished ones removed
    assert all(shard_digests(partial)[k] == shard_digests(full)[k] for k in kept)
    monkeypatch.undo()
    status, _, err = run_cli(args + ["-o", out, "--resume"], capsys)
    assert status == 0, err
    assert json.loads((out / "mergelab.json").read_text())["tensors_resumed"] > 0
    assert shard_digests(out) == shard_digests(full) and len(shard_digests(full)) > 3


def test_a_full_tmpfs_is_refused_then_fails_cleanly_then_resumes(tiny_family, tmp_path, capsys):
    """On a real small filesystem (a tmpfs, where the test may mount one): the free-space check, then
    the merge forced past it fails with ENOSPC, then --resume after the filesystem grows."""
    base, experts = tiny_family
    mnt = tmp_path / "small"
    mnt.mkdir()
    try:
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)],
                                 capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.SubprocessError):
        mounted = False
    if not mounted:
        pytest.skip("cannot mount a tmpfs here (needs root and the mount capability)")
    try:
        recipe = write_recipe(tmp_path / "r.yaml", base, experts, method="task_arithmetic",
                              model_params={"weight": 1.0})
        args = ["merge", recipe, "--shard-size", "20KB", "-q"]
        full = tmp_path / "full"
        assert run_cli(args + ["-o", full], capsys)[0] == 0
        out = mnt / "out"
        status, _, err = run_cli(args + ["-o", out], capsys)
        assert status == 2 and "not enough free space" in err and "Traceback" not in err, err
        assert not list(mnt.iterdir())
        status, _, err = run_cli(args + ["-o", out, "--no-space-check"], capsys)
        flat = " ".join(err.split())
        assert status == 2 and "No space left on device" in flat and "--resume" in flat and "Traceback" not in err
        assert not out.exists() and not list((mnt / "out.partial").glob("*.incomplete"))
        subprocess.run(["mount", "-o", "remount,size=4m", str(mnt)], check=True)
        status, _, err = run_cli(args + ["-o", out, "--resume"], capsys)
        assert status == 0, err
        assert shard_digests(out) == shard_digests(full)
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True)


def test_a_failed_metadata_write_keeps_the_shards_and_resumes(tiny_family, tmp_path, capsys, monkeypatch):
    import errno
    import importlib

    merge_module = importlib.import_module("mergelab.merge")
    base, experts = tiny_family
    recipe = write_recipe(tmp_path / "r.yaml", base, experts, method="task_arithmetic", model_params={"weight": 1.0})
    args = ["merge", recipe, "--shard-size", "20KB", "-q"]
    assert run_cli(args + ["-o", tmp_path / "full"], capsys)[0] == 0

    def full_disk(folder, manifest):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(folder / "mergelab.json"))

    monkeypatch.setattr(merge_module, "write_manifest", full_disk)
    out = tmp_path / "out"
    status, _, err = run_cli(args + ["-o", out], capsys)
    flat = " ".join(err.split())
    assert status == 2 and "Traceback" not in err
    assert "cannot write" in flat and "mergelab.json'" in flat and "No space left on device" in flat and "--resume" in flat
    partial = tmp_path / "out.partial"
    assert not out.exists() and (partial / ".mergelab-progress.json").exists()
    assert shard_digests(partial) == shard_digests(tmp_path / "full")
    monkeypatch.undo()
    assert run_cli(args + ["-o", out, "--resume"], capsys)[0] == 0
    assert shard_digests(out) == shard_digests(tmp_path / "full")
    assert not (out / ".mergelab-progress.json").exists() and (out / "mergelab.json").exists()
