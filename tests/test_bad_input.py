"""Every misuse of the pools: a clear error, and the pool exactly as it was before.

Each bad call is made against a pool in a known, populated state (connections idle,
checked out under an automatic key and under an explicit key). Afterwards the pool's
idle list, checked-out map, slot counters, waiters, statistics (other than the
``requests_num`` call counter) and the server's sessions are unchanged, and every
connection it holds still works. Bad configuration is refused before any connection is
opened, so the constructor tests use ``minconn=1``: a check made too late would leave a
session on the server.
"""

from __future__ import annotations

import math
import re
import threading
from collections.abc import Callable, Iterator
from typing import Any

import psycopg2
import pytest

from pgctx.errors import PoolError, TooManyWaiters
from pgctx.health import check_connection
from pgctx.pool import (
    PersistentConnectionPool,
    SimpleConnectionPool,
    ThreadedConnectionPool,
)
from tests.helpers import backends, unique_app, wait_backends, wait_until

COUNTERS_MOVED_BY_ANY_CALL = {"requests_num"}  # a rejected getconn still counts as a request


@pytest.fixture
def app() -> str:
    return unique_app("badinput")


def maintenance_threads() -> int:
    return sum(t.name.startswith("pgctx-maintenance") for t in threading.enumerate())


# -- constructors ---------------------------------------------------------------------------

T, S, P = ThreadedConnectionPool, SimpleConnectionPool, PersistentConnectionPool
BAD_CONFIGURATIONS: list[tuple[Any, tuple[Any, Any], dict[str, Any], Any, str]] = [
    # sizes
    (T, (-1, 2), {}, ValueError, "minconn must be >= 0, got -1"),
    (T, (1, -2), {}, ValueError, "maxconn must be >= 0, got -2"),
    (T, (3, 1), {}, ValueError, "minconn (3) must not exceed maxconn (1)"),
    (T, ("one", 2), {}, ValueError, "invalid literal for int"),
    (T, (None, 2), {}, TypeError, "NoneType"),
    (P, (3, 1), {}, ValueError, "must not exceed"),
    (S, (3, 1), {}, ValueError, "must not exceed"),
    # waiting
    (T, (1, 2), {"timeout": "5"}, TypeError, "timeout must be a number of seconds or None"),
    (T, (1, 2), {"timeout": True}, TypeError, "got True (bool)"),
    (T, (1, 2), {"timeout": -1}, ValueError, "timeout must be a finite number of seconds >= 0"),
    (T, (1, 2), {"timeout": math.nan}, ValueError, "got nan"),
    (T, (1, 2), {"timeout": math.inf}, ValueError, "got inf"),
    (T, (1, 2), {"timeout": 1, "max_waiting": -3}, ValueError, "max_waiting must be >= 0"),
    (T, (1, 2), {"timeout": 1, "max_waiting": 1.5}, TypeError, "max_waiting must be an int"),
    (T, (1, 2), {"max_waiting": 4}, ValueError, "max_waiting=4 has no effect without a timeout"),
    # durations beyond what a lock can wait for (the wait would raise OverflowError)
    (T, (1, 2), {"timeout": 1e10}, ValueError, "timeout must be at most 4611686018 s"),
    (T, (1, 2), {"timeout": 10**400}, ValueError, "timeout must be at most"),
    (T, (1, 2), {"timeout": -(10**400)}, ValueError, "timeout must be a finite number"),
    (S, (1, 2), {"timeout": 1}, TypeError, "SimpleConnectionPool cannot wait"),
    (S, (1, 2), {"max_waiting": 3}, TypeError, "use ThreadedConnectionPool(..., timeout="),
    # policies
    (T, (1, 2), {"check": "x"}, TypeError, "check must be a callable taking the connection"),
    (T, (1, 2), {"check": "SELECT 1"}, TypeError, "got 'SELECT 1' (str)"),
    (T, (1, 2), {"reset": 5}, TypeError, "reset must be a callable"),
    (T, (1, 2), {"configure": "SET x = 1"}, TypeError, "configure must be a callable"),
    (
        T,
        (1, 2),
        {"check_after_idle": 1},
        ValueError,
        "check_after_idle has no effect without check",
    ),
    (
        T,
        (1, 2),
        {"check": check_connection, "check_after_idle": -1},
        ValueError,
        "check_after_idle must be a finite number of seconds >= 0",
    ),
    (
        T,
        (1, 2),
        {"check": check_connection, "check_after_idle": "30"},
        TypeError,
        "check_after_idle must be a number of seconds or None",
    ),
    (T, (1, 2), {"max_lifetime": 0}, ValueError, "max_lifetime must be > 0 seconds"),
    (T, (1, 2), {"max_lifetime": -5}, ValueError, "max_lifetime must be a finite number"),
    (T, (1, 2), {"max_lifetime": math.inf}, ValueError, "max_lifetime must be a finite number"),
    (T, (1, 2), {"max_lifetime": "1h"}, TypeError, "max_lifetime must be a number of seconds"),
    (T, (1, 2), {"max_idle": 0}, ValueError, "max_idle must be > 0 seconds"),
    (T, (1, 2), {"leak_timeout": 0}, ValueError, "leak_timeout must be > 0 seconds"),
    (T, (1, 2), {"leak_timeout": True}, TypeError, "got True (bool)"),
    (T, (1, 2), {"leak_timeout": math.nan}, ValueError, "leak_timeout must be a finite number"),
    (T, (1, 2), {"leak_timeout": 1e300}, ValueError, "leak_timeout must be at most"),
    (T, (1, 2), {"max_lifetime": 10**400}, ValueError, "max_lifetime must be at most"),
    (T, (1, 2), {"max_idle": -math.inf}, ValueError, "max_idle must be a finite number"),
    (T, (1, 2), {"max_idle": 1e12}, ValueError, "max_idle must be at most"),
    (T, (1, 2), {"max_idle": False}, TypeError, "max_idle must be a number of seconds"),
    (
        T,
        (1, 2),
        {"check": check_connection, "check_after_idle": 1e18},
        ValueError,
        "check_after_idle must be at most",
    ),
    (P, (1, 2), {"check": 1}, TypeError, "check must be a callable"),
    (T, (1, 2), {"check": lambda: True}, TypeError, "check must accept the connection as its"),
    (P, (1, 2), {"reset": lambda c, d: 0}, TypeError, "has the signature (c, d)"),
    (T, (1, 2), {"configure": lambda *, conn: 0}, TypeError, "define it as configure(conn)"),
    # options libpq does not know (a misspelt pgctx option ends up there)
    (T, (1, 2), {"timout": 1}, psycopg2.ProgrammingError, 'invalid connection option "timout"'),
    (T, (1, 2), {"max_lifetim": 60}, psycopg2.ProgrammingError, '"max_lifetim"'),
    (T, (1, 2), {"password": "s3\x00cret"}, ValueError, "the password argument contains a NUL"),
]


