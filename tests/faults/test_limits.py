"""Server limits and server-side timeouts (scenarios 15, 16, 37 and 38 of the catalogue).

``max_connections`` reached, on a small throwaway server of this module's own: the
connect error reaches the caller clearly (or as the cause of ``PoolTimeout``), a failed
connect gives its slot back, and the pool recovers once the server has room again.

A leaked connection that exhausts the pool: waiters time out, the leak report names the
code that took it, and the pool serves again once it is returned.

``statement_timeout`` and ``idle_in_transaction_session_timeout``, on the shared server:
a statement timeout is not a disconnect, so the connection is rolled back and kept; the
idle-in-transaction timeout ends the session, and the pool drops it on return even
when the borrower never noticed.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from typing import Any

import psycopg2
import psycopg2.errors
import pytest

from pgctx.errors import PoolTimeout
from pgctx.health import check_connection, is_disconnect
from pgctx.testing import ThrowawayServer
from tests.helpers import backend_pid, backends, unique_app, wait_backends, wait_until

BOUND = 10.0  # seconds: a getconn(timeout=1) must end well within this
MAX_CONNECTIONS = 6


@pytest.fixture
def app() -> str:
    return unique_app("limits")


@pytest.fixture(scope="module")
def small_server() -> Iterator[ThrowawayServer]:
    """A server with room for only a few connections (superuser slots included)."""
    try:
        instance = ThrowawayServer(max_connections=MAX_CONNECTIONS)
    except ImportError as exc:
        pytest.skip(str(exc))
    with instance:
        yield instance


def client_backends(conn: Any) -> int:
    """Client backends on the server, as seen through ``conn`` (in autocommit)."""
    with conn.cursor() as cur:
        cur.execute("SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend'")
        (count,) = cur.fetchone()
    return int(count)


@pytest.fixture
def full_server(small_server: ThrowawayServer) -> Iterator[tuple[ThrowawayServer, list[Any]]]:
    """The small server with every connection slot taken by idle "hog" connections.

    Yields the server and the hogs (autocommit connections); the test may close some
    of them to make room.
    """
    hogs: list[Any] = []
    deadline = time.monotonic() + BOUND
    try:
        while True:
            try:
                hog = psycopg2.connect(small_server.dsn, application_name="hog")
                hog.autocommit = True
                hogs.append(hog)
            except psycopg2.OperationalError as exc:
                assert "too many clients" in str(exc)
                # Full, unless backends of an earlier test were still exiting: then
                # their slots free up soon and are taken by more hogs.
                if client_backends(hogs[0]) == len(hogs):
                    break
                assert time.monotonic() < deadline, "backends of earlier tests never exited"
                time.sleep(0.02)
            assert len(hogs) <= MAX_CONNECTIONS
        yield small_server, hogs
    finally:
        for hog in hogs:
            hog.close()


# -- max_connections -----------------------------------------------------------------------


def test_server_full_the_connect_error_surfaces_and_the_slot_is_freed(
    make: Any, full_server: Any
) -> None:
    server, hogs = full_server
    pool = make(server.dsn, 0, 2)
    with pytest.raises(psycopg2.OperationalError, match="too many clients"):
        pool.getconn()
    stats = pool.get_stats()
    assert stats["connections_errors"] == 1
    assert (stats["checked_out"], stats["pool_size"]) == (0, 0)

    hogs.pop().close()  # room for exactly one
    conn = pool.getconn()
    assert backend_pid(conn) > 0
    with pytest.raises(psycopg2.OperationalError, match="too many clients"):
        pool.getconn()  # growing past what the server allows fails cleanly too
    stats = pool.get_stats()
    assert (stats["checked_out"], stats["pool_size"]) == (1, 1)
    conn.rollback()
    pool.putconn(conn)


def test_server_full_with_timeout_raises_pool_timeout_then_recovers(
    make: Any, full_server: Any
) -> None:
    server, hogs = full_server
    pool = make(server.dsn, 0, 2, timeout=1)
    started = time.monotonic()
    with pytest.raises(PoolTimeout) as info:
        pool.getconn()
    elapsed = time.monotonic() - started
    assert elapsed < BOUND
    assert str(info.value).startswith("connection pool exhausted")
    assert "too many clients" in str(info.value)  # the last connect error, first line
    assert isinstance(info.value.__cause__, psycopg2.OperationalError)
    assert pool.get_stats()["connections_errors"] >= 2  # retried with backoff
    assert pool.get_stats()["pool_size"] == 0

    hogs.pop().close()
    conn = pool.getconn(timeout=BOUND)
    assert backend_pid(conn) > 0
    conn.rollback()
    pool.putconn(conn)


def test_server_full_at_construction_closes_what_was_opened(
    make: Any, full_server: Any, app: str
) -> None:
    server, hogs = full_server
    for _ in range(2):
        hogs.pop().close()  # room for two, but the pool wants three
    with pytest.raises(psycopg2.OperationalError, match="too many clients"):
        make(server.dsn, 3, 3)
    admin = hogs.pop()  # reuse a slot to look at the server (hogs are in autocommit)
    try:
        # the two connections the constructor had opened are closed, not leaked
        assert wait_backends(admin, app, 0) == 0
    finally:
        admin.close()
    pool = make(server.dsn, 3, 3)  # one slot per hog closed above: room for three now
    assert pool.get_stats()["pool_available"] == 3


# -- statement_timeout -------------------------------------------------------------------


@pytest.mark.parametrize("check", [None, check_connection], ids=["no-check", "check"])
def test_statement_timeout_is_not_a_disconnect_and_the_connection_is_kept(
    make: Any, dsn: str, check: Any
) -> None:
    pool = make(dsn, 1, 1, options="-c statement_timeout=200", check=check)
    conn = pool.getconn()
    pid = backend_pid(conn)
    with pytest.raises(psycopg2.errors.QueryCanceled) as info, conn.cursor() as cur:
        cur.execute("SELECT pg_sleep(30)")
    assert info.value.pgcode == "57014"
    assert not is_disconnect(info.value, conn)
    assert conn.closed == 0
    pool.putconn(conn)  # rolled back and kept

    again = pool.getconn()
    assert again is conn and backend_pid(again) == pid
    again.rollback()
    pool.putconn(again)
    stats = pool.get_stats()
    assert stats["returns_bad"] == stats["connections_lost"] == 0
    assert stats["connections_num"] == 1


# -- idle_in_transaction_session_timeout -----------------------------------------------------


def open_transaction_and_wait_for_its_end(pool: Any, app: str, admin: Any) -> Any:
    """Borrow, leave a transaction open, and wait until the server's timeout has ended it."""
    conn = pool.getconn()
    backend_pid(conn)  # opens a transaction
    assert conn.get_transaction_status() == psycopg2.extensions.TRANSACTION_STATUS_INTRANS
    assert wait_backends(admin, app, 0) == 0  # the server ended the session
    assert conn.closed == 0  # the client has not noticed
    return conn


