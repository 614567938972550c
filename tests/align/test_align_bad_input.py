"""Models that cannot be aligned: a clear error naming the files or tensor, exit 2, no traceback,
nothing written."""

from __future__ import annotations

import torch

from tests.align.conftest import mlp, run_cli, tiny_llama


def _fails(r, *needles):
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr and "error:" in r.stderr
    flat = " ".join(r.stderr.split())
    for n in needles:
        assert str(n) in flat, (n, r.stderr)


def test_different_depth_llama(tmp_path):
    tiny_llama(0, layers=2).save_pretrained(tmp_path / "a")
    tiny_llama(1, layers=3).save_pretrained(tmp_path / "b")
    before = set(tmp_path.iterdir())
    r = run_cli("align", tmp_path / "a", tmp_path / "b", "-o", tmp_path / "c")
    _fails(r, "has 2 layers", "has 3", "different depth")
    assert set(tmp_path.iterdir()) == before


def test_different_depth_mlp_and_mismatched_width(tmp_path):
    torch.save(mlp(0, (8, 16, 12, 3)).state_dict(), tmp_path / "a.pt")
    torch.save(mlp(1, (8, 16, 3)).state_dict(), tmp_path / "deep.pt")
    torch.save(mlp(2, (8, 20, 12, 3)).state_dict(), tmp_path / "wide.pt")
    before = set(tmp_path.iterdir())
    r = run_cli("align", tmp_path / "a.pt", tmp_path / "deep.pt", "-o", tmp_path / "c.pt")
    _fails(r, "tensor '4.weight'", "a.pt", "deep.pt", "same tensors")
    r = run_cli("align", tmp_path / "a.pt", tmp_path / "wide.pt", "-o", tmp_path / "c.pt")
    _fails(r, "tensor '0.weight'", "(20, 8)", "(16, 8)", "wide.pt")
    assert set(tmp_path.iterdir()) == before


def test_bad_options_and_spec(tmp_path):
    torch.save(mlp(0).state_dict(), tmp_path / "a.pt")
    torch.save(mlp(1).state_dict(), tmp_path / "b.pt")
    (tmp_path / "spec.yml").write_text("axes:\n  0.weight: [P0, null]\n  9.weight: [null, P0]\n")
    (tmp_path / "exists.pt").write_bytes(b"keep")
    before = set(tmp_path.iterdir())
    r = run_cli("align", tmp_path / "a.pt", tmp_path / "b.pt", "-o", tmp_path / "c.pt", "--method", "activation")
    _fails(r, "--calibration")
    r = run_cli("align", tmp_path / "a.pt", tmp_path / "b.pt", "-o", tmp_path / "c.pt", "--method", "magic")
    _fails(r, "--method", "magic")
    r = run_cli("align", tmp_path / "a.pt", tmp_path / "b.pt", "-o", tmp_path / "c.pt", "--spec", tmp_path / "spec.yml")
    _fails(r, "tensor '9.weight'", "spec.yml")
    r = run_cli("align", tmp_path / "a.pt", tmp_path / "b.pt", "-o", tmp_path / "exists.pt")
    _fails(r, "already exists", "--overwrite")
    r = run_cli("align", tmp_path / "a.pt", tmp_path / "missing.pt", "-o", tmp_path / "c.pt")
    _fails(r, "missing.pt")
    assert set(tmp_path.iterdir()) == before and (tmp_path / "exists.pt").read_bytes() == b"keep"
