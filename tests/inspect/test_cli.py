"""The command: through its own Typer app (CliRunner) and mounted as ``mergelab inspect``."""

import json

import pytest
from typer.testing import CliRunner

from mergelab.errors import CheckpointError
from mergelab.inspect.cli import SINGLE_COMMAND, app


def test_cli_writes_json_and_png(tmp_path, hand_models):
    base, models = hand_models
    out_json, out_png = tmp_path / "out" / "inspect.json", tmp_path / "out" / "inspect.png"
    r = CliRunner().invoke(app, [base, *models, "--json", str(out_json), "--plot", str(out_png),
                                 "--density", "0.5", "--rtol", "0.1"])
    assert r.exit_code == 0, r.output
    assert "task vectors per layer" in r.output and "reading" in r.output
    assert "sign conflict: 21.4% of coordinates (3 of 14)" in r.output

    data = json.loads(out_json.read_text())
    assert data["schema"] == "mergelab.inspect/1"
    assert [m["label"] for m in data["models"]] == ["A", "B", "C"]
    assert data["settings"]["density"] == 0.5 and data["settings"]["rtol"] == 0.1
    o = data["overall"]
    assert (o["numel"], o["conflicts"], o["overlap"], o["trimmed_conflicts"]) == (14, 3, 8, 2)
    assert o["dot"] == [[11.00390625, 7, -3], [7, 22.25, 3], [-3, 3, 10.25]]
    assert o["near_zero_share"] == [6 / 14, 6 / 14, 11 / 14]
    assert [g["group"] for g in data["groups"]] == ["embeddings", "0", "1", "other"]
    assert data["groups"][2]["cosine"][0][2] is None  # C is untouched in layer 1
    assert {t["name"]: t["group"] for t in data["tensors"]}["model.norm.weight"] == "other"
    assert data["skipped"][0]["tensor"] == "model.layers.0.step"
    assert data["interpretation"] and "conflict_rate" in data["definitions"]

    png = out_png.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_cli_quiet_prints_only_the_interpretation(hand_models):
    base, models = hand_models
    r = CliRunner().invoke(app, [base, *models, "-q"])
    assert r.exit_code == 0, r.output
    assert "task vectors per layer" not in r.output
    assert "sign conflict" in r.output


def _flat(text):
    return " ".join(text.replace("│", " ").split())


def test_cli_help_defines_conflict(capsys):
    r = CliRunner().invoke(app, ["--help"])
    assert r.exit_code == 0
    assert "at least one model's task-vector entry is > 0 and another model's is < 0" in _flat(r.output)
    # the definition survives mounting (the main CLI replaces the command's one-line help)
    from mergelab.cli import main

    main(["inspect", "--help"])
    assert "another model's is < 0 (zeros abstain)" in _flat(capsys.readouterr().out)


def test_cli_bad_input_raises_the_checkpoint_error(hand_models):
    base, _ = hand_models
    r = CliRunner().invoke(app, [base, "/nonexistent/model"])
    assert r.exit_code != 0 and isinstance(r.exception, CheckpointError)


def test_mounted_as_mergelab_inspect(tmp_path, hand_models, capsys):
    from mergelab.cli import main

    assert SINGLE_COMMAND is True
    base, models = hand_models
    main(["inspect", base, models[0], models[1], "--json", str(tmp_path / "x.json"), "-q"])
    assert json.loads((tmp_path / "x.json").read_text())["overall"]["numel"] == 14
    with pytest.raises(SystemExit) as e:
        main(["inspect", base, "/nonexistent/model"])
    assert e.value.code == 2
    assert "does not exist" in capsys.readouterr().err
