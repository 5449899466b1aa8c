"""The watchdog: an operation running past its deadline fails instead of blocking."""

from __future__ import annotations

import time
from typing import Any

import psycopg2
import pytest

from pgctx.watchdog import WATCHDOG


def test_a_query_past_its_deadline_fails_fast(dsn: str) -> None:
    conn = psycopg2.connect(dsn)
    try:
        started = time.monotonic()
        with (
            pytest.raises(psycopg2.OperationalError),
            WATCHDOG.deadline(conn, 0.2) as guard,
            conn.cursor() as cur,
        ):
            cur.execute("SELECT pg_sleep(60)")
        assert guard.fired and conn.closed
        assert time.monotonic() - started < 30  # nowhere near the 60 s sleep
    finally:
        conn.close()


def test_an_operation_within_its_deadline_is_left_alone(dsn: str) -> None:
    conn: Any = psycopg2.connect(dsn)
    try:
        with WATCHDOG.deadline(conn, 0.2) as guard, conn.cursor() as cur:
            cur.execute("SELECT 1")
        time.sleep(0.4)  # let the deadline pass after the block: nothing may happen now
        assert not guard.fired and guard.conn is None
        with conn.cursor() as cur:
            cur.execute("SELECT 2")
            assert cur.fetchone() == (2,)
    finally:
        conn.close()


def test_finished_guards_do_not_pile_up() -> None:
    class Conn:
        def fileno(self) -> int:
            raise AssertionError("a finished guard must never fire")

    for _ in range(2000):
        with WATCHDOG.deadline(Conn(), 3600):
            pass
    assert WATCHDOG._pending == 0
    assert len(WATCHDOG._heap) <= 2 * 256 + 1
