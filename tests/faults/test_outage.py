"""The server unreachable for a while, then back (scenarios 6, 7, 9 and 12 of the catalogue).

Outages are real: a private server stopped and started again, or the fault proxy
refusing connections or accepting them and never answering. With ``timeout=T`` a
borrower gets ``PoolTimeout`` (a ``PoolError`` whose message starts with "connection
pool exhausted", with the last connect error as ``__cause__``) within a generous bound
of T; connects are retried with backoff, not in a busy loop; no slot is lost; and the
pool serves again once the server is back, without being rebuilt.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import psycopg2
import pytest

from pgctx.errors import PoolError, PoolTimeout
from pgctx.health import check_connection
from pgctx.pool import ThreadedConnectionPool
from pgctx.testing import ThrowawayServer
from tests.faults.proxy import FaultProxy
from tests.helpers import backend_pid, unique_app, wait_until

GENEROUS = 20.0  # seconds: upper bounds only
BOUND = 10.0  # a getconn(timeout=1) must end well within this, whatever the fault


@pytest.fixture
def app() -> str:
    return unique_app("outage")


def timed_getconn(pool: ThreadedConnectionPool, **kwargs: Any) -> tuple[BaseException, float]:
    """Call getconn expecting it to fail; return the error and how long it took."""
    started = time.monotonic()
    with pytest.raises(PoolError) as info:
        pool.getconn(**kwargs)
    return info.value, time.monotonic() - started


def assert_pool_timeout(error: BaseException, elapsed: float, cause_text: str) -> None:
    assert isinstance(error, PoolTimeout)
    assert str(error).startswith("connection pool exhausted")
    assert isinstance(error.__cause__, psycopg2.OperationalError)
    assert cause_text in str(error.__cause__)
    assert elapsed < BOUND


def round_trip(pool: ThreadedConnectionPool, **kwargs: Any) -> int:
    conn = pool.getconn(**kwargs)
    try:
        pid = backend_pid(conn)
        conn.rollback()
        return pid
    finally:
        pool.putconn(conn)


# -- server stopped, then started ------------------------------------------------------


def test_server_down_bounded_wait_backoff_and_recovery(make: Any, server: ThrowawayServer) -> None:
    pool = make(server.dsn, 1, 2, timeout=1, check=check_connection)
    old_pid = round_trip(pool)
    server.stop("fast")

    error, elapsed = timed_getconn(pool)
    # The idle connection failed its check, then connects were retried until the deadline.
    assert_pool_timeout(error, elapsed, "refused")
    assert elapsed >= 0.9  # it did wait for its timeout rather than fail at the first error
    stats = pool.get_stats()
    assert stats["connections_lost"] == 1
    # Retried with backoff: more than once, but nowhere near a busy loop (a refused
    # connect takes well under a millisecond here).
    assert 2 <= stats["connections_errors"] <= 25
    assert stats["requests_timeouts"] == 1
    assert (stats["checked_out"], stats["pool_size"]) == (0, 0)  # no slot lost

    error, _ = timed_getconn(pool, timeout=0.3)  # still down: same story, per-call timeout
    assert isinstance(error, PoolTimeout)
    assert pool.get_stats()["connections_errors"] > stats["connections_errors"]

    server.start()
    assert round_trip(pool) != old_pid  # the same pool serves again
    stats = pool.get_stats()
    assert (stats["checked_out"], stats["requests_timeouts"]) == (0, 2)
    assert 1 <= stats["pool_size"] <= 2


def test_concurrent_waiters_during_an_outage_lose_no_slot(
    make: Any, server: ThrowawayServer
) -> None:
    pool = make(server.dsn, 0, 2, timeout=1)
    server.stop("fast")
    errors: list[BaseException] = []
    elapsed: list[float] = []
    lock = threading.Lock()

    def borrower() -> None:
        started = time.monotonic()
        try:
            pool.getconn()
        except BaseException as exc:
            with lock:
                errors.append(exc)
                elapsed.append(time.monotonic() - started)

    threads = [threading.Thread(target=borrower, daemon=True) for _ in range(5)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(GENEROUS)
    assert not any(t.is_alive() for t in threads)
    assert len(errors) == 5
    assert all(isinstance(e, PoolTimeout) for e in errors)
    assert all(str(e).startswith("connection pool exhausted") for e in errors)
    assert max(elapsed) < BOUND
    stats = pool.get_stats()
    assert (stats["checked_out"], stats["pool_size"], stats["requests_waiting"]) == (0, 0, 0)
    assert stats["requests_timeouts"] == 5

    server.start()
    both = [pool.getconn(), pool.getconn()]  # both slots are usable
    assert len({backend_pid(c) for c in both}) == 2
    for conn in both:
        conn.rollback()
        pool.putconn(conn)


def test_a_waiting_borrower_gets_a_connection_when_the_server_returns(
    make: Any, server: ThrowawayServer
) -> None:
    pool = make(server.dsn, 0, 1, timeout=GENEROUS)
    server.stop("fast")
    got: list[Any] = []
    failed: list[BaseException] = []

    def borrower() -> None:
        try:
            got.append(pool.getconn())
        except BaseException as exc:
            failed.append(exc)

    thread = threading.Thread(target=borrower, daemon=True)
    thread.start()
    assert wait_until(lambda: pool.get_stats()["connections_errors"] >= 2, GENEROUS)
    assert thread.is_alive()  # still retrying within its timeout
    server.start()
    thread.join(GENEROUS)
    assert not thread.is_alive()
    assert failed == [] and len(got) == 1
    assert backend_pid(got[0]) > 0
    got[0].rollback()
    pool.putconn(got[0])


# -- through the proxy: refused, and a listener that never answers ----------------------


def test_connection_refused_bounded_then_recovers(make: Any, proxy: FaultProxy) -> None:
    pool = make(proxy.dsn, 1, 2, timeout=1)
    proxy.set_mode("refuse")
    held = pool.getconn()  # the idle connection still works: only new ones are refused
    assert backend_pid(held) > 0
    held.rollback()

    error, elapsed = timed_getconn(pool)
    assert_pool_timeout(error, elapsed, "refused")
    assert "last error" in str(error)
    errors_during = pool.get_stats()["connections_errors"]
    assert 2 <= errors_during <= 25

    proxy.set_mode("relay")
    assert round_trip(pool) > 0
    pool.putconn(held)
    assert pool.get_stats()["checked_out"] == 0


def test_listener_that_never_answers_is_bounded_by_connect_timeout(
    make: Any, proxy: FaultProxy
) -> None:
    """libpq has no default connect timeout; with ``timeout`` the pool adds one (>= 2 s)."""
    pool = make(proxy.dsn, 0, 1, timeout=1)
    proxy.set_mode("hang_on_connect")
    error, elapsed = timed_getconn(pool)
    assert_pool_timeout(error, elapsed, "timeout expired")
    assert pool.get_stats()["connections_errors"] >= 1
    assert (pool.get_stats()["checked_out"], pool.get_stats()["pool_size"]) == (0, 0)
    proxy.set_mode("relay")
    assert round_trip(pool) > 0


def test_a_hanging_connect_blocks_no_other_borrower_or_return(make: Any, proxy: FaultProxy) -> None:
    pool = make(proxy.dsn, 1, 2, timeout=2)
    held = pool.getconn()  # the only connection; the next borrower must connect
    proxy.set_mode("hang_on_connect")
    done = threading.Event()
    outcome: list[BaseException] = []

    def stuck() -> None:
        try:
            pool.getconn()
        except BaseException as exc:
            outcome.append(exc)
        finally:
            done.set()

    thread = threading.Thread(target=stuck, daemon=True)
    thread.start()
    assert wait_until(lambda: proxy.pending >= 1, GENEROUS)  # its connect is hanging now

    started = time.monotonic()
    pool.putconn(held)  # neither waits for the hanging connect
    again = pool.getconn()
    assert again is held
    pool.putconn(again)
    assert not done.is_set()  # all of the above happened while the connect hung
    assert time.monotonic() - started < 1.0

    thread.join(GENEROUS)
    assert len(outcome) == 1 and isinstance(outcome[0], PoolTimeout)
    proxy.set_mode("relay")


def test_without_timeout_a_connect_error_surfaces_at_once(make: Any, proxy: FaultProxy) -> None:
    """psycopg2-compatible default: the connect error itself, no retry, slot freed."""
    pool = make(proxy.dsn, 0, 1)
    proxy.set_mode("refuse")
    started = time.monotonic()
    with pytest.raises(psycopg2.OperationalError, match="refused"):
        pool.getconn()
    assert time.monotonic() - started < BOUND
    stats = pool.get_stats()
    assert stats["connections_errors"] == 1
    assert (stats["checked_out"], stats["pool_size"]) == (0, 0)
    proxy.set_mode("relay")
    assert round_trip(pool) > 0


def test_pool_created_while_the_server_is_unreachable(make: Any, proxy: FaultProxy) -> None:
    proxy.set_mode("refuse")
    with pytest.raises(psycopg2.OperationalError, match="refused"):
        make(proxy.dsn, 1, 2, timeout=1)  # minconn > 0 connects in the constructor
    pool = make(proxy.dsn, 0, 2, timeout=1)  # minconn=0 starts empty
    error, elapsed = timed_getconn(pool)
    assert_pool_timeout(error, elapsed, "refused")
    proxy.set_mode("relay")
    assert round_trip(pool) > 0


HANG_BOUND = 5.0  # for timeout=0.5; libpq's connect_timeout cannot go below 2 s


def outcome_within(call: Callable[[], Any], seconds: float, heal: Callable[[], None]) -> Any:
    """Run ``call`` in a thread; fail unless it ends within ``seconds``.

    ``heal`` is called either way (after the call ended, or when it is found still
    blocked) so that a blocked call can finish and the test cleans up.
    """
    done = threading.Event()
    outcome: list[object] = []

    def run() -> None:
        try:
            outcome.append(call())
        except BaseException as exc:
            outcome.append(exc)
        finally:
            done.set()

    thread = threading.Thread(target=run, daemon=True)
    started = time.monotonic()
    thread.start()
    try:
        in_time = done.wait(seconds)
        elapsed = time.monotonic() - started
    finally:
        heal()
        thread.join(GENEROUS)
    assert in_time, f"still blocked after {elapsed:.1f} s"
    return outcome[0]


@pytest.mark.parametrize("pool_timeout", [10, None], ids=["pool-timeout-10", "no-pool-timeout"])
def test_per_call_timeout_bounds_a_connect_that_hangs(
    make: Any, proxy: FaultProxy, pool_timeout: float | None
) -> None:
    pool = make(proxy.dsn, 0, 1, timeout=pool_timeout)
    proxy.set_mode("hang_on_connect")
    error = outcome_within(
        lambda: pool.getconn(timeout=0.5), HANG_BOUND, lambda: proxy.set_mode("relay")
    )
    assert isinstance(error, PoolTimeout)
    assert str(error).startswith("connection pool exhausted")


def test_check_on_a_connection_that_never_answers_is_bounded(make: Any, proxy: FaultProxy) -> None:
    pool = make(proxy.dsn, 1, 2, timeout=0.5, check=check_connection)
    proxy.set_mode("stop_relaying")  # the idle connection's check will get no answer
    error = outcome_within(pool.getconn, HANG_BOUND, lambda: proxy.set_mode("relay"))
    assert isinstance(error, PoolTimeout)
