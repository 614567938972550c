"""The code tasks: predict a small program's output (exact match) and complete a function (executed, pass@1).

``code_complete`` examples carry, in ``meta``, the function ``header`` (``def name(params):``), the
function name (``entry``) and ``tests``: ``[args, expected]`` pairs computed here from a reference
written in Python (never by running the reference body as text). The metric builds
``header + "\\n    " + completion`` and runs the tests in the sandbox of :mod:`.sandbox`.
"""

from __future__ import annotations

from mergelab.llmmix.tasks import sources
from mergelab.llmmix.tasks.base import GenExample

_NAMES = ("f", "g", "h", "calc", "solve", "work", "compute", "step", "apply", "value")
_LETTERS = "abcdehilmnorst"
_WORDS = None


def _words(split):
    """Common English words of 4-8 letters, the same pool in every split (as ``string_ops``: see
    :mod:`mergelab.llmmix.tasks.builtin`)."""
    global _WORDS
    if _WORDS is None:
        _WORDS = sources.common_english_words(4, 8)
    return list(_WORDS)


def _int_args(rng):
    return [[rng.randint(-20, 20)] for _ in range(4)]


def _list_args(rng):
    return [[[rng.randint(-9, 30) for _ in range(rng.randint(0, 5))]] for _ in range(4)]


def _str_args(rng, split):
    return [[rng.choice(_words(split))] for _ in range(3)] + [[""]]


def _spec(rng, split):
    """(params, comment, reference body, reference function, test argument lists)."""
    a, b = rng.randint(2, 9), rng.randint(1, 20)
    c = rng.choice(_LETTERS)
    k = rng.randrange(12)
    if k == 0:
        return "x", f"return x times {a} plus {b}", f"return x * {a} + {b}", lambda x: x * a + b, _int_args(rng)
    if k == 1:
        return "x", f"return x squared minus {b}", f"return x * x - {b}", lambda x: x * x - b, _int_args(rng)
    if k == 2:
        args = _int_args(rng) + [[a * rng.randint(-3, 3)]]
        return "x", f"return True if x is divisible by {a}, else False", f"return x % {a} == 0", \
            lambda x: x % a == 0, args
    if k == 3:
        return "xs", f"return the numbers in xs greater than {b}", f"return [v for v in xs if v > {b}]", \
            lambda xs: [v for v in xs if v > b], _list_args(rng)
    if k == 4:
        return "xs", f"return the sum of xs plus {b}", f"return sum(xs) + {b}", lambda xs: sum(xs) + b, _list_args(rng)
    if k == 5:
        return "xs", f"return each number of xs multiplied by {a}", f"return [v * {a} for v in xs]", \
            lambda xs: [v * a for v in xs], _list_args(rng)
    if k == 6:
        return "xs", f"return the last {a} items of xs", f"return xs[-{a}:]", lambda xs: xs[-a:], _list_args(rng)
    if k == 7:
        return "s", f"return s repeated {a} times", f"return s * {a}", lambda s: s * a, _str_args(rng, split)
    if k == 8:
        return "s", f"return the first {a} characters of s", f"return s[:{a}]", lambda s: s[:a], _str_args(rng, split)
    if k == 9:
        return "s", f"return how many times '{c}' occurs in s", f"return s.count('{c}')", \
            lambda s: s.count(c), _str_args(rng, split)
    if k == 10:
        return "s", f"return s followed by '{c}'", f"return s + '{c}'", lambda s: s + c, _str_args(rng, split)
    args = [[rng.randint(-20, 20), rng.randint(-20, 20)] for _ in range(4)]
    return "x, y", f"return the larger of x and y plus {b}", f"return max(x, y) + {b}", \
        lambda x, y: max(x, y) + b, args


def sample_code_complete(rng, split):
    name = rng.choice(_NAMES)
    params, comment, body, ref, args = _spec(rng, split)
    header = f"def {name}({params}):"
    tests = [[list(arg), ref(*arg)] for arg in args]
    prompt = f"Complete the function.\n{header}\n    # {comment}"
    return GenExample(prompt=prompt, answer=body, meta={"header": header, "entry": name, "tests": tests})


def _list_text(xs):
    return ", ".join(map(str, xs))