def test_idle_in_transaction_timeout_then_used_raises_and_is_dropped(
    make: Any, dsn: str, app: str, pg_admin: Any
) -> None:
    pool = make(dsn, 1, 1, options="-c idle_in_transaction_session_timeout=200")
    conn = open_transaction_and_wait_for_its_end(pool, app, pg_admin)
    with pytest.raises(psycopg2.OperationalError) as info:
        backend_pid(conn)
    assert is_disconnect(info.value, conn)
    pool.putconn(conn)
    stats = pool.get_stats()
    assert stats["returns_bad"] == 1
    assert (stats["checked_out"], stats["pool_size"]) == (0, 0)
    fresh = pool.getconn()
    assert fresh is not conn and backend_pid(fresh) > 0
    fresh.rollback()
    pool.putconn(fresh)


def test_idle_in_transaction_timeout_then_returned_unused_frees_the_slot(
    make: Any, dsn: str, app: str, pg_admin: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """The rollback on return fails; psycopg2.pool would raise and lose the slot here."""
    pool = make(dsn, 1, 1, options="-c idle_in_transaction_session_timeout=200")
    conn = open_transaction_and_wait_for_its_end(pool, app, pg_admin)
    with caplog.at_level(logging.WARNING, logger="pgctx"):
        pool.putconn(conn)
    assert any("rollback failed" in r.getMessage() for r in caplog.records)
    assert conn.closed
    assert pool.get_stats()["checked_out"] == 0
    fresh = pool.getconn()  # the only slot is free again
    assert backend_pid(fresh) > 0
    fresh.rollback()
    pool.putconn(fresh)
    assert backends(pg_admin, app) == 1


# -- a pool exhausted by a leak ------------------------------------------------------------


def test_a_leak_that_exhausts_the_pool_is_reported_and_waiters_time_out(
    make: Any, dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="pgctx")
    pool = make(dsn, 0, 1, timeout=0.5, leak_timeout=0.2)

    def request_handler_that_forgets_to_put_back() -> Any:
        return pool.getconn()

    leaked = request_handler_that_forgets_to_put_back()
    started = time.monotonic()
    with pytest.raises(PoolTimeout, match="no connection became free"):
        pool.getconn()
    assert time.monotonic() - started < BOUND
    assert wait_until(lambda: pool.get_stats()["leaks_reported"] == 1)
    report = next(r for r in caplog.records if "not returned yet" in r.getMessage())
    assert "request_handler_that_forgets_to_put_back" in report.getMessage()
    assert pool.get_stats()["requests_timeouts"] == 1

    pool.putconn(leaked)  # once it comes back, the pool serves again
    assert any("came back after" in r.getMessage() for r in caplog.records)
    conn = pool.getconn()
    assert backend_pid(conn) > 0
    conn.rollback()
    pool.putconn(conn)
