"""Forked children for the tests: ``Child(fn)`` runs ``fn`` in a new process.

Two ways to fork:

- ``"os"``: ``os.fork()``, which runs the ``os.register_at_fork`` hooks (gunicorn,
  Celery's billiard, ``multiprocessing``);
- ``"c"``: libc's ``fork()`` called through ctypes, which runs none of them, as uWSGI's
  master does when it forks its workers. ``PyDLL`` keeps the GIL held across the call,
  so the child resumes with it, as a C fork from a Python process does.

The child never returns into pytest: it always leaves through ``os._exit``, after
writing ``fn``'s JSON-able result (or its traceback) to a pipe. ``result()`` waits for
it within a bound and kills the child when it hangs: a hang is a test failure, not a
timeout of the suite.
"""

from __future__ import annotations

import ctypes
import json
import os
import select
import signal
import sys
import time
import traceback
import warnings
from collections.abc import Callable
from typing import Any

import pytest

GENEROUS = 20.0
FORKS = ("os", "c")

needs_fork = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")


def c_fork() -> int:
    """fork(2) without Python's fork hooks (what uWSGI does)."""
    libc = ctypes.PyDLL(None)
    libc.fork.restype = ctypes.c_int
    pid: int = libc.fork()
    if pid < 0:
        raise OSError(ctypes.get_errno(), "fork failed")
    return pid


def fork(how: str) -> int:
    if how == "c":
        return c_fork()
    with warnings.catch_warnings():
        # 3.12+ warns when forking with threads: the suite's process has some on purpose
        warnings.filterwarnings("ignore", "This process .*multi-threaded", DeprecationWarning)
        return os.fork()


class Child:
    """``fn`` running in a forked child; ``result()`` returns its result or fails the test."""

    def __init__(self, fn: Callable[[], Any], how: str = "os") -> None:
        r, w = os.pipe()
        sys.stdout.flush()
        sys.stderr.flush()
        pid = fork(how)
        if pid == 0:  # pragma: no cover - the child; coverage cannot see it
            status = 0
            try:
                os.close(r)
                payload = {"ok": True, "result": fn()}
            except BaseException:
                payload = {"ok": False, "error": traceback.format_exc()}
                status = 1
            try:
                os.write(w, json.dumps(payload).encode())
                os.close(w)
            finally:
                os._exit(status)
        os.close(w)
        self.pid, self._r = pid, r

    def result(self, timeout: float = GENEROUS) -> Any:
        outcome = self.outcome(timeout)
        if outcome is None:
            pytest.fail(f"the forked child did not finish within {timeout} s")
        if not outcome["ok"]:
            pytest.fail(f"in the forked child:\n{outcome['error']}")
        return outcome["result"]

    def outcome(self, timeout: float = GENEROUS) -> dict[str, Any] | None:
        """The child's ``{"ok": ..., "result"/"error": ...}``, or None if it hung (killed)."""
        chunks = []
        deadline = time.monotonic() + timeout
        hung = False
        try:
            while True:
                left = max(0.0, deadline - time.monotonic())
                if not select.select([self._r], [], [], left)[0]:
                    os.kill(self.pid, signal.SIGKILL)
                    hung = True
                    break
                chunk = os.read(self._r, 65536)
                if not chunk:
                    break
                chunks.append(chunk)
        finally:
            os.close(self._r)
            os.waitpid(self.pid, 0)
        if hung:
            return None
        result: dict[str, Any] = json.loads(
            b"".join(chunks) or b'{"ok": false, "error": "the child wrote nothing"}'
        )
        return result


def in_child(fn: Callable[[], Any], how: str = "os") -> Any:
    return Child(fn, how).result()