_SIZE_WORDS = (("big", "small"), ("high", "low"), ("yes", "no"), ("hot", "cold"), ("long", "short"))


def _small_list(rng, lo=-9, hi=40):
    return [rng.randint(lo, hi) for _ in range(rng.randint(3, 6))]


def sample_code_output(rng, split):
    """Predict what a 1-6 line program prints: indexing, ``len``, ``max`` / ``min``, variables that are
    reassigned, branches, comparisons, membership, one-digit sums and products, counting loops, a
    halving loop, string methods and ``sorted``.

    Each kind is code reasoning a pupil does by tracing the program, with numbers kept to one-digit
    facts: the first version asked two- and three-digit sums and products inside the programs (a loop
    adding ``range(n)`` to a two-digit start, ``3 * x + 1`` for ``x`` up to 999) and its 3m expert
    scored 11.5%, 0% on every kind but the halving loop, i.e. the arithmetic, not the code, was the
    task.
    """
    k = rng.randrange(12)
    if k == 0:
        xs = _small_list(rng)
        i = rng.choice(list(range(len(xs))) + [-1])
        code, out = f"xs = [{_list_text(xs)}]\nprint(xs[{i}])", xs[i]
    elif k == 1:
        xs = [rng.randint(-9, 40) for _ in range(rng.randint(1, 7))]
        code, out = f"xs = [{_list_text(xs)}]\nprint(len(xs))", len(xs)
    elif k == 2:
        xs, fn = _small_list(rng), rng.choice(("max", "min"))
        code, out = f"xs = [{_list_text(xs)}]\nprint({fn}(xs))", max(xs) if fn == "max" else min(xs)
    elif k == 3:
        a, b = rng.sample(range(1, 60), 2)
        first, second = rng.sample("abcxyzmnpq", 2)
        shown = rng.choice((first, second))
        code = f"{first} = {a}\n{second} = {first}\n{first} = {b}\nprint({shown})"
        out = b if shown == first else a
    elif k == 4:
        x, t = rng.randint(0, 99), rng.randint(1, 98)
        yes, no = rng.choice(_SIZE_WORDS)
        op = rng.choice((">", "<"))
        code = f"x = {x}\nif x {op} {t}:\n    print('{yes}')\nelse:\n    print('{no}')"
        out = yes if (x > t if op == ">" else x < t) else no
    elif k == 5:
        if rng.random() < 0.5:
            a, b = rng.randint(0, 99), rng.randint(0, 99)
            op = rng.choice(("<", ">", "==", "!="))
            code, out = f"print({a} {op} {b})", {"<": a < b, ">": a > b, "==": a == b, "!=": a != b}[op]
        else:
            xs, v = _small_list(rng, 0, 20), rng.randint(0, 20)
            code, out = f"print({v} in [{_list_text(xs)}])", v in xs
    elif k == 6:
        a, b = rng.randint(0, 9), rng.randint(1, 9)
        code, out = f"x = {a}\nx = x + {b}\nprint(x)", a + b
    elif k == 7:
        n, c = rng.randint(2, 9), rng.randint(0, 9)
        name = rng.choice(_NAMES)
        code, out = f"def {name}(n):\n    return n * {n}\nprint({name}({c}))", c * n
    elif k == 8:
        xs, t = _small_list(rng, 0, 40), rng.randint(5, 30)
        code = f"c = 0\nfor v in [{_list_text(xs)}]:\n    if v > {t}:\n        c = c + 1\nprint(c)"
        out = sum(v > t for v in xs)
    elif k == 9:
        m = rng.randint(2, 5000)
        c, v = 0, m
        while v > 1:
            v //= 2
            c += 1
        code, out = f"n = {m}\nc = 0\nwhile n > 1:\n    n = n // 2\n    c = c + 1\nprint(c)", c
    elif k == 10:
        w = rng.choice(_words(split))
        method = rng.choice(("upper", "capitalize"))
        code, out = f"s = '{w}'\nprint(s.{method}())", getattr(w, method)()
    else:
        xs = rng.sample(range(0, 50), rng.randint(3, 5))
        code, out = f"print(sorted([{_list_text(xs)}]))", sorted(xs)
    return GenExample(prompt=f"What does this program print?\n{code}", answer=str(out))
