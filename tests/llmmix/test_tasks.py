"""llmmix generative tasks: registry, deterministic disjoint splits, independent oracles per task, metrics, JSONL."""

import contextlib
import io
import json
import re

import pytest

from mergelab.llmmix.tasks import (CATEGORIES, MAX_CHARS, GenExample, TaskError, build_task, get_spec,
                                   load_jsonl_task, score, task_names)
from mergelab.llmmix.tasks.base import word_split
from mergelab.llmmix.tasks.builtin import REFUSAL
from mergelab.llmmix.tasks.metrics import final_number

SMALL = {"train": 60, "validation": 20, "test": 30}
FAKER_TASKS = {"translate_dates", "refusal", "reworded_date"}


def _build(name, seed=0, sizes=SMALL):
    if name in FAKER_TASKS:
        pytest.importorskip("faker")
    return build_task(name, seed=seed, sizes=sizes)


def test_registry_covers_the_five_categories_and_two_held_out():
    merged = task_names(held_out=False)
    held = task_names(held_out=True)
    assert len(merged) >= 8 and len(held) >= 2
    assert {get_spec(n).category for n in merged} == set(CATEGORIES)
    assert set(task_names()) == set(merged) | set(held)
    assert task_names(category="code") == ["code_output", "code_complete"]
    with pytest.raises(TaskError, match="unknown llmmix task 'nope'"):
        get_spec("nope")
    with pytest.raises(TaskError, match="unknown category"):
        task_names(category="poetry")


@pytest.mark.parametrize("name", task_names())
def test_splits_deterministic_disjoint_sized_and_short(name):
    t = _build(name)
    assert {s: len(t.split(s)) for s in SMALL} == SMALL
    prompts = {s: {e.prompt for e in t.split(s)} for s in SMALL}
    assert all(len(prompts[s]) == SMALL[s] for s in SMALL)
    assert not (prompts["train"] & prompts["test"]) and not (prompts["train"] & prompts["validation"])
    assert not (prompts["validation"] & prompts["test"])
    assert _build(name).fingerprint() == t.fingerprint()
    assert _build(name, seed=1).fingerprint() != t.fingerprint()
    # a bigger train split leaves test and validation as they were
    bigger = _build(name, sizes={**SMALL, "train": 90})
    assert [e.prompt for e in bigger.split("test")] == [e.prompt for e in t.split("test")]
    assert [e.prompt for e in bigger.split("validation")] == [e.prompt for e in t.split("validation")]
    for s in SMALL:
        for e in t.split(s):
            assert len(e.prompt) + len(e.answer) <= MAX_CHARS and "\n" not in e.answer
            # the reference answer is right under the task's metric (pass@1 is checked in test_tasks_sandbox)
            if t.metric != "pass@1" and s == "test":
                assert t.score(e.answer, e) == 1.0
                assert t.score(e.answer + "7", e) == 0.0


def test_default_sizes_build():
    t = build_task("arithmetic")
    assert [len(t.split(s)) for s in ("train", "validation", "test")] == [2000, 200, 200]


def test_too_large_a_split_is_a_clear_error():
    from mergelab.llmmix.tasks.base import draw_splits

    with pytest.raises(TaskError, match="only 3 distinct test prompts"):
        draw_splits("tiny", lambda rng, split: GenExample(f"q{rng.randrange(3)}", "a"), 0,
                    {"train": 0, "validation": 0, "test": 5})
    with pytest.raises(TaskError, match="'test' must be a non-negative integer"):
        build_task("arithmetic", sizes={"test": -1})


# ---- independent oracles: each parses the prompt and recomputes the answer its own way


def _all(t):
    return [e for s in ("train", "validation", "test") for e in t.split(s)]


def test_arithmetic_oracle():
    t = _build("arithmetic")
    assert t.metric == "final_number"
    for e in _all(t):
        a, op, b = re.fullmatch(r"What is (\d+) ([-+*]) (\d+)\?", e.prompt).groups()
        value = {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op]
        work, final = re.fullmatch(r"(.*)\. The answer is (\d+)\.", e.answer).groups()
        assert int(final) == value
        assert max(len(a), len(b)) >= 2
        # every step of the column method is a true one-digit fact, ones column first
        steps = [re.fullmatch(r"(\d+(?: [-+*] \d+)+) = (-?\d+)", s).groups() for s in work.split(", ")]
        for lhs, rhs in steps:
            assert eval(lhs) == int(rhs), e.answer
        first = [int(x) for x in re.findall(r"\d+", steps[0][0])]
        a0, b0 = int(a) % 10, int(b) % 10
        assert first in ([a0, b0], [a0 + 10, b0]) if op == "-" else first == [a0, b0 if op == "+" else int(b)]
        # reading the steps right to left gives the answer: the last step's result, then the ones digit
        # of the first (subtraction: tens then ones, a leading zero dropped)
        last, ones = int(steps[-1][1]), int(steps[0][1]) % 10
        assert value == last * 10 + ones, e.answer


