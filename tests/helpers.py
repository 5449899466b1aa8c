"""Small helpers shared by the test modules: backend counting and polling."""

from __future__ import annotations

import asyncio
import itertools
import os
import time
from collections.abc import Callable
from typing import Any

_counter = itertools.count()


def unique_app(prefix: str = "pgctx-test") -> str:
    """An application_name no other pool in this run uses, to count its backends."""
    return f"{prefix}-{os.getpid()}-{next(_counter)}"


def backends(admin: Any, application_name: str) -> int:
    """Server backends currently open for ``application_name``."""
    with admin.cursor() as cur:
        cur.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s",
            (application_name,),
        )
        (count,) = cur.fetchone()
    return int(count)


def wait_until(
    predicate: Callable[[], bool], timeout: float = 15.0, interval: float = 0.01
) -> bool:
    """Poll ``predicate`` until it holds or ``timeout`` passes; return its last value."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)


def wait_backends(admin: Any, application_name: str, expected: int, timeout: float = 15.0) -> int:
    """Wait until the backend count settles at ``expected`` (closes are asynchronous)."""
    wait_until(lambda: backends(admin, application_name) == expected, timeout)
    return backends(admin, application_name)


def in_use(pool: Any) -> int:
    """Connections the pool has checked out."""
    return len(pool._used)


def rows(admin: Any, table: str) -> list[int]:
    """The ``x`` values of a test table (see the ``table`` fixture), in order."""
    with admin.cursor() as cur:
        cur.execute(f"SELECT x FROM {table} ORDER BY x")
        return [r[0] for r in cur.fetchall()]


def insert(conn: Any, table: str, x: int) -> None:
    with conn.cursor() as cur:
        cur.execute(f"INSERT INTO {table} VALUES (%s)", (x,))


def backend_pid(conn: Any) -> int:
    """The server process id of ``conn``: one real round trip (transaction state unchanged)."""
    with conn.cursor() as cur:
        cur.execute("SELECT pg_backend_pid()")
        (pid,) = cur.fetchone()
    return int(pid)


class AsyncBarrier:
    """``asyncio.Barrier`` for Python 3.10 (it came in 3.11): ``wait()`` returns once
    ``parties`` tasks are waiting. Single use, which is all the tests need."""

    def __init__(self, parties: int) -> None:
        self._parties = parties
        self._arrived = 0
        self._all_here = asyncio.Event()

    async def wait(self) -> None:
        self._arrived += 1
        if self._arrived >= self._parties:
            self._all_here.set()
        await self._all_here.wait()
