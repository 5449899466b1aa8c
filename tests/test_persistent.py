"""PersistentConnectionPool: one connection per thread, reclaimed when the thread ends."""

from __future__ import annotations

import gc
import threading
from typing import Any

import pytest

from pgctx.errors import PoolError, PoolTimeout
from pgctx.pool import PersistentConnectionPool
from tests.helpers import unique_app, wait_backends, wait_until


@pytest.fixture
def app() -> str:
    return unique_app("persistent")


def in_thread(fn: Any) -> Any:
    """Run ``fn`` in a new thread that then ends; return its result or raise its error."""
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["value"] = fn()
        except BaseException as exc:
            box["error"] = exc

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(30)
    gc.collect()
    if "error" in box:
        raise box["error"]
    return box.get("value")


def test_same_thread_same_connection_other_thread_another(dsn: str, app: str) -> None:
    pool = PersistentConnectionPool(0, 3, dsn, application_name=app)
    try:
        mine = pool.getconn()
        assert pool.getconn() is mine
        theirs = in_thread(lambda: (pool.getconn(), pool.getconn()))
        assert theirs[0] is theirs[1] and theirs[0] is not mine
        pool.putconn()
        assert mine.closed  # beyond minconn idle: closed, as psycopg2 does
        assert pool.getconn() is not mine
    finally:
        pool.closeall()


def test_a_finished_threads_transaction_never_reaches_a_new_thread(
    dsn: str, app: str, pg_admin: Any
) -> None:
    pool = PersistentConnectionPool(1, 1, dsn, application_name=app)
    try:

        def leave_open_transaction() -> Any:
            conn = pool.getconn()
            with conn.cursor() as cur:
                cur.execute("CREATE TEMP TABLE left_behind (x int)")
                cur.execute("INSERT INTO left_behind VALUES (1)")
            return conn  # ends holding the connection, mid-transaction

        dead_threads_conn = in_thread(leave_open_transaction)
        assert wait_until(lambda: len(pool._used) == 0)
        assert dead_threads_conn.closed  # an open transaction is closed, never reused

        def look() -> Any:
            conn = pool.getconn()
            with conn.cursor() as cur:
                cur.execute("SELECT to_regclass('pg_temp.left_behind') IS NULL")
                (absent,) = cur.fetchone()
            pool.putconn(conn)
            return conn, absent

        new_conn, absent = in_thread(look)
        assert new_conn is not dead_threads_conn and absent
        assert wait_backends(pg_admin, app, 1) == 1
    finally:
        pool.closeall()


def test_an_idle_connection_of_a_finished_thread_is_reused(dsn: str, app: str) -> None:
    pool = PersistentConnectionPool(1, 1, dsn, application_name=app)
    try:
        first = in_thread(pool.getconn)
        assert wait_until(lambda: len(pool._used) == 0)
        assert not first.closed and pool._pool == [first]
        assert in_thread(pool.getconn) is first
    finally:
        pool.closeall()


def test_putconn_refuses_another_threads_connection(dsn: str, app: str) -> None:
    pool = PersistentConnectionPool(0, 2, dsn, application_name=app)
    try:
        mine = pool.getconn()
        started, release = threading.Event(), threading.Event()
        holder: dict[str, Any] = {}

        def hold() -> None:
            holder["conn"] = pool.getconn()
            started.set()
            release.wait(30)

        thread = threading.Thread(target=hold)
        thread.start()
        assert started.wait(30)
        before = (dict(pool._used), list(pool._pool))
        with pytest.raises(PoolError, match="does not hold"):
            pool.putconn(holder["conn"])
        assert (dict(pool._used), list(pool._pool)) == before
        assert not holder["conn"].closed and not mine.closed
        release.set()
        thread.join(30)
        with pytest.raises(PoolError, match="holds no connection"):
            in_thread(pool.putconn)
    finally:
        pool.closeall()


def test_waiting_for_a_thread_to_put_its_connection_away(dsn: str, app: str) -> None:
    pool = PersistentConnectionPool(1, 1, dsn, application_name=app, timeout=30)
    try:
        mine = pool.getconn()
        got: list[Any] = []
        thread = threading.Thread(target=lambda: got.append(pool.getconn()))
        thread.start()
        assert wait_until(lambda: len(pool._waiters) == 1)
        pool.putconn()
        thread.join(30)
        assert got and got[0] is mine  # handed over instead of closed
        # that thread has ended, so its connection came back and is ours again
        assert wait_until(lambda: len(pool._used) == 0)
        assert pool.getconn() is mine
        with pytest.raises(PoolTimeout):
            in_thread(lambda: pool._checkout(pool._thread_key(), 0.05))
    finally:
        pool.closeall()


def test_thread_stress_one_connection_per_thread(dsn: str, app: str, pg_admin: Any) -> None:
    pool = PersistentConnectionPool(2, 6, dsn, application_name=app, timeout=30)
    owners: dict[int, int] = {}
    lock = threading.Lock()
    violations: list[str] = []

    def worker() -> None:
        for i in range(30):
            conn = pool.getconn()
            if pool.getconn() is not conn:
                violations.append("a thread got two connections")
            with lock:
                owner = owners.setdefault(id(conn), threading.get_ident())
                if owner != threading.get_ident():
                    violations.append("a connection was held by two threads")
            if i % 3 == 0:
                with conn.cursor() as cur:
                    cur.execute("SELECT 1")
            with lock:
                owners.pop(id(conn))
            pool.putconn(close=(i % 11 == 0))

    threads = [threading.Thread(target=worker) for _ in range(12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not any(t.is_alive() for t in threads)
    assert violations == []
    assert len(pool._used) == 0 and len(pool._pool) <= 2
    pool.closeall()
    assert wait_backends(pg_admin, app, 0) == 0


def test_an_async_block_on_a_persistent_pool_gives_its_connection_back(dsn: str) -> None:
    """The pool keys connections by thread: the checkout must happen on the loop's
    thread, where the block also returns it (not in an executor thread)."""
    import asyncio

    pool = PersistentConnectionPool(1, 2, dsn, application_name=unique_app("persist"))

    async def main() -> None:
        async with pool.connection() as conn:
            with conn.cursor() as cur:
                cur.execute("SELECT 1")

    try:
        asyncio.run(main())
        assert not pool._used
    finally:
        pool.closeall()
