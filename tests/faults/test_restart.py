"""The real server restarted under the pool (scenarios 4-6 of the fault catalogue).

Each test stops and starts a throwaway server of its own module (never the shared
one): fast restarts with idle connections, with and without ``check``; ten threads in
the middle of a query; an immediate stop (crash); and ``max_lifetime`` flushing dead
idle connections on its own.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import psycopg2
import pytest

from pgctx.health import check_connection, is_disconnect
from pgctx.pool import ThreadedConnectionPool
from pgctx.testing import ThrowawayServer
from tests.helpers import backend_pid, unique_app, wait_until

GENEROUS = 20.0  # seconds: upper bounds only, never a pass/fail sleep


@pytest.fixture
def app() -> str:
    return unique_app("restart")


@pytest.fixture
def make(
    make: Callable[..., ThreadedConnectionPool], server: ThrowawayServer
) -> Callable[..., Any]:
    """``make(minconn, maxconn, **options)`` on this module's server."""

    def build(minconn: int, maxconn: int, **options: Any) -> Any:
        return make(server.dsn, minconn, maxconn, **options)

    return build


def fill_idle(pool: ThreadedConnectionPool, n: int) -> set[int]:
    """Make ``n`` connections idle in the pool; return their backend pids."""
    conns = [pool.getconn() for _ in range(n)]
    pids = {backend_pid(c) for c in conns}
    for conn in conns:
        conn.rollback()
        pool.putconn(conn)
    assert pool.get_stats()["pool_available"] == n
    return pids


def borrow_and_query(pool: ThreadedConnectionPool) -> int:
    """One unit of work: borrow, query, return. Returns the backend pid."""
    conn = pool.getconn()
    try:
        pid = backend_pid(conn)
        conn.rollback()
        return pid
    finally:
        pool.putconn(conn)


@pytest.mark.parametrize("mode", ["fast", "immediate"])
def test_restart_with_idle_connections_and_check_is_invisible(
    make: Any, server: ThrowawayServer, mode: Any
) -> None:
    pool = make(4, 4, check=check_connection)
    old_pids = fill_idle(pool, 4)
    server.restart(mode)

    pids = [borrow_and_query(pool) for _ in range(6)]  # zero user-visible errors
    assert not old_pids & set(pids)
    stats = pool.get_stats()
    assert stats["connections_lost"] == 4  # every stale connection was caught by its check
    assert stats["returns_bad"] == 0
    assert stats["checked_out"] == 0


def test_restart_with_idle_connections_without_check_fails_each_stale_one_at_most_once(
    make: Any, server: ThrowawayServer
) -> None:
    """psycopg2-compatible default: no check, so each stale idle connection fails once."""
    pool = make(4, 4)
    fill_idle(pool, 4)
    server.restart("fast")

    errors = 0
    results = []
    for _ in range(8):
        try:
            results.append(borrow_and_query(pool))
        except psycopg2.OperationalError as exc:
            assert is_disconnect(exc)
            errors += 1
    assert 1 <= errors <= 4
    assert len(results) == 8 - errors
    assert all(pid > 0 for pid in results[-4:])  # recovered: the last borrows all worked
    stats = pool.get_stats()
    assert stats["returns_bad"] == errors
    assert stats["checked_out"] == 0


def test_restart_with_ten_threads_mid_query(make: Any, server: ThrowawayServer, app: str) -> None:
    pool = make(0, 10, timeout=GENEROUS)
    admin = server.connect()
    start = threading.Barrier(11)
    errors: list[BaseException] = []
    lock = threading.Lock()

    def worker() -> None:
        conn = pool.getconn()
        try:
            start.wait(GENEROUS)
            with conn.cursor() as cur:
                cur.execute("SELECT pg_sleep(60)")
        except psycopg2.Error as exc:
            with lock:
                errors.append(exc)
        finally:
            pool.putconn(conn)

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(10)]
    for thread in threads:
        thread.start()
    start.wait(GENEROUS)

    def sleeping() -> bool:
        with admin.cursor() as cur:
            cur.execute(
                "SELECT count(*) FROM pg_stat_activity "
                "WHERE application_name = %s AND query LIKE 'SELECT pg_sleep%%'",
                (app,),
            )
            (count,) = cur.fetchone() or (0,)
            return bool(count == 10)

    assert wait_until(sleeping, GENEROUS)
    admin.close()
    server.restart("fast")

    for thread in threads:
        thread.join(GENEROUS)
    assert not any(t.is_alive() for t in threads)  # nothing hangs
    assert len(errors) == 10
    assert all(isinstance(e, psycopg2.OperationalError) and is_disconnect(e) for e in errors)
    stats = pool.get_stats()
    assert (stats["checked_out"], stats["pool_size"]) == (0, 0)  # all 10 slots came back
    assert stats["returns_bad"] == 10

    # All ten slots are usable again, concurrently.
    conns = [pool.getconn() for _ in range(10)]
    assert len({backend_pid(c) for c in conns}) == 10
    for conn in conns:
        conn.rollback()
        pool.putconn(conn)


def test_max_lifetime_flushes_connections_killed_by_a_restart(
    make: Any, server: ThrowawayServer
) -> None:
    """Without ``check``, ``max_lifetime`` bounds how long a dead idle connection survives.

    The maintenance thread closes expired idle connections and refills to ``minconn``.
    """
    pool = make(2, 2, max_lifetime=0.5)
    old = [pool.getconn() for _ in range(2)]
    for conn in old:
        backend_pid(conn)
        conn.rollback()
        pool.putconn(conn)
    server.restart("fast")

    assert wait_until(lambda: all(c.closed for c in old), GENEROUS)
    assert wait_until(lambda: pool.get_stats()["pool_available"] == 2, GENEROUS)
    conn = pool.getconn()  # no error: the stale connections are gone without any check
    assert all(conn is not o for o in old)
    assert backend_pid(conn) > 0
    conn.rollback()
    pool.putconn(conn)
    assert pool.get_stats()["connections_recycled"] >= 2
