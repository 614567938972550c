"""Run model-written Python against test cases in a separate, limited process (for pass@1 metrics).

Each call starts a fresh interpreter, ``python -I -S`` (isolated mode: no environment variables, no
user site, no current directory on the path; no ``site``, so no installed packages), with an empty
environment, standard input closed, and a new temporary working directory that is deleted afterwards.
Before the candidate code runs, that process

* lowers its own resource limits: address space (``RLIMIT_AS``, 256 MiB by default), CPU seconds
  (``RLIMIT_CPU``), size of any file written (``RLIMIT_FSIZE``, 1 MiB: its stdout and stderr are
  files too, so printing in a loop is stopped) and core dumps (none);
* leaves the network: it tries ``unshare(CLONE_NEWNET)`` (works as root) and then
  ``unshare(CLONE_NEWUSER | CLONE_NEWNET)`` (works where unprivileged user namespaces are enabled);
  in the new namespace there is no interface but a down loopback, so nothing can be reached;
* blocks, whatever happened above, the imports of ``socket``, ``_socket``, ``ssl``, ``select``,
  ``asyncio``, ``subprocess``, ``multiprocessing``, ``ctypes``, ``posix`` and the HTTP/URL clients,
  and replaces ``os.system``, ``os.popen``, ``os.fork``, ``os.kill``, the ``os.exec*``, ``os.spawn*``
  and ``os.posix_spawn*`` functions by ones that raise ``PermissionError``.

The parent kills the process group after a wall-clock time limit (2 s by default), so an endless
loop or a sleep scores 0.

Limits of this sandbox (say so where results are published): it guards against the accidents of
generated code (loops, memory blow-ups, stray network or file use), not against code written to
escape: the blocks are Python-level (``sys.modules`` entries and ``os`` attributes) and can be undone
from Python by code that means to. Without a network namespace (neither unshare works) only those
blocks stand between the code and the network; files the user can read stay readable. Run untrusted
models' code in a container or VM.
"""

from __future__ import annotations

import json
import math
import os
import secrets
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass

_HARNESS = r"""
import sys, json, resource, os
mem, cpu, fsize = (int(v) for v in sys.argv[2:5])
resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))
resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu))
netns = "none"
try:
    import ctypes
    _libc = ctypes.CDLL(None, use_errno=True)
    if _libc.unshare(0x40000000) == 0:
        netns = "netns"
    elif _libc.unshare(0x10000000 | 0x40000000) == 0:
        netns = "userns+netns"
    del _libc
except Exception:
    pass
with open(sys.argv[1], encoding="utf-8") as fh:
    payload = json.load(fh)
os.remove(sys.argv[1])
nonce = payload.pop("nonce")
out = os.fdopen(int(sys.argv[5]), "w")
for _m in ("socket", "_socket", "ssl", "_ssl", "select", "selectors", "asyncio", "subprocess",
           "_posixsubprocess", "multiprocessing", "_multiprocessing", "ctypes", "_ctypes", "posix",
           "urllib.request", "http.client", "ftplib", "smtplib", "telnetlib", "xmlrpc.client", "resource"):
    sys.modules[_m] = None
def _denied(*a, **k):
    raise PermissionError("not allowed in the sandbox")
for _n in ("system", "popen", "fork", "forkpty", "kill", "killpg", "posix_spawn", "posix_spawnp",
           "execv", "execve", "execl", "execle", "execlp", "execlpe", "execvp", "execvpe",
           "spawnv", "spawnve", "spawnl", "spawnle", "spawnlp", "spawnlpe", "spawnvp", "spawnvpe"):
    if hasattr(os, _n):
        setattr(os, _n, _denied)
resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
del resource
ok, why = False, ""
try:
    ns = {"__name__": "__candidate__"}
    exec(compile(payload["program"], "<candidate>", "exec"), ns)
    fn = ns[payload["entry"]]
    for args, expected in payload["tests"]:
        got = fn(*args)
        if json.dumps(got, sort_keys=True) != json.dumps(expected, sort_keys=True):
            why = "wrong answer for %r" % (args,)
            break
    else:
        ok = True
except BaseException as e:
    why = "%s: %s" % (type(e).__name__, str(e)[:200])
out.write(json.dumps({"nonce": nonce, "ok": ok, "why": why, "netns": netns}))
out.flush()
os._exit(0)
"""


@dataclass
class SandboxResult:
    """``passed``: every test returned the expected value. ``reason``: why not (or ``""``);
    ``isolation``: ``netns`` / ``userns+netns`` when the process left the network, else ``none``."""

    passed: bool
    reason: str = ""
    isolation: str = ""


def run_tests(program: str, entry: str, tests: list, timeout: float = 2.0, memory_mb: int = 256,
              file_kb: int = 1024) -> SandboxResult:
    """Run ``program``, then call ``entry(*args)`` for each ``[args, expected]`` in ``tests``.

    Return values are compared with ``expected`` as JSON (so ``True`` differs from ``1``; a tuple
    equals a list). See the module docstring for the limits applied.
    """
    nonce = secrets.token_hex(8)
    with tempfile.TemporaryDirectory(prefix="mergelab-sandbox-") as d:
        payload = os.path.join(d, "payload.json")
        with open(payload, "w", encoding="utf-8") as fh:
            json.dump({"program": program, "entry": entry, "tests": tests, "nonce": nonce}, fh)
        rfd, wfd = os.pipe()
        argv = [sys.executable, "-I", "-S", "-c", _HARNESS, payload, str(memory_mb << 20),
                str(max(1, math.ceil(timeout)) + 1), str(file_kb << 10), str(wfd)]
        with open(os.path.join(d, "stdout"), "wb") as so, open(os.path.join(d, "stderr"), "wb") as se:
            try:
                proc = subprocess.Popen(argv, cwd=d, env={}, stdin=subprocess.DEVNULL, stdout=so, stderr=se,
                                        start_new_session=True, pass_fds=(wfd,))
            finally:
                os.close(wfd)
            try:
                with os.fdopen(rfd, "rb") as r:
                    data, timed_out = _read_until(r, proc, timeout)
            finally:
                _kill(proc)
        if timed_out:
            return SandboxResult(False, f"time limit of {timeout:g} s exceeded")
        try:
            res = json.loads(data.decode("utf-8"))
        except ValueError:
            return SandboxResult(False, f"the process ended without a result (exit status {proc.returncode})")
        if res.get("nonce") != nonce:
            return SandboxResult(False, "result forged")
        return SandboxResult(bool(res["ok"]), res["why"], res["netns"])


def _read_until(r, proc, timeout):
    import selectors
    import time

    deadline = time.monotonic() + timeout
    chunks = []
    sel = selectors.DefaultSelector()
    sel.register(r, selectors.EVENT_READ)
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return b"", True
            if not sel.select(left):
                continue
            chunk = os.read(r.fileno(), 65536)
            if not chunk:
                return b"".join(chunks), False
            chunks.append(chunk)
            if sum(map(len, chunks)) > 1 << 16:
                return b"", False
    finally:
        sel.close()


def _kill(proc):
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    proc.wait()
