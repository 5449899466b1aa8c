"""Backends killed with pg_terminate_backend (and sessions reset by the proxy), on a real server.

Scenarios 1-3 and 11 of the fault catalogue: a backend killed while its connection is
idle in the pool (with and without ``check``), while it is borrowed, and while it is
borrowed inside a transaction, so that the rollback on return fails.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import psycopg2
import pytest

from pgctx.health import check_connection, is_disconnect, reset_session
from pgctx.pool import ThreadedConnectionPool
from pgctx.testing import PgServer
from tests.faults.proxy import FaultProxy
from tests.helpers import backend_pid, backends, unique_app, wait_backends, wait_until

GENEROUS = 15.0  # seconds; an upper bound for things that take milliseconds


@pytest.fixture
def app() -> str:
    return unique_app("kill")


@pytest.fixture
def make(make: Callable[..., ThreadedConnectionPool], dsn: str) -> Callable[..., Any]:
    """``make(minconn, maxconn, target=dsn, **options)``, on the session server by default."""

    def build(minconn: int, maxconn: int, target: str = dsn, **options: Any) -> Any:
        return make(target, minconn, maxconn, **options)

    return build


def kill(pg_server: PgServer, app: str, expected: int, pg_admin: Any) -> None:
    """Terminate every backend of ``app`` and wait until the server has none left."""
    assert pg_server.terminate_backends(application_name=app) == expected
    assert wait_backends(pg_admin, app, 0) == 0


# -- killed while idle in the pool -----------------------------------------------------


def test_idle_kill_without_check_fails_once_then_the_pool_recovers(
    make: Any, app: str, pg_server: PgServer, pg_admin: Any
) -> None:
    """psycopg2-compatible default: nothing notices the death until the connection is used."""
    pool = make(1, 2)
    conn = pool.getconn()
    old_pid = backend_pid(conn)
    conn.rollback()
    pool.putconn(conn)
    kill(pg_server, app, 1, pg_admin)

    dead = pool.getconn()
    assert dead is conn and dead.closed == 0  # not detectable without a round trip
    with pytest.raises(psycopg2.OperationalError) as info:
        backend_pid(dead)
    assert is_disconnect(info.value, dead)
    assert dead.closed
    pool.putconn(dead)  # accepted: a broken connection is dropped, not pooled

    stats = pool.get_stats()
    assert stats["returns_bad"] == 1
    assert (stats["checked_out"], stats["pool_size"]) == (0, 0)
    fresh = pool.getconn()
    assert fresh is not dead and backend_pid(fresh) != old_pid
    fresh.rollback()
    pool.putconn(fresh)
    assert pool.get_stats()["pool_available"] == 1


def test_idle_kill_with_check_never_reaches_the_borrower(
    make: Any, app: str, pg_server: PgServer, pg_admin: Any
) -> None:
    pool = make(3, 3, check=check_connection)
    old = [pool.getconn() for _ in range(3)]
    old_pids = {backend_pid(c) for c in old}
    for conn in old:
        conn.rollback()
        pool.putconn(conn)
    kill(pg_server, app, 3, pg_admin)

    conn = pool.getconn()  # no error: each dead idle connection fails its check first
    assert all(conn is not o for o in old)
    assert backend_pid(conn) not in old_pids
    stats = pool.get_stats()
    assert stats["connections_lost"] == 3
    assert stats["connections_num"] == 4
    assert (stats["pool_size"], stats["pool_available"], stats["checked_out"]) == (1, 0, 1)
    assert all(o.closed for o in old)  # the dead ones were closed, not left open
    conn.rollback()
    pool.putconn(conn)
    assert backends(pg_admin, app) == 1


def test_check_after_idle_only_checks_connections_idle_long_enough(
    make: Any, app: str, pg_server: PgServer, pg_admin: Any
) -> None:
    """The documented trade-off of ``check_after_idle``: a recently used connection is trusted."""
    pool = make(1, 1, check=check_connection, check_after_idle=GENEROUS * 4)
    conn = pool.getconn()
    conn.rollback()
    pool.putconn(conn)
    kill(pg_server, app, 1, pg_admin)
    assert pool.getconn() is conn  # idle for less than check_after_idle: not checked
    with pytest.raises(psycopg2.OperationalError):
        backend_pid(conn)
    pool.putconn(conn)
    assert pool.get_stats()["returns_bad"] == 1

    pool = make(1, 1, check=check_connection, check_after_idle=0.05)
    conn = pool.getconn()
    conn.rollback()
    pool.putconn(conn)
    returned = time.monotonic()
    kill(pg_server, app, 1, pg_admin)
    time.sleep(max(0.0, returned + 0.1 - time.monotonic()))  # idle past check_after_idle
    fresh = pool.getconn()
    assert fresh is not conn
    assert backend_pid(fresh) > 0
    assert pool.get_stats()["connections_lost"] == 1


# -- killed while borrowed -----------------------------------------------------------------


def test_kill_while_borrowed_errors_for_the_borrower_and_frees_the_slot(
    make: Any, app: str, pg_server: PgServer, pg_admin: Any
) -> None:
    pool = make(0, 1, timeout=GENEROUS)
    conn = pool.getconn()
    backend_pid(conn)
    conn.rollback()

    # A second caller waits for the only slot while the first holds a doomed connection.
    got: list[Any] = []
    waiter = threading.Thread(target=lambda: got.append(pool.getconn()), daemon=True)
    waiter.start()
    assert wait_until(lambda: pool.get_stats()["requests_waiting"] == 1)

    kill(pg_server, app, 1, pg_admin)
    with pytest.raises(psycopg2.OperationalError) as info:
        backend_pid(conn)
    assert is_disconnect(info.value, conn)
    pool.putconn(conn)  # the slot passes to the waiter, which opens a new connection
    waiter.join(GENEROUS)
    assert not waiter.is_alive()
    assert len(got) == 1 and got[0] is not conn
    assert backend_pid(got[0]) > 0
    stats = pool.get_stats()
    assert stats["returns_bad"] == 1
    assert (stats["checked_out"], stats["pool_size"]) == (1, 1)


@pytest.mark.parametrize("reset", [None, reset_session], ids=["no-reset", "reset"])
def test_kill_mid_transaction_failing_rollback_is_absorbed(
    make: Any,
    app: str,
    pg_server: PgServer,
    pg_admin: Any,
    caplog: pytest.LogCaptureFixture,
    reset: Any,
) -> None:
    """psycopg2.pool raises from putconn here and loses the slot for good (its defect s07)."""
    pool = make(1, 1, reset=reset)
    conn = pool.getconn()
    with conn.cursor() as cur:
        cur.execute("CREATE TEMP TABLE t (x int); INSERT INTO t VALUES (1)")
    assert conn.get_transaction_status() == psycopg2.extensions.TRANSACTION_STATUS_INTRANS
    kill(pg_server, app, 1, pg_admin)
    assert conn.closed == 0  # the borrower never noticed

    with caplog.at_level(logging.WARNING, logger="pgctx"):
        pool.putconn(conn)  # must not raise: the rollback failure is logged and absorbed
    assert any("rollback failed" in r.getMessage() for r in caplog.records)
    assert conn.closed
    stats = pool.get_stats()
    assert stats["returns_bad"] == 1
    assert (stats["checked_out"], stats["pool_size"], stats["pool_available"]) == (0, 0, 0)

    fresh = pool.getconn()  # the only slot is free again
    assert fresh is not conn
    with fresh.cursor() as cur:
        cur.execute("SELECT to_regclass('pg_temp.t')")
        assert cur.fetchone() == (None,)
    fresh.rollback()
    pool.putconn(fresh)


def test_kill_mid_transaction_hands_the_slot_to_a_waiter(
    make: Any, app: str, pg_server: PgServer, pg_admin: Any
) -> None:
    pool = make(1, 1, timeout=GENEROUS)
    conn = pool.getconn()
    backend_pid(conn)  # leaves the transaction open
    got: list[Any] = []
    waiter = threading.Thread(target=lambda: got.append(pool.getconn()), daemon=True)
    waiter.start()
    assert wait_until(lambda: pool.get_stats()["requests_waiting"] == 1)
    kill(pg_server, app, 1, pg_admin)
    pool.putconn(conn)
    waiter.join(GENEROUS)
    assert len(got) == 1 and got[0] is not conn and not got[0].closed
    assert backend_pid(got[0]) > 0
    assert pool.get_stats()["checked_out"] == 1


# -- sessions reset by the network ---------------------------------------------------------


def test_reset_all_idle_with_check_counts_every_lost_connection(
    make: Any, app: str, proxy: FaultProxy, pg_admin: Any
) -> None:
    pool = make(3, 3, target=proxy.dsn, check=check_connection)
    assert wait_until(lambda: proxy.connections == 3)
    assert proxy.reset_all() == 3
    conn = pool.getconn()
    assert backend_pid(conn) > 0
    stats = pool.get_stats()
    assert stats["connections_lost"] == 3
    assert stats["pool_size"] == 1
    conn.rollback()
    pool.putconn(conn)
    assert wait_backends(pg_admin, app, 1) == 1  # the server let go of the reset sessions


def test_reset_all_while_borrowed_fails_every_borrower_at_once(
    make: Any, app: str, proxy: FaultProxy, pg_admin: Any
) -> None:
    pool = make(0, 3, target=proxy.dsn, timeout=GENEROUS)
    held = [pool.getconn() for _ in range(3)]
    for conn in held:
        backend_pid(conn)
        conn.rollback()
    assert proxy.reset_all() == 3
    for conn in held:
        with pytest.raises(psycopg2.OperationalError) as info:
            backend_pid(conn)
        assert is_disconnect(info.value, conn)
        pool.putconn(conn)
    stats = pool.get_stats()
    assert stats["returns_bad"] == 3
    assert (stats["checked_out"], stats["pool_size"]) == (0, 0)
    again = [pool.getconn() for _ in range(3)]  # every slot is usable again
    assert len({backend_pid(c) for c in again}) == 3
    for conn in again:
        conn.rollback()
        pool.putconn(conn)
    pool.closeall()
    assert wait_backends(pg_admin, app, 0) == 0


# -- the same faults inside with-blocks ---------------------------------------------------


def test_kill_inside_a_with_block_closes_the_connection_and_frees_the_slot(
    make: Any, app: str, pg_server: PgServer, pg_admin: Any
) -> None:
    pool = make(1, 1)
    with pytest.raises(psycopg2.OperationalError) as info, pool.connection() as conn:
        backend_pid(conn)
        kill(pg_server, app, 1, pg_admin)
        backend_pid(conn)  # the body notices: the error propagates unchanged
    assert is_disconnect(info.value)
    assert conn.closed
    stats = pool.get_stats()
    assert (stats["checked_out"], stats["pool_size"]) == (0, 0)
    with pool.connection() as again:
        assert again is not conn and backend_pid(again) > 0


def test_kill_before_a_clean_exit_raises_the_commit_error_after_freeing_the_slot(
    make: Any, app: str, pg_server: PgServer, pg_admin: Any
) -> None:
    """The body never noticed; the commit on exit fails and is not swallowed."""
    pool = make(1, 1)
    with pytest.raises(psycopg2.OperationalError), pool.connection() as conn:
        with conn.cursor() as cur:
            cur.execute("CREATE TEMP TABLE t (x int)")
        kill(pg_server, app, 1, pg_admin)
    assert conn.closed
    stats = pool.get_stats()
    assert (stats["checked_out"], stats["pool_size"]) == (0, 0)
    with pool.connection() as again:
        assert backend_pid(again) > 0
