"""The pool core against a real server: bad input, waiting, hand-off, thread stress."""

from __future__ import annotations

import math
import threading
import time
from typing import Any

import psycopg2
import psycopg2.extensions
import pytest

from pgctx.errors import PoolError, PoolTimeout, TooManyWaiters
from pgctx.pool import SimpleConnectionPool, ThreadedConnectionPool
from pgctx.poolcore import is_auto_key
from pgctx.waiting import Waiter
from tests.faults.proxy import FaultProxy
from tests.helpers import backends, unique_app, wait_backends, wait_until

GENEROUS = 15.0  # seconds: an upper bound that is never reached when things work


@pytest.fixture
def app() -> str:
    return unique_app("basepool")


def make(dsn: str, app: str, minconn: int = 0, maxconn: int = 2, **options: Any) -> Any:
    return ThreadedConnectionPool(minconn, maxconn, dsn, application_name=app, **options)


def state(pool: Any) -> tuple[list[Any], dict[Any, Any], dict[int, Any], bool]:
    """What a failed call must leave unchanged (the auto-key counter moves, as in psycopg2)."""
    return (list(pool._pool), dict(pool._used), dict(pool._rused), pool.closed)


# -- construction ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "options", "error", "names"),
    [
        ((-1, 2), {}, ValueError, "-1"),
        ((0, -2), {}, ValueError, "-2"),
        ((3, 1), {}, ValueError, "minconn (3) must not exceed maxconn (1)"),
        ((0, 1), {"timeout": "5"}, TypeError, "'5'"),
        ((0, 1), {"timeout": True}, TypeError, "True"),
        ((0, 1), {"timeout": -1}, ValueError, "-1"),
        ((0, 1), {"timeout": math.nan}, ValueError, "nan"),
        ((0, 1), {"timeout": math.inf}, ValueError, "inf"),
        ((0, 1), {"timeout": 1, "max_waiting": -3}, ValueError, "-3"),
        ((0, 1), {"timeout": 1, "max_waiting": 1.5}, TypeError, "1.5"),
        ((0, 1), {"max_waiting": 4}, ValueError, "max_waiting=4 has no effect without a timeout"),
    ],
)
def test_bad_configuration_is_refused_before_connecting(
    dsn: str, app: str, pg_admin: Any, args: Any, options: Any, error: Any, names: str
) -> None:
    with pytest.raises(error) as info:
        ThreadedConnectionPool(*args, dsn, application_name=app, **options)
    assert names in str(info.value)
    assert backends(pg_admin, app) == 0


def test_sizes_are_coerced_with_int_as_in_psycopg2(dsn: str, app: str) -> None:
    pool = ThreadedConnectionPool("1", 3.9, dsn=dsn, application_name=app)
    try:
        assert (pool.minconn, pool.maxconn) == (1, 3)
        assert len(pool._pool) == 1
    finally:
        pool.closeall()
    with pytest.raises(ValueError, match="invalid literal for int"):
        ThreadedConnectionPool("one", 3, dsn)


def test_simple_pool_refuses_waiting_options(dsn: str) -> None:
    with pytest.raises(TypeError, match="use ThreadedConnectionPool"):
        SimpleConnectionPool(0, 1, dsn, timeout=1)


def test_repr_never_shows_the_password(dsn: str, app: str) -> None:
    pool = ThreadedConnectionPool(0, 1, dsn + " password=s3cret-pw", application_name=app)
    other = ThreadedConnectionPool(0, 1, dsn, password="s3cret-pw", application_name=app)
    for p in (pool, other):
        assert "s3cret-pw" not in repr(p)
        assert "password" not in repr(p)
        assert app in repr(p)


# -- misuse of a live pool leaves it as it was -----------------------------------------


