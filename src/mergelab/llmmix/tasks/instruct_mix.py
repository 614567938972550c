"""The instruction mix that makes an *instruction-tuned* ``llmmix`` base (:mod:`mergelab.llmmix.instruct`).

"What Matters for Model Merging at Scale?" (Yadav et al., 2024) merges experts fine-tuned from a
pretrained base and from its instruction-tuned version, and finds the second merges better. The
miniature of that base here is the pretrained base further trained on a mix of instruction tasks that
are *other* than the suite's: none of these is one of the nine merged tasks or the held-out ones, and
none teaches their operations (no upper-casing, maximum, sorting, arithmetic, dates, languages, code or
refusals), so what the instruction-tuned base brings to the experts is the habit of following a stated
instruction and stopping, not their skills. Words come from the same common-word pool as the merged
tasks (:func:`.sources.common_english_words`), names from Faker's tables.

These tasks are not in the registry of :mod:`.base` (``task_names()`` lists the suite's tasks only);
:func:`instruct_tasks` draws them with the suite's split machinery, so their splits are seeded and
disjoint like every task's.
"""

from __future__ import annotations

from typing import Optional

from mergelab.llmmix.tasks import sources
from mergelab.llmmix.tasks.base import GenExample, GenTask, TaskError, _sizes, draw_splits


def _ex(prompt: str, answer: str) -> GenExample:
    return GenExample(prompt=prompt, answer=answer)


def _words(rng, n: int) -> list:
    return rng.sample(list(sources.common_english_words()), n)


def sample_echo(rng, split):
    ws = _words(rng, rng.randint(2, 4))
    return _ex("Say exactly this: " + " ".join(ws), " ".join(ws))


def sample_swap_words(rng, split):
    a, b = _words(rng, 2)
    return _ex(f"Swap the two words: {a} {b}", f"{b} {a}")


def sample_word_after(rng, split):
    ws = _words(rng, rng.randint(3, 5))
    i = rng.randrange(len(ws) - 1)
    return _ex(f"In '{' '.join(ws)}', which word comes after '{ws[i]}'?", ws[i + 1])


def sample_brackets(rng, split):
    ws = _words(rng, rng.randint(2, 4))
    return _ex("Put each word in square brackets: " + " ".join(ws), " ".join(f"[{w}]" for w in ws))


def sample_double(rng, split):
    ws = _words(rng, rng.randint(2, 3))
    return _ex("Write each word twice: " + " ".join(ws), " ".join(f"{w} {w}" for w in ws))


def sample_contains(rng, split):
    xs = rng.sample(range(1, 100), rng.randint(3, 6))
    x = rng.choice(xs) if rng.random() < 0.5 else rng.choice([v for v in range(1, 100) if v not in xs])
    return _ex(f"Does the list {' '.join(map(str, xs))} contain {x}? Answer yes or no.", "yes" if x in xs else "no")


def sample_surname_first(rng, split):
    p = sources.persona(rng)
    first, last = p["first"], p["name"][len(p["first"]) + 1:]
    return _ex(f"Write the name {p['name']} with the surname first.", f"{last} {first}")


def sample_count(rng, split):
    n, k, step = rng.randint(10, 999), rng.randint(3, 5), rng.choice((1, -1))
    word = "up" if step == 1 else "down"
    return _ex(f"Count {word} from {n}, {k} numbers.", " ".join(str(n + step * i) for i in range(k)))


# name -> (sampler, what it asks, what it is built from)
INSTRUCT_MIX = {
    "echo": (sample_echo, "repeat 2-4 words exactly", "common English words"),
    "swap_words": (sample_swap_words, "swap two words", "common English words"),
    "word_after": (sample_word_after, "the word that follows a given word", "common English words"),
    "brackets": (sample_brackets, "put each word in square brackets", "common English words"),
    "double": (sample_double, "write each word twice", "common English words"),
    "contains": (sample_contains, "yes/no: does a list contain a number", "generated numbers"),
    "surname_first": (sample_surname_first, "a name with the surname first", "Faker person tables (MIT)"),
    "count": (sample_count, "count up or down k numbers from n", "generated numbers"),
}


def instruct_tasks(seed: int = 0, sizes: Optional[dict] = None, names=None) -> list:
    """The instruction mix as :class:`~.base.GenTask` objects (splits drawn as for the suite's tasks;
    default sizes 2000/200/200 each), all of them or ``names``."""
    names = list(INSTRUCT_MIX) if names is None else list(names)
    unknown = [n for n in names if n not in INSTRUCT_MIX]
    if unknown:
        raise TaskError(f"instruction mix: unknown task(s) {', '.join(unknown)}; known: {', '.join(INSTRUCT_MIX)}")
    out = []
    for name in names:
        sampler, description, source = INSTRUCT_MIX[name]
        splits = draw_splits("instruct/" + name, sampler, seed, sizes)
        out.append(GenTask(name=name, category="instruction", splits=splits, description=description, source=source,
                           max_new_tokens=24, meta={"seed": seed, "sizes": _sizes(sizes), "mix": "instruct"}))
    return out