@pytest.mark.parametrize(
    ("cls", "sizes", "options", "error", "message"),
    BAD_CONFIGURATIONS,
    ids=[
        f"{c.__name__[: -len('ConnectionPool')]}-{s}-{sorted(o)}"
        for c, s, o, _, _ in BAD_CONFIGURATIONS
    ],
)
def test_bad_configuration_is_refused_before_connecting(
    dsn: str,
    app: str,
    pg_admin: Any,
    cls: Any,
    sizes: tuple[Any, Any],
    options: dict[str, Any],
    error: type[BaseException],
    message: str,
) -> None:
    threads_before = maintenance_threads()
    with pytest.raises(error) as info:
        cls(*sizes, dsn, application_name=app, **options)
    assert message in str(info.value)
    assert backends(pg_admin, app) == 0  # nothing was opened (or it was closed again)
    assert maintenance_threads() == threads_before  # and no thread was left behind


def test_an_unknown_option_fails_at_construction_even_with_minconn_0(
    dsn: str, app: str, pg_admin: Any
) -> None:
    """psycopg2 would only fail at the first getconn; the error is psycopg2's own type."""
    with pytest.raises(psycopg2.ProgrammingError, match='invalid connection option "timout"'):
        ThreadedConnectionPool(0, 1, dsn, application_name=app, timout=1)
    assert backends(pg_admin, app) == 0


# -- misuse of a working pool ------------------------------------------------------------


class Populated:
    """A pool with two idle connections, one out under an automatic key, one under "k1"."""

    def __init__(self, pool: Any, other: Any, foreign: Any) -> None:
        self.pool, self.other, self.foreign = pool, other, foreign
        extra = [pool.getconn() for _ in range(2)]
        self.auto = pool.getconn()
        self.keyed = pool.getconn("k1")
        for conn in extra:
            pool.putconn(conn)
        self.other_conn = other.getconn()

    def snapshot(self) -> dict[str, Any]:
        pool = self.pool
        stats = pool.get_stats()
        return {
            "idle": list(pool._pool),
            "used": dict(pool._used),
            "rused": dict(pool._rused),
            "connecting": pool._connecting,
            "waiters": list(pool._waiters),
            "closed": pool.closed,
            "stats": {k: v for k, v in stats.items() if k not in COUNTERS_MOVED_BY_ANY_CALL},
            "other_used": dict(self.other._used),
            "open": [c.closed for c in [*pool._pool, *pool._used.values(), self.foreign]],
        }

    def all_work(self) -> None:
        for conn in [*self.pool._pool, *self.pool._used.values(), self.foreign, self.other_conn]:
            with conn.cursor() as cur:
                cur.execute("SELECT 1")
                assert cur.fetchone() == (1,)
            conn.rollback()