def test_misuse_raises_clearly_and_changes_nothing(dsn: str, app: str) -> None:
    pool = make(dsn, app, 1, 3)
    foreign = psycopg2.connect(dsn)
    try:
        a = pool.getconn()
        b = pool.getconn("b")
        before = state(pool)
        cases: list[tuple[Any, type[BaseException], str]] = [
            (lambda: pool.putconn(foreign), PoolError, "trying to put unkeyed connection"),
            (lambda: pool.putconn(foreign, key="b"), PoolError, "'b'"),
            (lambda: pool.putconn(a, key="b"), PoolError, "'b'"),
            (lambda: pool.putconn(a, key="nope"), PoolError, "'nope'"),
            (lambda: pool.putconn(key="nope"), PoolError, "'nope'"),
            (lambda: pool.getconn(["unhashable"]), TypeError, "['unhashable']"),
            (lambda: pool.putconn(a, key={}), TypeError, "{}"),
            (lambda: pool.getconn(timeout=-1), ValueError, "-1"),
        ]
        for call, error, text in cases:
            with pytest.raises(error) as info:
                call()
            assert text in str(info.value)
            assert state(pool) == before
        assert not foreign.closed and not a.closed and not b.closed
        pool.putconn(a)
        pool.putconn(key="b")  # conn may be omitted on the threaded pool when the key is given
        assert len(pool._used) == 0
    finally:
        foreign.close()
        pool.closeall()


def test_auto_keys_are_private(dsn: str, app: str) -> None:
    pool = make(dsn, app, 0, 3)
    try:
        auto = pool.getconn()
        assert is_auto_key(pool._rused[id(auto)])
        assert pool._keys == 1
        assert pool.getconn(1) is not auto
        assert pool.getconn(0) is not auto
    finally:
        pool.closeall()


# -- waiting ----------------------------------------------------------------------------


def test_without_timeout_exhaustion_raises_at_once(dsn: str, app: str) -> None:
    pool = make(dsn, app, 0, 1)
    try:
        pool.getconn()
        with pytest.raises(PoolError) as info:
            pool.getconn()
        assert type(info.value) is PoolError
        assert str(info.value) == "connection pool exhausted"
    finally:
        pool.closeall()


def test_timeout_raises_pool_timeout_saying_how_long(dsn: str, app: str) -> None:
    pool = make(dsn, app, 1, 1, timeout=0.2)
    try:
        held = pool.getconn()
        before = state(pool)
        started = time.monotonic()
        with pytest.raises(PoolTimeout) as info:
            pool.getconn()
        assert time.monotonic() - started >= 0.2
        assert isinstance(info.value, PoolError)
        assert str(info.value).startswith("connection pool exhausted")
        assert "timeout=0.2" in str(info.value)
        assert state(pool) == before and len(pool._waiters) == 0
        pool.putconn(held)
        assert pool.getconn() is held  # the pool still works after a timeout
    finally:
        pool.closeall()


def _start_waiters(
    pool: Any, count: int, got: list[int], work: Any = None
) -> list[threading.Thread]:
    """Start ``count`` waiting threads one after the other, each queued before the next."""
    threads = []
    for number in range(count):

        def run(number: int = number) -> None:
            conn = pool.getconn()
            got.append(number)
            if work:
                work(conn)
            pool.putconn(conn)

        queued = len(pool._waiters)
        thread = threading.Thread(target=run)
        thread.start()
        assert wait_until(lambda q=queued: len(pool._waiters) == q + 1)
        threads.append(thread)
    return threads


def test_waiters_are_served_first_come_first_served(dsn: str, app: str) -> None:
    pool = make(dsn, app, 1, 1, timeout=30)
    try:
        held = pool.getconn()
        got: list[int] = []
        threads = _start_waiters(pool, 6, got)
        pool.putconn(held)
        for thread in threads:
            thread.join(30)
        assert got == list(range(6))
        assert len(pool._used) == 0 and len(pool._pool) == 1
    finally:
        pool.closeall()


def test_a_returned_connection_cannot_be_taken_by_a_later_caller(dsn: str, app: str) -> None:
    pool = make(dsn, app, 0, 1, timeout=30)
    try:
        held = pool.getconn()
        gate = threading.Event()
        got: list[int] = []
        threads = _start_waiters(pool, 1, got, work=lambda conn: gate.wait(30))
        pool.putconn(held)  # handed straight to the waiter, not left for anyone else
        with pytest.raises(PoolTimeout):
            pool.getconn(timeout=0.05)
        gate.set()
        threads[0].join(30)
        assert got == [0]
    finally:
        pool.closeall()