def test_word_problems_oracle():
    """The answer recomputed from the prompt's story; every written step a true equation."""
    stories = [
        (r"\w+ has (\d+) (\w+) and gets (\d+) more from .*", lambda a, b: a + b),
        (r"\w+ has (\d+) (\w+) and gives (\d+) to .*", lambda a, b: a - b),
        (r"\w+ buys (\d+) boxes with (\d+) (\w+) in each box\..*", lambda a, b: a * b),
        (r"\w+ shares (\d+) (\w+) equally among (\d+) friends\..*", lambda a, b: a // b),
        (r"\w+ has (\d+) (\w+) and buys (\d+) packs of (\d+) .*", lambda a, b, c: a + b * c),
    ]
    kinds = set()
    for e in _all(_build("word_problems")):
        for k, (pattern, fn) in enumerate(stories):
            m = re.fullmatch(pattern, e.prompt)
            if m:
                nums = [int(x) for x in m.groups() if x.isdigit()]
                break
        else:
            raise AssertionError(f"unknown story: {e.prompt}")
        kinds.add(k)
        if k == 3:
            assert nums[0] % nums[1] == 0
        value = fn(*nums)
        work, final = re.fullmatch(r"(.*)\. The answer is (\d+)\.", e.answer).groups()
        assert int(final) == value >= 0, (e.prompt, e.answer)
        for step in re.split(r", |: ", work):
            if "=" in step:
                lhs, rhs = step.split(" = ")
                assert eval(lhs.replace("/", "//")) == int(rhs), e.answer
        if k in (0, 1):  # two-digit sums and differences are worked by the column method
            assert work.startswith(f"{nums[0]} {'+' if k == 0 else '-'} {nums[1]}: ") and work.count(", ") == 1
    assert kinds == set(range(5))


def test_string_ops_oracle():
    from mergelab.llmmix.tasks.sources import common_english_words

    t = _build("string_ops", sizes={"train": 200, "validation": 20, "test": 30})
    pool = set(common_english_words())
    seen = set()
    for e in _all(t):
        p = e.prompt
        words = re.findall(r"[a-z]+", p.split(":", 1)[1] if ":" in p else re.search(r"'(\w+)'", p).group(1))
        assert words and set(words) <= pool, p  # every split draws from the common-word pool
        if m := re.fullmatch(r"Write the word '(\w+)' in capital letters\.", p):
            assert e.answer == m.group(1).upper()
            seen.add("upper")
        elif m := re.fullmatch(r"Repeat the word '(\w+)' three times\.", p):
            assert e.answer.split() == [m.group(1)] * 3
            seen.add("repeat")
        elif m := re.fullmatch(r"Uppercase every second word: (.*)", p):
            ws = m.group(1).split()
            assert e.answer.split() == [w if i % 2 == 0 else w.upper() for i, w in enumerate(ws)]
            seen.add("upper2")
        elif m := re.fullmatch(r"Write these words in reverse order: (.*)", p):
            assert e.answer.split() == m.group(1).split()[::-1]
            seen.add("reverse")
        elif m := re.fullmatch(r"Write the second word of: (.*)", p):
            assert e.answer == m.group(1).split()[1]
            seen.add("second")
        elif m := re.fullmatch(r"Write the last word of: (.*)", p):
            assert e.answer == m.group(1).split()[-1]
            seen.add("last")
        elif m := re.fullmatch(r"Join these words with underscores: (.*)", p):
            assert e.answer.split("_") == m.group(1).split()
            seen.add("join")
        elif m := re.fullmatch(r"Write the longest of these words: (.*)", p):
            ws = m.group(1).split()
            assert len(e.answer) == max(map(len, ws)) and [len(w) for w in ws].count(len(e.answer)) == 1
            seen.add("longest")
        else:
            raise AssertionError(f"unexpected prompt {p!r}")
    assert seen == {"upper", "repeat", "upper2", "reverse", "second", "last", "join", "longest"}
    prompts = {s: {e.prompt for e in t.split(s)} for s in ("train", "validation", "test")}
    assert not (prompts["test"] & prompts["train"]) and not (prompts["validation"] & prompts["train"])


def test_list_ops_oracle():
    for e in _all(_build("list_ops")):
        if m := re.fullmatch(r"Sort these numbers from smallest to largest: (.*)", e.prompt):
            xs = [int(x) for x in m.group(1).split()]
            got = [int(x) for x in e.answer.split()]
            assert sorted(got) == sorted(xs) and all(a < b for a, b in zip(got, got[1:]))
        elif m := re.fullmatch(r"Write the largest number of this list: (.*)", e.prompt):
            assert int(e.answer) == max(int(x) for x in m.group(1).split())


def test_word_based_tasks_keep_test_words_out_of_training():
    t = _build("letter_count")
    for s in ("train", "validation", "test"):
        for e in t.split(s):
            letter, word = re.fullmatch(r"How many times does the letter '(\w)' occur in '(\w+)'\?", e.prompt).groups()
            assert word_split(word) == s
            assert int(e.answer) == sum(1 for ch in word if ch == letter)


def test_number_compare_oracle():
    for e in _all(_build("number_compare")):
        a, b = map(int, re.findall(r"\d+", e.prompt))
        assert a != b and int(e.answer) == (a if a > b else b)


def test_reworded_held_out_oracles_and_wordings_unseen_by_the_merged_tasks():
    merged_prompts = {e.prompt for n in ("string_ops", "list_ops") for e in _all(_build(n))}
    for e in _all(_build("reworded_upper")):
        word = re.fullmatch(r"(?:Change '(\w+(?: \w+)?)' to upper case|Make '(\w+(?: \w+)?)' all uppercase)\.",
                            e.prompt).group(1, 2)
        word = word[0] or word[1]
        assert e.answer == word.upper() and e.prompt not in merged_prompts
    for e in _all(_build("reworded_max")):
        xs = [int(x) for x in e.prompt.split(":")[1].split()]
        assert int(e.answer) == max(xs) and "Write the largest" not in e.prompt
    pytest.importorskip("faker")
    trained = {e.prompt for e in _all(_build("translate_dates"))}
    for e in _all(_build("reworded_date")):
        assert e.prompt.startswith("How do you say '") and e.prompt not in trained
        english, lang = re.fullmatch(r"How do you say '(.+)' in (\w+)\?", e.prompt).groups()
        assert e.meta["language"] == lang and e.answer.split()[1] == english.split()[1]


def test_language_id_oracle():
    from importlib import resources

    names = {"de": "German", "en": "English", "es": "Spanish", "fr": "French", "it": "Italian", "nl": "Dutch",
             "pt": "Portuguese", "sv": "Swedish"}
    path = resources.files("mergelab") / "data" / "suites" / "textmix" / "language.jsonl"
    lang = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        lang[row["text"]] = names[row["label"]]
    t = _build("language_id")
    for s in ("train", "test"):
        for e in t.split(s):
            w1, w2 = re.findall(r"'([^']+)'", e.prompt)
            assert lang[w1] == lang[w2] == e.answer
            assert word_split(w1) == word_split(w2) == s


GERMAN_DAYS = {"Sunday": "Sonntag", "Monday": "Montag", "Tuesday": "Dienstag", "Wednesday": "Mittwoch",
               "Thursday": "Donnerstag", "Friday": "Freitag", "Saturday": "Samstag"}
GERMAN_MONTHS = dict(zip("January February March April May June July August September October November December".split(),
                         "Januar Februar März April Mai Juni Juli August September Oktober November Dezember".split()))
SPANISH_DAYS = {"Monday": "lunes", "Wednesday": "miércoles", "Saturday": "sábado"}


def test_translate_dates_oracle_for_german_and_spanish():
    t = _build("translate_dates", sizes={"train": 200, "validation": 0, "test": 0})
    checked = 0
    for e in t.split("train"):
        day, d, month, lang = re.fullmatch(r"Write '(\w+) (\d+) (\w+)' in (\w+)\.", e.prompt).groups()
        if lang == "German":
            assert e.answer == f"{GERMAN_DAYS[day]} {d} {GERMAN_MONTHS[month]}"
            checked += 1
        elif lang == "Spanish" and day in SPANISH_DAYS:
            assert e.answer.split()[0] == SPANISH_DAYS[day]
            checked += 1
    assert checked >= 20
    assert {re.search(r"in (\w+)\.$", e.prompt).group(1) for e in t.split("train")} == \
        {"German", "French", "Spanish", "Italian", "Dutch", "Portuguese"}


def test_code_output_oracle_runs_each_program():
    for e in _all(_build("code_output")):
        code = e.prompt.split("\n", 1)[1]
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            exec(compile(code, "<trusted generated program>", "exec"), {})
        assert buf.getvalue().strip() == e.answer, code


def test_refusal_has_both_kinds_and_scores_over_refusal_as_wrong():
    t = _build("refusal")
    for s in ("train", "validation", "test"):
        kinds = [e.meta["kind"] for e in t.split(s)]
        assert 0.25 < kinds.count("harmful") / len(kinds) < 0.75
    for e in _all(t):
        if e.meta["kind"] == "harmful":
            assert e.answer == REFUSAL
            assert re.search(r"password|PIN|credit card|security code", e.prompt)
            assert t.score(REFUSAL, e) == 1.0 and t.score("1234", e) == 0.0
            assert t.score("I can't  help with that. ", e) == 1.0  # whitespace normalised
        else:
            assert e.answer != REFUSAL
            assert t.score(e.answer, e) == 1.0 and t.score(REFUSAL, e) == 0.0
    # the benign look-alikes use the same vocabulary as the requests to refuse
    assert any("password" in e.prompt or "credit card" in e.prompt for e in _all(t) if e.meta["kind"] == "benign")


# ---- metrics on hand-made predictions


def test_exact_match_normalises_whitespace_only():
    ex = GenExample("What is 12 + 30?", "42")
    assert score("exact", "42", ex) == 1.0
    assert score("exact", "  42 ", ex) == 1.0
    assert score("exact", "43", ex) == 0.0
    assert score("exact", "42.", ex) == 0.0
    ex2 = GenExample("q", "the CAT sat")
    assert score("exact", "the  CAT\tsat", ex2) == 1.0
    assert score("exact", "the cat sat", ex2) == 0.0


def test_final_number_metric():
    ex = GenExample("q", "5 + 3 = 8. The answer is 8.")
    assert score("final_number", "The answer is 8", ex) == 1.0
    assert score("final_number", "8", ex) == 1.0
    assert score("final_number", "5 + 3 = 9. The answer is 8.", ex) == 1.0  # the final answer counts
    assert score("final_number", "5 + 3 = 8. The answer is 9.", ex) == 0.0
    assert score("final_number", "no idea", ex) == 0.0
    assert final_number("the answer is 1,234.") == 1234
    assert final_number("answer is -3.50 dollars") == final_number("-3.5")
    with pytest.raises(TaskError, match="has no number"):
        score("final_number", "1", GenExample("q", "none"))
    with pytest.raises(TaskError, match="unknown metric"):
        score("bleu", "1", ex)


# ---- JSONL user tasks


def _write(tmp_path, rows, name="mine.jsonl"):
    p = tmp_path / name
    p.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    return p


def test_jsonl_with_splits(tmp_path):
    p = _write(tmp_path, [{"prompt": "a?", "answer": "1", "split": "train"},
                          {"prompt": "b?", "answer": "2", "split": "test"}, "",
                          {"prompt": "c?", "answer": "3", "split": "validation", "meta": {"k": 1}}])
    t = load_jsonl_task(p)
    assert t.name == "mine" and t.metric == "exact"
    assert [e.prompt for e in t.split("train")] == ["a?"]
    assert [e.answer for e in t.split("test")] == ["2"]
    assert t.split("validation")[0].meta == {"k": 1}


def test_jsonl_ratio_split_is_seeded_and_keeps_repeated_prompts_together(tmp_path):
    rows = [{"prompt": f"q{i}", "answer": str(i)} for i in range(50)] + [{"prompt": "q7", "answer": "7"}]
    p = _write(tmp_path, rows)
    t = load_jsonl_task(p, seed=3, ratios=(0.6, 0.2, 0.2))
    sizes = {s: len({e.prompt for e in t.split(s)}) for s in ("train", "validation", "test")}
    assert sizes == {"train": 30, "validation": 10, "test": 10}
    assert sum(len(t.split(s)) for s in sizes) == 51
    where = [s for s in sizes for e in t.split(s) if e.prompt == "q7"]
    assert len(where) == 2 and where[0] == where[1]
    again = load_jsonl_task(p, seed=3, ratios=(0.6, 0.2, 0.2))
    assert again.fingerprint() == t.fingerprint()
    assert load_jsonl_task(p, seed=4, ratios=(0.6, 0.2, 0.2)).fingerprint() != t.fingerprint()


@pytest.mark.parametrize("rows,line,msg", [
    (['{"prompt": "a", "answer": "1"}', '{"prompt": "b", "answer": '], 2, "not valid JSON"),
    ([{"prompt": "a", "answer": "1"}, {"prompt": "b"}], 2, "missing 'answer'"),
    ([{"prompt": "a", "answer": 1}], 1, "'answer' must be a non-empty string"),
    ([{"prompt": "a", "answer": "1\n2"}], 1, "one line"),
    ([{"prompt": "a", "answer": "1", "split": "dev"}], 1, "split must be one of"),
    ([{"prompt": "a", "answer": "1", "split": "train"}, {"prompt": "b", "answer": "2"}], 2, "give every line a split"),
    ([{"prompt": "a", "answer": "1"}, {"prompt": "a", "answer": "2"}], 2, "different answer"),
    ([{"prompt": "a", "answer": "1", "split": "train"}, {"prompt": "a", "answer": "1", "split": "test"}], 2,
     "in split 'test', not 'train'"),
    ([{"prompt": "a", "answer": "1", "label": "x"}], 1, "unknown field"),
    (['[1, 2]'], 1, "expected a JSON object"),
])
def test_jsonl_errors_name_file_and_line(tmp_path, rows, line, msg):
    p = _write(tmp_path, rows)
    with pytest.raises(TaskError) as e:
        load_jsonl_task(p)
    assert f"{p} line {line}" in str(e.value) and msg in str(e.value)


def test_jsonl_file_level_errors(tmp_path):
    with pytest.raises(TaskError, match="no such task file"):
        load_jsonl_task(tmp_path / "missing.jsonl")
    with pytest.raises(TaskError, match="no examples"):
        load_jsonl_task(_write(tmp_path, [""]))
    with pytest.raises(TaskError, match="ratios must be three"):
        load_jsonl_task(_write(tmp_path, [{"prompt": "a", "answer": "1"}]), ratios=(0.5, 0.5, 0.5))


def test_docs_task_table_is_current():
    from pathlib import Path

    from mergelab.llmmix.tasks.base import markdown_table

    pytest.importorskip("faker")
    doc = (Path(__file__).resolve().parents[2] / "docs" / "llmmix.md").read_text(encoding="utf-8")
    section = doc.split("## Tasks", 1)[1]
    assert markdown_table(seed=0) in section
    for name in task_names():
        assert f"| `{name}`" in section


def test_same_data_in_another_process_with_another_hash_seed():
    """Nothing may depend on set order (Python's hash seed): a fresh process draws the same tasks."""
    import os
    import subprocess
    import sys

    names = [n for n in task_names() if n not in FAKER_TASKS or _has_faker()]
    code = ("from mergelab.llmmix.tasks import build_task\n"
            f"print(' '.join(build_task(n, seed=5, sizes={SMALL!r}).fingerprint() for n in {names!r}))")
    env = {**os.environ, "PYTHONHASHSEED": "12345", "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    here = " ".join(build_task(n, seed=5, sizes=SMALL).fingerprint() for n in names)
    assert out.stdout.strip() == here


def _has_faker():
    try:
        import faker  # noqa: F401
    except ImportError:
        return False
    return True


def test_write_then_load_gives_the_task_back(tmp_path):
    from mergelab.llmmix.tasks import write_task_jsonl

    t = build_task("code_complete", seed=2, sizes=SMALL)
    p = write_task_jsonl(t, tmp_path / "sub" / "code_complete.jsonl")
    back = load_jsonl_task(p, category="code", metric="pass@1")
    assert back.name == "code_complete" and back.fingerprint() == t.fingerprint()
    assert back.split("test")[0].meta == t.split("test")[0].meta
    assert not list((tmp_path / "sub").glob("*.tmp"))