@pytest.fixture
def populated(dsn: str, app: str) -> Iterator[Populated]:
    pool = ThreadedConnectionPool(2, 4, dsn, application_name=app)
    other = ThreadedConnectionPool(0, 1, dsn, application_name=app)
    foreign = psycopg2.connect(dsn, application_name=app)
    try:
        yield Populated(pool, other, foreign)
    finally:
        foreign.close()
        for p in (pool, other):
            if not p.closed:
                p.closeall()


def _misuses() -> list[tuple[str, Callable[[Populated], Any], type[BaseException], str]]:
    unkeyed = "trying to put unkeyed connection"
    return [
        ("getconn-unhashable-key", lambda s: s.pool.getconn(["k"]), TypeError, "hashable"),
        ("getconn-dict-key", lambda s: s.pool.getconn({}), TypeError, "use a str, int or tuple"),
        ("getconn-timeout-negative", lambda s: s.pool.getconn(timeout=-1), ValueError, "-1"),
        ("getconn-timeout-str", lambda s: s.pool.getconn(timeout="1"), TypeError, "'1' (str)"),
        ("getconn-timeout-nan", lambda s: s.pool.getconn(timeout=math.nan), ValueError, "nan"),
        (
            "getconn-timeout-huge",
            lambda s: s.pool.getconn(timeout=1e10),
            ValueError,
            "timeout must be at most",
        ),
        (
            "getconn-timeout-bigint",
            lambda s: s.pool.getconn(timeout=10**400),
            ValueError,
            "timeout must be at most",
        ),
        ("putconn-foreign", lambda s: s.pool.putconn(s.foreign), PoolError, unkeyed),
        (
            "putconn-foreign-close",
            lambda s: s.pool.putconn(s.foreign, close=True),
            PoolError,
            unkeyed,
        ),
        ("putconn-other-pools", lambda s: s.pool.putconn(s.other_conn), PoolError, unkeyed),
        ("putconn-none", lambda s: s.pool.putconn(None), PoolError, unkeyed),
        ("putconn-nothing", lambda s: s.pool.putconn(), PoolError, unkeyed),
        ("putconn-not-a-connection", lambda s: s.pool.putconn("conn"), PoolError, unkeyed),
        ("putconn-idle", lambda s: s.pool.putconn(s.pool._pool[0]), PoolError, unkeyed),
        (
            "putconn-wrong-key",
            lambda s: s.pool.putconn(s.auto, key="k1"),
            PoolError,
            "not the one checked out under key 'k1'",
        ),
        (
            "putconn-unknown-key",
            lambda s: s.pool.putconn(s.keyed, key="k2"),
            PoolError,
            "no connection is checked out under key 'k2'",
        ),
        (
            "putconn-key-only-unknown",
            lambda s: s.pool.putconn(key="nope"),
            PoolError,
            "no connection is checked out under key 'nope'",
        ),
        ("putconn-unhashable-key", lambda s: s.pool.putconn(s.keyed, key=[1]), TypeError, "[1]"),
    ]


MISUSES = _misuses()


@pytest.mark.parametrize(
    ("misuse", "error", "message"), [m[1:] for m in MISUSES], ids=[m[0] for m in MISUSES]
)
def test_misuse_raises_clearly_and_changes_nothing(
    populated: Populated,
    pg_admin: Any,
    app: str,
    misuse: Callable[[Populated], Any],
    error: type[BaseException],
    message: str,
) -> None:
    before = populated.snapshot()
    sessions = backends(pg_admin, app)
    with pytest.raises(error) as info:
        misuse(populated)
    assert message in str(info.value)
    assert populated.snapshot() == before
    assert backends(pg_admin, app) == sessions
    populated.all_work()


def test_double_putconn_is_refused_and_leaves_one_idle_entry(populated: Populated) -> None:
    pool = populated.pool
    pool.putconn(populated.auto)  # idle list is full (minconn=2): this one is closed
    with pytest.raises(PoolError, match="trying to put unkeyed connection"):
        pool.putconn(populated.auto)
    conn = pool.getconn()
    pool.putconn(conn)  # kept: one idle slot was free
    before = populated.snapshot()
    with pytest.raises(PoolError, match="trying to put unkeyed connection"):
        pool.putconn(conn)
    assert populated.snapshot() == before
    assert sum(c is conn for c in pool._pool) == 1