def test_max_waiting_refuses_extra_callers(dsn: str, app: str) -> None:
    pool = make(dsn, app, 0, 1, timeout=30, max_waiting=2)
    try:
        held = pool.getconn()
        got: list[int] = []
        threads = _start_waiters(pool, 2, got)
        before = state(pool)
        with pytest.raises(
            TooManyWaiters, match=r"2 callers are already waiting \(max_waiting=2\)"
        ):
            pool.getconn()
        assert state(pool) == before and len(pool._waiters) == 2
        pool.putconn(held)
        for thread in threads:
            thread.join(30)
        assert got == [0, 1]
    finally:
        pool.closeall()


def test_waiter_timing_out_as_a_connection_is_handed_to_it_keeps_it(
    dsn: str, app: str, mocker: Any
) -> None:
    pool = make(dsn, app, 0, 1, timeout=30)
    try:
        held = pool.getconn()

        def time_out_while_served(waiter: Waiter, timeout: float) -> None:
            # The wait "expires", and only then does another thread return the connection.
            returner = threading.Thread(target=pool.putconn, args=(held,))
            returner.start()
            returner.join(30)

        mocker.patch.object(Waiter, "wait", time_out_while_served)
        conn = pool.getconn()
        assert conn is held
        assert pool._used[pool._rused[id(conn)]] is conn and len(pool._waiters) == 0
        mocker.stopall()
        pool.putconn(conn)
        assert pool._pool == [] and held.closed  # minconn=0: closed on return, not lost
    finally:
        pool.closeall()


def test_a_slot_freed_by_close_lets_a_waiter_connect(dsn: str, app: str, pg_admin: Any) -> None:
    pool = make(dsn, app, 0, 1, timeout=30)
    try:
        held = pool.getconn()
        got: list[int] = []
        threads = _start_waiters(pool, 1, got)
        pool.putconn(held, close=True)
        threads[0].join(30)
        assert got == [0] and held.closed
        assert wait_backends(pg_admin, app, 0) == 0  # the waiter's own conn closed on return
    finally:
        pool.closeall()


def test_a_failed_connect_passes_the_slot_on(dsn: str, app: str, mocker: Any) -> None:
    pool = make(dsn, app, 0, 1, timeout=30)
    try:
        held = pool.getconn()
        errors: list[BaseException] = []

        def failing_waiter() -> None:
            try:
                pool.getconn()
            except BaseException as exc:
                errors.append(exc)

        real_open = pool._open
        # not an OperationalError: that would be retried until the deadline
        calls = iter([psycopg2.ProgrammingError("simulated connect failure")])

        def open_once_failing(deadline: float | None = None) -> Any:
            error = next(calls, None)
            if error is not None:
                raise error
            return real_open(deadline)

        mocker.patch.object(pool, "_open", open_once_failing)
        first = threading.Thread(target=failing_waiter)
        first.start()
        assert wait_until(lambda: len(pool._waiters) == 1)
        got: list[int] = []
        second = _start_waiters(pool, 1, got)
        pool.putconn(held, close=True)
        first.join(30)
        second[0].join(30)
        assert [str(e) for e in errors] == ["simulated connect failure"]
        assert got == [0]
        assert pool._connecting == 0 and len(pool._used) == 0
    finally:
        pool.closeall()


def test_closeall_wakes_waiters_with_pool_closed(dsn: str, app: str) -> None:
    pool = make(dsn, app, 0, 1, timeout=30)
    held = pool.getconn()
    errors: list[str] = []

    def waiter() -> None:
        try:
            pool.getconn()
        except PoolError as exc:
            errors.append(str(exc))

    thread = threading.Thread(target=waiter)
    thread.start()
    assert wait_until(lambda: len(pool._waiters) == 1)
    pool.closeall()
    thread.join(30)
    assert errors == ["connection pool is closed"]
    assert held.closed


# -- thread stress ------------------------------------------------------------------------


