"""The command: through its own Typer app (CliRunner) and mounted as ``mergelab inspect``."""

import json
from pathlib import Path

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
    assert (o["numel"], o["conflicts"], o["overlap"], o["trimmed_conflicts"]) == (14, 3, 8, 1)
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


@pytest.fixture
def long_named_models(tmp_path):
    """Five models with long folder names (the labels), so that the tables do not fit 80 columns."""
    from tests.inspect.conftest import TAU, write_model

    base = write_model(tmp_path / "base")
    taus = [TAU["A"], TAU["B"], TAU["C"], TAU["A"], TAU["B"]]
    scales = [1.0, 1.0, 1.0, 0.3, -0.7]
    models = [write_model(tmp_path / f"fine-tuned-model-number-{i}", tau, scale=s)
              for i, (tau, s) in enumerate(zip(taus, scales))]
    return str(base), [str(m) for m in models]


def _numbers(data):
    """Every number the tables show, formatted as they show it, with the column it belongs to."""
    o = data["overall"]
    pct = lambda x: f"{100 * x:.1f}%"  # noqa: E731
    k = len(data["models"])
    shown = {}
    for i in range(k):
        shown.setdefault(f"{o['norms'][i]:.3g}", "‖τ‖")
        shown.setdefault(pct(o["zero_share"][i]), "zero")
        for j in range(k):
            shown.setdefault(f"{o['cosine'][i][j]:+.3f}", f"#{j + 1}")
    return shown


@pytest.mark.parametrize("columns", [80, 60])
def test_narrow_output_never_cuts_a_number(long_named_models, tmp_path, monkeypatch, columns):
    base, models = long_named_models
    monkeypatch.setenv("COLUMNS", str(columns))
    out_json = tmp_path / "d.json"
    r = CliRunner().invoke(app, [base, *models, "--density", "0.5", "--json", str(out_json)])
    assert r.exit_code == 0, r.output
    assert "…" not in r.output
    assert max(len(line) for line in r.output.splitlines()) <= columns
    notes = " ".join(r.output.split("note:")[1:])
    for text, column in _numbers(json.loads(out_json.read_text())).items():
        assert text in r.output or column in notes, (text, column)
    assert "left out to fit" in r.output  # five models' cosines do not fit: it says which columns went


def test_piped_output_keeps_every_column(long_named_models, tmp_path, monkeypatch):
    base, models = long_named_models
    monkeypatch.delenv("COLUMNS", raising=False)
    out_json = tmp_path / "d.json"
    r = CliRunner().invoke(app, [base, *models, "--density", "0.5", "--json", str(out_json)])
    assert r.exit_code == 0, r.output
    assert "…" not in r.output and "left out" not in r.output
    for text in _numbers(json.loads(out_json.read_text())):
        assert text in r.output, text
    for m in models:  # labels whole on one line
        assert Path(m).name in r.output


def test_json_dash_prints_the_json_instead_of_the_tables(hand_models, tmp_path):
    base, models = hand_models
    r = CliRunner().invoke(app, [base, *models, "--json", "-"])
    assert r.exit_code == 0, r.output
    printed = json.loads(r.output)
    r2 = CliRunner().invoke(app, [base, *models, "--json", str(tmp_path / "x.json")])
    assert r2.exit_code == 0
    assert printed == json.loads((tmp_path / "x.json").read_text())
    assert printed["overall"]["conflicts"] == 3 and not (Path.cwd() / "-").exists()