def test_exhausted_without_timeout_raises_at_once_and_changes_nothing(
    populated: Populated,
) -> None:
    pool = populated.pool
    pool.getconn(), pool.getconn()  # all four out now
    before = populated.snapshot()
    with pytest.raises(PoolError, match=r"^connection pool exhausted$"):
        pool.getconn()
    assert populated.snapshot() == before


def test_too_many_waiters_changes_nothing_but_its_counter(dsn: str, app: str) -> None:
    pool = ThreadedConnectionPool(0, 1, dsn, application_name=app, timeout=30, max_waiting=1)
    try:
        held = pool.getconn()
        waiter = threading.Thread(target=lambda: pool.putconn(pool.getconn()), daemon=True)
        waiter.start()
        assert wait_until(lambda: pool.get_stats()["requests_waiting"] == 1)
        before = (list(pool._pool), dict(pool._used), list(pool._waiters), pool._connecting)
        with pytest.raises(
            TooManyWaiters, match=r"1 callers are already waiting \(max_waiting=1\)"
        ):
            pool.getconn()
        assert (list(pool._pool), dict(pool._used), list(pool._waiters), pool._connecting) == before
        assert pool.get_stats()["requests_errors"] == 1
        pool.putconn(held)
        waiter.join(30)
        assert not waiter.is_alive()
    finally:
        pool.closeall()


def test_simple_pool_getconn_has_no_timeout(dsn: str, app: str) -> None:
    pool = SimpleConnectionPool(1, 1, dsn, application_name=app)
    try:
        with pytest.raises(TypeError, match="timeout"):
            pool.getconn(timeout=1)  # type: ignore[call-arg]
        assert pool.get_stats()["pool_available"] == 1
    finally:
        pool.closeall()


# -- a closed pool ----------------------------------------------------------------------------


def test_closed_pool_refuses_everything_with_pool_is_closed(
    populated: Populated, pg_admin: Any, app: str
) -> None:
    pool = populated.pool
    held = [populated.auto, populated.keyed]
    pool.closeall()
    assert all(c.closed for c in held)
    calls: list[Callable[[], Any]] = [
        pool.getconn,
        lambda: pool.getconn("k1"),
        lambda: pool.putconn(populated.auto),  # psycopg2 raises here too
        lambda: pool.putconn(populated.foreign),
        pool.closeall,
    ]
    for call in calls:
        with pytest.raises(PoolError, match=r"^connection pool is closed$"):
            call()
    assert pool.closed and pool._connecting == 0
    assert all(c.closed for c in [*pool._pool, *pool._used.values()])
    assert pool.get_stats()["pool_max"] == 4  # statistics stay readable
    assert populated.foreign.closed == 0
    assert wait_backends(pg_admin, app, 2) == 2  # the foreign and the other pool's


def test_closed_pool_reports_no_connections(populated: Populated) -> None:
    pool = populated.pool
    pool.closeall()
    stats = pool.get_stats()
    assert (stats["pool_size"], stats["pool_available"], stats["checked_out"]) == (0, 0, 0)


# -- the persistent pool ----------------------------------------------------------------------


@pytest.fixture
def persistent(dsn: str, app: str) -> Iterator[Any]:
    pool = PersistentConnectionPool(1, 3, dsn, application_name=app)
    try:
        yield pool
    finally:
        if not pool.closed:
            pool.closeall()


def persistent_state(pool: Any) -> tuple[Any, ...]:
    return (list(pool._pool), dict(pool._used), pool._connecting, pool.closed)


def test_persistent_pool_misuse(persistent: Any, dsn: str) -> None:
    pool = persistent
    with pytest.raises(PoolError, match="this thread holds no connection from the pool"):
        pool.putconn()
    mine = pool.getconn()
    theirs: list[Any] = []
    other = threading.Thread(target=lambda: theirs.append(pool.getconn()))
    other.start()
    other.join(30)
    foreign = psycopg2.connect(dsn)
    try:
        before = persistent_state(pool)
        cases: list[tuple[Callable[[], Any], type[BaseException], str]] = [
            (lambda: pool.getconn("key"), TypeError, "positional argument"),
            (lambda: pool.putconn(mine, key=1), TypeError, "key"),
            (lambda: pool.putconn(foreign), PoolError, "a connection this thread does not hold"),
            (lambda: pool.putconn(theirs[0]), PoolError, "its own getconn() returned"),
        ]
        for call, error, message in cases:
            with pytest.raises(error, match=re.escape(message)):
                call()
            assert persistent_state(pool) == before
        assert pool.getconn() is mine  # still this thread's
        assert foreign.closed == 0 and theirs[0].closed == 0
    finally:
        foreign.close()
    pool.putconn(mine)
    pool.closeall()
    with pytest.raises(PoolError, match=r"^connection pool is closed$"):
        pool.getconn()
    with pytest.raises(PoolError, match=r"^connection pool is closed$"):
        pool.closeall()
