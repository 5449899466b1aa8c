"""Watchdog of a supervised process: ``python _watchdog.py FD DIR...`` (run as a script).

It holds the read end of a pipe whose only write end is in the process owning the
server (a ThrowawayServer or PgBouncer, see _process.py).  The owner writes the current
pid (0 when stopped) on it; EOF means the owner ended, normally or killed, and the
watchdog then kills that process and its children and removes the directories.  It
imports nothing from pgctx to start fast.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import shutil
import signal
import sys
import time

GRACE = 10.0  # seconds for SIGQUIT (immediate shutdown) before SIGKILL


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # an unreaped zombie counts as gone
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def descendants(pid: int) -> list[int]:
    try:  # psutil comes with pgctx[testing]; without it the backends die on their own
        psutil = importlib.import_module("psutil")
        return [c.pid for c in psutil.Process(pid).children(recursive=True)]
    except Exception:
        return []


def wait_gone(pid: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)


def kill_server(pid: int) -> None:
    # Backends notice postmaster death on their own, but not instantly: kill them too.
    kids = descendants(pid)
    try:
        os.kill(pid, signal.SIGQUIT)
    except OSError:
        return
    wait_gone(pid, GRACE)
    for p in [pid, *kids]:
        with contextlib.suppress(OSError):
            os.kill(p, signal.SIGKILL)
    wait_gone(pid, GRACE)


def main(argv: list[str]) -> None:
    fd, dirs = int(argv[0]), argv[1:]
    for sig in (signal.SIGINT, signal.SIGHUP, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)  # only EOF on the pipe ends us
    pid, buf = 0, b""
    while chunk := os.read(fd, 4096):
        buf += chunk
        *lines, buf = buf.split(b"\n")
        for line in lines:
            pid = int(line or 0)
    if pid and alive(pid):
        kill_server(pid)
    for d in dirs:
        shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    main(sys.argv[1:])
