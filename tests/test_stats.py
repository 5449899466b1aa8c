"""get_stats(): counters that follow what the pool really did."""

from __future__ import annotations

import threading
from typing import Any

import pytest

from pgctx.errors import PoolTimeout, TooManyWaiters
from pgctx.pool import ThreadedConnectionPool
from pgctx.stats import PoolStats
from tests.helpers import unique_app, wait_until


def test_counters_and_gauges(dsn: str) -> None:
    pool = ThreadedConnectionPool(
        1, 2, dsn, application_name=unique_app("stats"), timeout=0.05, max_waiting=1
    )
    try:
        stats = pool.get_stats()
        assert stats["connections_num"] == 1 and stats["pool_size"] == 1
        assert stats["pool_min"] == 1 and stats["pool_max"] == 2
        a, b = pool.getconn(), pool.getconn()
        with pytest.raises(PoolTimeout):
            pool.getconn()
        stats = pool.get_stats()
        assert stats["requests_num"] == 3 and stats["requests_queued"] == 1
        assert stats["requests_timeouts"] == 1 and stats["requests_wait_ms"] >= 50
        assert stats["checked_out"] == 2 and stats["pool_available"] == 0
        assert stats["connections_num"] == 2
        pool.putconn(a)
        b.close()
        pool.putconn(b)
        stats = pool.get_stats()
        assert stats["returns_bad"] == 1 and stats["pool_available"] == 1
        assert stats["checked_out"] == 0 and stats["pool_size"] == 1
    finally:
        pool.closeall()


def test_refused_waiters_are_counted(dsn: str) -> None:
    pool = ThreadedConnectionPool(
        0, 1, dsn, application_name=unique_app("stats"), timeout=30, max_waiting=1
    )
    try:
        held = pool.getconn()
        thread = threading.Thread(target=lambda: pool.putconn(pool.getconn()))
        thread.start()
        assert wait_until(lambda: pool.get_stats()["requests_waiting"] == 1)
        with pytest.raises(TooManyWaiters):
            pool.getconn()
        assert pool.get_stats()["requests_errors"] == 1
        pool.putconn(held)
        thread.join(30)
        assert pool.get_stats()["requests_waiting"] == 0
    finally:
        pool.closeall()


def test_stats_object_lists_every_counter() -> None:
    counters = PoolStats().as_dict()
    assert set(counters) == set(PoolStats.__slots__)
    assert all(value == 0 for value in counters.values())


def test_get_stats_is_a_snapshot(dsn: str) -> None:
    pool: Any = ThreadedConnectionPool(0, 1, dsn, application_name=unique_app("stats"))
    try:
        before = pool.get_stats()
        pool.putconn(pool.getconn())
        assert before["requests_num"] == 0 and pool.get_stats()["requests_num"] == 1
    finally:
        pool.closeall()
