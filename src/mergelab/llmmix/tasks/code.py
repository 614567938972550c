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


def sample_code_output(rng, split):
    a, n = rng.randint(1, 50), rng.randint(2, 9)
    k = rng.randrange(8)
    if k == 0:
        code, out = f"x = {a}\nfor i in range({n}):\n    x = x + i\nprint(x)", a + n * (n - 1) // 2
    elif k == 1:
        b, c = rng.randint(1, 20), rng.randint(-9, 20)
        code, out = f"def f(n):\n    return n * {n} + {b}\nprint(f({c}))", c * n + b
    elif k == 2:
        xs = [rng.randint(-20, 60) for _ in range(rng.randint(2, 6))]
        code, out = f"xs = [{_list_text(xs)}]\nprint(max(xs) - min(xs))", max(xs) - min(xs)
    elif k == 3:
        w = rng.choice(_words(split))
        code, out = f"s = '{w}'\nprint(len(s) * {n})", len(w) * n
    elif k == 4:
        a = rng.randint(1, 999)
        code = f"x = {a}\nif x % 2 == 0:\n    x = x // 2\nelse:\n    x = 3 * x + 1\nprint(x)"
        out = a // 2 if a % 2 == 0 else 3 * a + 1
    elif k == 5:
        w = rng.choice(_words(split))
        i = rng.randrange(len(w) - 1)
        j = rng.randint(i + 1, len(w))
        code, out = f"s = '{w}'\nprint(s[{i}:{j}])", w[i:j]
    elif k == 6:
        m = rng.randint(2, 5000)
        c, v = 0, m
        while v > 1:
            v //= 2
            c += 1
        code, out = f"n = {m}\nc = 0\nwhile n > 1:\n    n = n // 2\n    c = c + 1\nprint(c)", c
    else:
        xs = [rng.randint(0, 40) for _ in range(rng.randint(3, 6))]
        t = rng.randint(5, 30)
        code, out = f"xs = [{_list_text(xs)}]\nprint(sum(v for v in xs if v > {t}))", sum(v for v in xs if v > t)
    return GenExample(prompt=f"What does this program print?\n{code}", answer=str(out))
