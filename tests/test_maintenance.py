"""The maintenance thread: started at first use in each process, refills to minconn,
ends with its pool."""

from __future__ import annotations

import gc
import logging
import threading
from typing import Any

import pytest

import pgctx
from pgctx.maintenance import Maintenance
from pgctx.pool import ThreadedConnectionPool
from tests.helpers import unique_app, wait_backends, wait_until


def _maintenance_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("pgctx-maintenance")]


def _running(pool: Any) -> bool:
    return any(t.name == f"pgctx-maintenance-{id(pool):x}" for t in _maintenance_threads())


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


OPTIONS_WITH_A_THREAD = {
    "timeout+minconn": {"timeout": 5},
    "max_idle": {"max_idle": 60},
    "max_lifetime": {"max_lifetime": 60},
    "leak_timeout": {"leak_timeout": 60},
    "everything": {
        "timeout": 5,
        "max_waiting": 10,
        "check": pgctx.check_connection,
        "check_after_idle": 1,
        "reset": pgctx.reset_session,
        "configure": lambda conn: None,
        "max_idle": 60,
        "max_lifetime": 60,
        "leak_timeout": 60,
    },
}


@pytest.mark.parametrize("options", OPTIONS_WITH_A_THREAD.values(), ids=OPTIONS_WITH_A_THREAD)
def test_no_thread_before_first_use(dsn: str, options: dict[str, Any]) -> None:
    """A pre-forking server forks after building the pool: it must fork single-threaded."""
    before = set(threading.enumerate())
    pool = ThreadedConnectionPool(2, 4, dsn, application_name=unique_app(), **options)
    try:
        assert not set(threading.enumerate()) - before  # not even the watchdog's
        conn = pool.getconn()  # first use: now the pool needs its thread
        assert _running(pool)
        pool.putconn(conn)
    finally:
        pool.closeall()


@pytest.mark.parametrize("first", ["getconn", "putconn", "block"])
def test_any_first_call_starts_the_thread(dsn: str, first: str) -> None:
    pool = ThreadedConnectionPool(1, 2, dsn, application_name=unique_app(), max_lifetime=60)
    try:
        if first == "putconn":
            with pytest.raises(pgctx.PoolError):
                pool.putconn(object())  # type: ignore[arg-type]
        elif first == "block":
            with pool.connection():
                pass
        else:
            pool.putconn(pool.getconn())
        assert _running(pool)
    finally:
        pool.closeall()


def test_many_threads_using_a_fresh_pool_at_once_start_one_thread(dsn: str) -> None:
    pool = ThreadedConnectionPool(2, 8, dsn, application_name=unique_app(), max_lifetime=60)
    barrier = threading.Barrier(8)

    def first_use() -> None:
        barrier.wait()
        pool.putconn(pool.getconn())

    users = [threading.Thread(target=first_use) for _ in range(8)]
    try:
        for t in users:
            t.start()
        for t in users:
            t.join(30)
        names = [t.name for t in _maintenance_threads()]
        assert names.count(f"pgctx-maintenance-{id(pool):x}") == 1
    finally:
        pool.closeall()


def test_a_closed_pool_starts_no_thread(dsn: str) -> None:
    pool = ThreadedConnectionPool(1, 2, dsn, application_name=unique_app(), max_lifetime=60)
    pool.closeall()
    with pytest.raises(pgctx.PoolError):
        pool.getconn()
    assert not _running(pool)


def test_statistics_and_closing_start_no_thread(dsn: str) -> None:
    """A metrics scrape or a closeall() in a pre-fork master is not a first use."""
    pool = ThreadedConnectionPool(1, 2, dsn, application_name=unique_app(), max_lifetime=60)
    pool.get_stats()
    assert not _running(pool)
    pool.closeall()
    assert not _running(pool)


def test_thread_ends_when_pool_is_closed_or_collected(dsn: str) -> None:
    pool = ThreadedConnectionPool(0, 1, dsn, application_name=unique_app(), max_idle=0.1)
    pool.putconn(pool.getconn())
    name = f"pgctx-maintenance-{id(pool):x}"
    assert _running(pool)
    pool.closeall()
    assert wait_until(lambda: not any(t.name == name for t in _maintenance_threads()))
    abandoned = ThreadedConnectionPool(0, 1, dsn, application_name=unique_app(), max_idle=0.1)
    abandoned.putconn(abandoned.getconn())
    name = f"pgctx-maintenance-{id(abandoned):x}"
    assert _running(abandoned)
    del abandoned
    gc.collect()
    assert wait_until(lambda: not any(t.name == name for t in _maintenance_threads()))


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
    maintenance.start()
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
        maintenance.start()
        try:
            assert wait_until(lambda: len(calls) >= 3)
            assert maintenance._thread.is_alive()
        finally:
            maintenance.stop()
    assert any(r.exc_info and r.exc_info[0] is error for r in caplog.records)


def test_pools_without_timed_options_start_no_thread(dsn: str) -> None:
    pool = ThreadedConnectionPool(1, 2, dsn, application_name=unique_app())
    try:
        pool.putconn(pool.getconn())
        assert pool._maintenance is None and not _running(pool)
    finally:
        pool.closeall()
