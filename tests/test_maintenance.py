"""The maintenance thread: refills to minconn, ends with its pool."""

from __future__ import annotations

import gc
import logging
import threading
from typing import Any

import pytest

from pgctx.maintenance import Maintenance
from pgctx.pool import ThreadedConnectionPool
from tests.helpers import unique_app, wait_backends, wait_until


def _maintenance_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("pgctx-maintenance")]


def test_pool_refills_to_minconn_after_losses(dsn: str, pg_admin: Any) -> None:
    app = unique_app("maint")
    pool = ThreadedConnectionPool(2, 4, dsn, application_name=app, timeout=5, max_idle=0.2)
    try:
        a, b = pool.getconn(), pool.getconn()
        pool.putconn(a, close=True)
        pool.putconn(b, close=True)
        assert pool.get_stats()["pool_size"] == 0
        assert wait_until(lambda: len(pool._pool) == 2)
        assert wait_backends(pg_admin, app, 2) == 2
    finally:
        pool.closeall()


def test_thread_ends_when_pool_is_closed_or_collected(dsn: str) -> None:
    def running(name: str) -> bool:
        return any(t.name == name for t in _maintenance_threads())

    pool = ThreadedConnectionPool(0, 1, dsn, application_name=unique_app(), max_idle=0.1)
    name = f"pgctx-maintenance-{id(pool):x}"
    assert running(name)
    pool.closeall()
    assert wait_until(lambda: not running(name))
    abandoned = ThreadedConnectionPool(0, 1, dsn, application_name=unique_app(), max_idle=0.1)
    name = f"pgctx-maintenance-{id(abandoned):x}"
    assert running(name)
    del abandoned
    gc.collect()
    assert wait_until(lambda: not running(name))


def test_a_failing_maintenance_round_does_not_kill_the_thread() -> None:
    calls: list[int] = []

    class Flaky:
        closed = False

        def _maintain(self) -> None:
            calls.append(1)
            if len(calls) == 1:
                raise RuntimeError("transient")

    flaky = Flaky()
    maintenance = Maintenance(flaky, 0.01)
    try:
        assert wait_until(lambda: len(calls) >= 3)
    finally:
        maintenance.stop()


@pytest.mark.parametrize("error", [SystemExit, KeyboardInterrupt, GeneratorExit])
def test_a_base_exception_from_a_round_is_logged_and_the_thread_goes_on(
    error: type[BaseException], caplog: pytest.LogCaptureFixture
) -> None:
    """A hook (configure, a connect wrapper) may raise a BaseException in the refill:
    before, it ended the thread, and the pool silently stopped refilling and recycling."""
    calls: list[int] = []

    class Interrupted:
        closed = False

        def _maintain(self) -> None:
            calls.append(1)
            if len(calls) == 1:
                raise error("from a hook")

    interrupted = Interrupted()
    with caplog.at_level(logging.ERROR, logger="pgctx"):
        maintenance = Maintenance(interrupted, 0.01)
        try:
            assert wait_until(lambda: len(calls) >= 3)
            assert maintenance._thread.is_alive()
        finally:
            maintenance.stop()
    assert any(r.exc_info and r.exc_info[0] is error for r in caplog.records)


def test_pools_without_timed_options_start_no_thread(dsn: str) -> None:
    pool = ThreadedConnectionPool(1, 2, dsn, application_name=unique_app())
    try:
        names = {t.name for t in _maintenance_threads()}
        assert pool._maintenance is None and f"pgctx-maintenance-{id(pool):x}" not in names
    finally:
        pool.closeall()
