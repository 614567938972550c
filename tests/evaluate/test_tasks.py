import json
from collections import Counter

import pytest

from mergelab.evaluate.tasks import (SPLITS, Example, SuiteError, builtin_suite_names, builtin_suites_dir,
                                     load_suite, load_task_file, stratified_split)


def test_stratified_split_is_deterministic_complete_and_stratified():
    items = list(range(300))
    labels = [i % 3 for i in items]
    a = stratified_split(items, labels, seed=7, fractions=(0.6, 0.2, 0.2))
    b = stratified_split(list(reversed(items)), list(reversed(labels)), seed=7, fractions=(0.6, 0.2, 0.2))
    assert a == stratified_split(items, labels, seed=7, fractions=(0.6, 0.2, 0.2))
    assert sorted(x for s in SPLITS for x in a[s]) == items  # every item exactly once
    assert {s: len(a[s]) for s in SPLITS} == {"train": 180, "validation": 60, "test": 60}
    for s in SPLITS:
        assert Counter(x % 3 for x in a[s]) == Counter({0: len(a[s]) // 3, 1: len(a[s]) // 3, 2: len(a[s]) // 3})
    assert sorted(b["test"]) != sorted(stratified_split(items, labels, seed=8, fractions=(0.6, 0.2, 0.2))["test"])


def test_stratified_split_caps_keep_label_proportions():
    items = list(range(1000))
    labels = [0 if i < 750 else 1 for i in items]
    out = stratified_split(items, labels, seed=0, fractions=(0.8, 0.1, 0.1), caps=(400, None, 40))
    assert len(out["train"]) == 400 and len(out["validation"]) == 100 and len(out["test"]) == 40
    assert Counter(labels[i] for i in out["train"]) == Counter({0: 300, 1: 100})
    assert Counter(labels[i] for i in out["test"]) == Counter({0: 30, 1: 10})


def test_user_csv_task_is_split_from_seed(tmp_path):
    path = tmp_path / "reviews.csv"
    rows = ["text,label"] + [f"review number {i},{'good' if i % 2 else 'bad'}" for i in range(50)]
    path.write_text("\n".join(rows) + "\n")
    task = load_task_file(path, seed=3)
    assert task.name == "reviews" and task.labels == ["bad", "good"]
    assert sum(len(task.split(s)) for s in SPLITS) == 50
    # per label (25 each): 2.5 -> 3 validation and 3 test examples
    assert {s: len(task.split(s)) for s in SPLITS} == {"train": 38, "validation": 6, "test": 6}
    again = load_task_file(path, seed=3)
    assert again.fingerprint() == task.fingerprint()
    assert load_task_file(path, seed=4).fingerprint() != task.fingerprint()
    ex = task.split("test")[0]
    assert isinstance(ex, Example) and task.labels[ex.label] == ("good" if int(ex.text.split()[-1]) % 2 else "bad")


def test_user_jsonl_task_keeps_given_splits_and_named_columns(tmp_path):
    path = tmp_path / "intents.jsonl"
    rows = [{"utterance": f"u{i}", "intent": "a" if i % 2 else "b",
             "split": ["train", "validation", "test"][i % 3]} for i in range(12)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    task = load_task_file(path, name="intents", text="utterance", label="intent")
    assert [e.text for e in task.split("validation")] == ["u1", "u4", "u7", "u10"]


@pytest.mark.parametrize("content,suffix,message", [
    ("text,lab\nhello,x\n", ".csv", "missing column 'label'"),
    ('{"text": "a", "label": "x"}\nnot json\n', ".jsonl", ":2: not valid JSON"),
    ('{"text": "a", "label": "x", "split": "dev"}\n{"text": "b", "label": "y", "split": "train"}\n', ".jsonl",
     "expected only train, validation, test"),
    ("text,label\na,x\nb,x\n", ".csv", "at least 2 labels"),
    ("anything", ".txt", "unsupported extension"),
])
def test_bad_task_files_are_explained(tmp_path, content, suffix, message):
    path = tmp_path / f"task{suffix}"
    path.write_text(content)
    with pytest.raises(SuiteError, match=message) as err:
        load_task_file(path)
    assert str(path) in str(err.value)


def test_builtin_textmix_suite_is_complete_offline_and_documented():
    assert "textmix" in builtin_suite_names()
    suite = load_suite("textmix")  # verifies every file against its recorded fingerprint
    spec = json.loads((builtin_suites_dir() / "textmix" / "suite.json").read_text())
    assert len(suite.tasks) >= 8 and len(suite.merge_task_names) >= 8
    assert set(suite.held_out) <= set(suite.task_names)
    total = 0
    for task, entry in zip(suite.tasks, spec["tasks"]):
        assert task.provenance and task.licence and task.description
        sizes = {s: len(task.split(s)) for s in SPLITS}
        assert sizes == entry["sizes"] and min(sizes.values()) >= 100
        texts = [set(e.text for e in task.split(s)) for s in SPLITS]
        assert not (texts[0] & texts[1] or texts[0] & texts[2] or texts[1] & texts[2]), task.name
        assert set(e.label for e in task.split("test")) == set(range(task.num_labels))
        total += (builtin_suites_dir() / "textmix" / entry["file"]).stat().st_size
    assert total < 4 * 2**20
    readme = (builtin_suites_dir() / "textmix" / "README.md").read_text()
    assert all(t in readme for t in suite.task_names)


def test_changed_suite_file_is_detected(tmp_path):
    import shutil

    folder = tmp_path / "textmix"
    shutil.copytree(builtin_suites_dir() / "textmix", folder)
    path = folder / "sentiment.jsonl"
    lines = path.read_text().splitlines()
    row = json.loads(lines[0])
    row["label"] = "positive" if row["label"] == "negative" else "negative"
    path.write_text("\n".join([json.dumps(row)] + lines[1:]) + "\n")
    with pytest.raises(SuiteError, match="fingerprint"):
        load_suite(str(folder))


def test_yaml_suite_extends_builtin_and_adds_a_task_in_one_line(tmp_path):
    data = tmp_path / "mine.jsonl"
    data.write_text("".join(json.dumps({"text": f"t{i}", "label": str(i % 2)}) + "\n" for i in range(30)))
    spec = tmp_path / "suite.yaml"
    spec.write_text("name: mine\nextends: textmix\ntasks:\n  mine: mine.jsonl\n")
    suite = load_suite(str(spec))
    assert suite.task_names[-1] == "mine" and len(suite.tasks) == len(load_suite("textmix").tasks) + 1
    assert suite.held_out == load_suite("textmix").held_out
    cli = load_suite("textmix", [f"other={data}"])
    assert cli.task("other").labels == ["0", "1"]
    with pytest.raises(SuiteError, match="NAME=PATH"):
        load_suite("textmix", [str(data)])
    (tmp_path / "bad.yaml").write_text("tasks:\n  x: {path: mine.jsonl, colour: red}\n")
    with pytest.raises(SuiteError, match="unknown key"):
        load_suite(str(tmp_path / "bad.yaml"))
    with pytest.raises(SuiteError, match="neither a built-in suite"):
        load_suite("no-such-suite")


@pytest.mark.parametrize("name,package", [("sentiment", "vaderSentiment"), ("surname", "faker")])
def test_shipped_task_is_what_the_builder_makes(name, package):
    """The shipped files are reproducible from their source packages (when those are installed)."""
    pytest.importorskip(package)
    from mergelab.evaluate.suite_build import build_task

    spec = json.loads((builtin_suites_dir() / "textmix" / "suite.json").read_text())
    entry = next(e for e in spec["tasks"] if e["name"] == name)
    task = build_task(name, spec["seed"])
    assert task.fingerprint() == entry["fingerprint"] and task.labels == entry["labels"]