class Exclusivity:
    """Records who holds each connection; fails if two borrowers ever hold one."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.holders: dict[int, int] = {}
        self.violations = 0
        self.max_held = 0

    def take(self, conn: Any) -> None:
        with self.lock:
            if id(conn) in self.holders:
                self.violations += 1
            self.holders[id(conn)] = threading.get_ident()
            self.max_held = max(self.max_held, len(self.holders))

    def give(self, conn: Any) -> None:
        with self.lock:
            self.holders.pop(id(conn), None)


@pytest.mark.parametrize("timeout", [None, 10.0])
def test_thread_stress_keeps_bounds_and_never_shares(
    dsn: str, app: str, pg_admin: Any, timeout: float | None
) -> None:
    pool = make(dsn, app, 2, 4, timeout=timeout)
    ledger = Exclusivity()
    failures: list[BaseException] = []
    exhausted = [0]

    def worker(n: int) -> None:
        try:
            for i in range(40):
                try:
                    conn = pool.getconn()
                except PoolTimeout:
                    raise
                except PoolError:
                    exhausted[0] += 1
                    continue
                ledger.take(conn)
                if i % 4 == 0:
                    with conn.cursor() as cur:
                        cur.execute("SELECT %s", (n,))
                        assert cur.fetchone() == (n,)
                ledger.give(conn)
                pool.putconn(conn, close=(i % 13 == 0))
        except BaseException as exc:
            failures.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not any(thread.is_alive() for thread in threads)
    assert failures == []
    assert ledger.violations == 0
    assert ledger.max_held <= 4
    if timeout is not None:
        assert exhausted[0] == 0
    assert len(pool._used) == 0 and pool._connecting == 0 and len(pool._pool) <= 2
    pool.closeall()
    assert wait_backends(pg_admin, app, 0) == 0


def test_a_caller_whose_deadline_passed_gets_pool_timeout(dsn: str, app: str) -> None:
    """After a slow failed check the deadline may be past: waiting must not blow up."""
    pool = make(dsn, app, 0, 1, timeout=30)
    try:
        held = pool.getconn()
        with pool._lock:
            waiter = pool._enqueue("late", time.monotonic() - 1)
        with pytest.raises(PoolTimeout):
            pool._await_turn(waiter, 30, time.monotonic() - 1)
        assert len(pool._waiters) == 0
        pool.putconn(held)
    finally:
        pool.closeall()


class _SignallingConnection(psycopg2.extensions.connection):
    """Sets ``rolling_back`` when the pool starts its rollback on return."""

    rolling_back = threading.Event()

    def rollback(self) -> None:
        type(self).rolling_back.set()
        super().rollback()


def test_a_slow_rollback_on_return_holds_up_no_other_caller(dsn: str, app: str) -> None:
    """The rollback on return used to run with the pool's lock held: while one server
    round trip was pending, every other getconn and putconn waited (for ever when the
    server stopped answering and no timeout was set)."""
    _SignallingConnection.rolling_back.clear()
    with FaultProxy(dsn) as proxy:
        pool = ThreadedConnectionPool(
            2, 2, proxy.dsn, application_name=app, connection_factory=_SignallingConnection
        )
        try:
            dirty, idle = pool.getconn(), pool.getconn()
            with dirty.cursor() as cur:
                cur.execute("SELECT 1")  # an open transaction: putconn rolls it back
            pool.putconn(idle)
            proxy.set_mode("stop_relaying")  # the rollback now waits for the server
            returner = threading.Thread(target=pool.putconn, args=(dirty,), daemon=True)
            returner.start()
            assert _SignallingConnection.rolling_back.wait(GENEROUS)
            got: list[Any] = []
            taker = threading.Thread(target=lambda: got.append(pool.getconn()), daemon=True)
            taker.start()
            taker.join(GENEROUS)  # never reached when the rollback holds no lock
            finished = got == [idle]
            proxy.set_mode("relay")
            returner.join(GENEROUS)
            taker.join(GENEROUS)
            assert finished, "getconn waited for another connection's rollback"
            assert not returner.is_alive() and list(pool._used.values()) == [idle]
        finally:
            proxy.set_mode("relay")
            pool.closeall()
