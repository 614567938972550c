"""pass@1 of generated code: run in a limited subprocess; loops are killed, sockets and processes refused."""

import time

import pytest

from mergelab.llmmix.tasks import GenExample, build_task, score
from mergelab.llmmix.tasks.sandbox import run_tests

HEADER = "def f(x):"
EX = GenExample("Complete the function.\ndef f(x):\n    # return x times 3 plus 1", "return x * 3 + 1",
                {"header": HEADER, "entry": "f", "tests": [[[0], 1], [[2], 7], [[-4], -11]]})


def _plain(body):
    """The same program run without the sandbox: proves the sandbox is what fails it."""
    ns = {}
    exec(HEADER + "\n    " + body + "\n", ns)
    return all(ns["f"](*a) == e for a, e in EX.meta["tests"])


def test_right_body_scores_1_wrong_body_0():
    assert score("pass@1", "return x * 3 + 1", EX) == 1.0
    assert score("pass@1", "  return 3 * x + 1  ", EX) == 1.0
    assert score("pass@1", "return x * 3", EX) == 0.0
    assert score("pass@1", "return x * 3 +", EX) == 0.0  # syntax error
    assert score("pass@1", "", EX) == 0.0
    # JSON comparison: True is not 1
    ex = GenExample("p", "return x % 2 == 0", {"header": HEADER, "entry": "f", "tests": [[[4], True]]})
    assert score("pass@1", "return x % 2 == 0", ex) == 1.0
    assert score("pass@1", "return 1", ex) == 0.0


def test_endless_loop_is_killed_by_the_time_limit():
    t0 = time.monotonic()
    assert score("pass@1", "while True: pass", EX, timeout=0.5) == 0.0
    assert 0.5 <= time.monotonic() - t0 < 4.0
    r = run_tests(HEADER + "\n    import time; time.sleep(30)", "f", EX.meta["tests"], timeout=0.5)
    assert not r.passed and "time limit" in r.reason


def test_socket_and_processes_are_refused():
    body = "import socket; socket.socket(socket.AF_INET, socket.SOCK_STREAM).close(); return x * 3 + 1"
    assert _plain(body)
    r = run_tests(HEADER + "\n    " + body, "f", EX.meta["tests"])
    assert not r.passed and "socket" in r.reason
    body = "import os; os.system('true'); return x * 3 + 1"
    assert not run_tests(HEADER + "\n    " + body, "f", EX.meta["tests"]).passed
    body = "import subprocess; return x * 3 + 1"
    assert not run_tests(HEADER + "\n    " + body, "f", EX.meta["tests"]).passed


def test_memory_and_output_limits():
    r = run_tests(HEADER + "\n    y = bytearray(10**9); return x * 3 + 1", "f", EX.meta["tests"], memory_mb=128)
    assert not r.passed and "MemoryError" in r.reason
    r = run_tests(HEADER + "\n    print('x' * 4096 * 1024); return x * 3 + 1", "f", EX.meta["tests"])
    assert not r.passed


def test_a_printed_fake_result_is_not_taken():
    body = "print('{\"ok\": true}'); return 0"
    assert not run_tests(HEADER + "\n    " + body, "f", EX.meta["tests"]).passed


def test_code_complete_reference_bodies_pass_and_are_not_trivial():
    t = build_task("code_complete", seed=0, sizes={"train": 0, "validation": 0, "test": 8})
    for e in t.split("test"):
        assert t.score(e.answer, e) == 1.0, e.prompt
        assert t.score("return None", e) == 0.0
    with pytest.raises(Exception, match="no meta"):
        score("pass@1", "return 1", GenExample("p", "a"))
