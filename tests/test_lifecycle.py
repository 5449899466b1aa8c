"""The opt-in connection policies against a real server: check, recycle, reset, configure, leaks."""

from __future__ import annotations

import functools
import logging
import threading
from typing import Any

import psycopg2
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pgctx.health import check_connection, reset_session
from pgctx.pool import ThreadedConnectionPool
from tests import helpers
from tests.helpers import unique_app, wait_backends, wait_until


@pytest.fixture
def app() -> str:
    return unique_app("lifecycle")


def make(dsn: str, app: str, minconn: int = 0, maxconn: int = 2, **options: Any) -> Any:
    return ThreadedConnectionPool(minconn, maxconn, dsn, application_name=app, **options)


def backend_pid(conn: Any) -> int:
    pid = helpers.backend_pid(conn)
    conn.rollback()
    return pid


# -- check ------------------------------------------------------------------------------


def test_check_discards_a_dead_idle_connection_and_hands_out_a_live_one(
    dsn: str, app: str, pg_server: Any
) -> None:
    pool = make(dsn, app, 2, 2, check=check_connection, timeout=10)
    try:
        first, second = pool.getconn(), pool.getconn()
        pool.putconn(second)
        pool.putconn(first)  # LIFO: `first` comes out next
        assert pg_server.terminate_backends(application_name=app) == 2
        conn = pool.getconn()
        assert conn is not first and conn is not second  # both failed their check
        assert backend_pid(conn) > 0
        stats = pool.get_stats()
        assert stats["connections_lost"] == 2
        assert stats["pool_size"] == 1
    finally:
        pool.closeall()


def test_without_check_a_dead_idle_connection_is_handed_out(
    dsn: str, app: str, pg_server: Any
) -> None:
    """The psycopg2-compatible default: no round trip on checkout."""
    pool = make(dsn, app, 1, 1)
    try:
        conn = pool.getconn()
        pool.putconn(conn)
        pg_server.terminate_backends(application_name=app)
        assert pool.getconn() is conn
        with pytest.raises(psycopg2.OperationalError):
            backend_pid(conn)
    finally:
        pool.closeall()


def test_check_leaves_the_transaction_state_as_it_was(dsn: str) -> None:
    conn = psycopg2.connect(dsn)
    try:
        check_connection(conn)
        assert conn.info.transaction_status == psycopg2.extensions.TRANSACTION_STATUS_IDLE
        assert conn.autocommit is False
        with conn.cursor() as cur:
            cur.execute("SELECT 1")
        check_connection(conn)
        assert conn.info.transaction_status == psycopg2.extensions.TRANSACTION_STATUS_INTRANS
    finally:
        conn.close()
    with pytest.raises(psycopg2.InterfaceError):
        check_connection(conn)


def test_check_after_idle_skips_recently_used_connections(dsn: str, app: str) -> None:
    calls: list[int] = []

    def counting_check(conn: Any) -> None:
        calls.append(1)
        check_connection(conn)

    pool = make(dsn, app, 1, 1, check=counting_check, check_after_idle=3600)
    try:
        for _ in range(5):
            pool.putconn(pool.getconn())
        assert calls == []  # used moments ago: trusted
        pool._life.check_after_idle = 0.0  # now every idle connection is old enough
        pool.putconn(pool.getconn())
        assert calls == [1]
    finally:
        pool.closeall()


# -- lifetimes and idle recycling --------------------------------------------------------


def test_max_lifetime_recycles_at_checkout_and_on_return(dsn: str, app: str) -> None:
    pool = make(dsn, app, 1, 2, max_lifetime=3600)
    try:
        old = pool.getconn()
        pool.putconn(old)
        pool._life.info[id(old)].expires = 0  # it has now outlived its lifetime
        fresh = pool.getconn()
        assert fresh is not old and old.closed
        pool._life.info[id(fresh)].expires = 0
        pool.putconn(fresh)  # expired while borrowed: closed on return, not kept
        assert fresh.closed and pool._pool == []
        assert pool.get_stats()["connections_recycled"] == 2
    finally:
        pool.closeall()


def test_lifetimes_are_jittered(dsn: str, app: str) -> None:
    pool = make(dsn, app, 4, 4, max_lifetime=1000)
    try:
        expiries = {info.expires for info in pool._life.info.values()}
        assert len(expiries) == 4
        created = min(info.idle_since for info in pool._life.info.values())
        assert all(created + 890 <= e <= created + 1001 for e in expiries)
    finally:
        pool.closeall()


def test_max_idle_keeps_up_to_maxconn_then_closes_idle_ones_down_to_minconn(
    dsn: str, app: str, pg_admin: Any
) -> None:
    pool = make(dsn, app, 1, 4, max_idle=0.3)
    try:
        conns = [pool.getconn() for _ in range(4)]
        for conn in conns:
            pool.putconn(conn)
        assert len(pool._pool) == 4  # psycopg2 would keep only minconn=1
        assert not any(conn.closed for conn in conns)
        # the maintenance thread closes those idle longer than max_idle, never below minconn
        assert wait_until(lambda: len(pool._pool) == 1)
        # they are closed just after leaving the idle list (outside the pool's lock)
        assert wait_until(lambda: sum(1 for conn in conns if conn.closed) == 3)
        assert wait_backends(pg_admin, app, 1) == 1
        assert pool.get_stats()["connections_recycled"] == 3
    finally:
        pool.closeall()


# -- reset and configure ------------------------------------------------------------------


def test_reset_discards_session_state_between_borrowers(dsn: str, app: str) -> None:
    pool = make(dsn, app, 1, 1, reset=reset_session)
    try:
        conn = pool.getconn()
        with conn.cursor() as cur:
            cur.execute("SET search_path TO pg_catalog")
            cur.execute("CREATE TEMP TABLE scratch (x int)")
            cur.execute("PREPARE stmt AS SELECT 1")
        conn.commit()
        pool.putconn(conn)
        again = pool.getconn()
        assert again is conn
        with again.cursor() as cur:
            cur.execute("SHOW search_path")
            assert cur.fetchone() != ("pg_catalog",)
            cur.execute("SELECT to_regclass('pg_temp.scratch') IS NULL")
            assert cur.fetchone() == (True,)
            cur.execute("SELECT count(*) FROM pg_prepared_statements")
            assert cur.fetchone() == (0,)
        again.rollback()
    finally:
        pool.closeall()


def test_a_failing_reset_discards_the_connection(dsn: str, app: str) -> None:
    def broken_reset(conn: Any) -> None:
        raise psycopg2.OperationalError("reset failed")

    pool = make(dsn, app, 1, 1, reset=broken_reset)
    try:
        conn = pool.getconn()
        pool.putconn(conn)
        assert conn.closed and pool._pool == [] and pool._used == {}
        assert pool.get_stats()["returns_bad"] == 1
        assert pool.getconn() is not conn  # the slot was freed
    finally:
        pool.closeall()


def test_configure_runs_once_per_new_connection(dsn: str, app: str) -> None:
    configured: list[int] = []

    def configure(conn: Any) -> None:
        conn.autocommit = True
        configured.append(backend_pid(conn))

    pool = make(dsn, app, 1, 2, configure=configure)
    try:
        a = pool.getconn()
        b = pool.getconn()
        pool.putconn(a)
        pool.putconn(pool.getconn())
        assert a.autocommit and b.autocommit
        assert sorted(configured) == sorted({backend_pid(a), backend_pid(b)})
    finally:
        pool.closeall()


def test_a_failing_configure_discards_the_connection_and_raises(
    dsn: str, app: str, pg_admin: Any
) -> None:
    def configure(conn: Any) -> None:
        raise RuntimeError("cannot configure")

    pool = make(dsn, app, 0, 1, configure=configure)
    try:
        with pytest.raises(RuntimeError, match="cannot configure"):
            pool.getconn()
        assert pool._used == {} and pool._connecting == 0
        assert wait_backends(pg_admin, app, 0) == 0
        assert pool.get_stats()["connections_errors"] == 1
    finally:
        pool.closeall()


# -- a bug in a hook callable is not a failing connection ---------------------------------

BUGS = st.sampled_from([NameError, TypeError, AttributeError, KeyError, ValueError, RuntimeError])


def pgctx_notes(exc: BaseException) -> list[str]:
    return [n for n in getattr(exc, "__notes__", []) if n.startswith("pgctx:")]


@settings(
    max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(bug=BUGS, waiting=st.booleans())
def test_a_bug_in_check_is_raised_and_the_connection_put_back(
    dsn: str, pg_admin: Any, bug: type[Exception], waiting: bool
) -> None:
    """Before, a typo in the check (a NameError) counted as a failed check: every
    checkout discarded a healthy connection and reconnected, logged at INFO only."""
    app = unique_app("lifecycle")

    def buggy_check(conn: Any) -> None:
        check_connection(conn)  # the connection is fine; the callable is not
        raise bug("a bug in the check")

    pool = make(dsn, app, 1, 1, check=buggy_check, **({"timeout": 10} if waiting else {}))
    try:
        idle = pool._pool[0]
        before = pool.get_stats()
        with pytest.raises(bug) as info:
            pool.getconn()
        assert any("pool's check callable" in n for n in pgctx_notes(info.value))
        assert pool._pool == [idle] and not idle.closed and pool._used == {}
        stats = pool.get_stats()
        assert stats["connections_lost"] == before["connections_lost"] == 0
        assert stats["connections_num"] == before["connections_num"]  # no reconnect
        assert wait_backends(pg_admin, app, 1) == 1
    finally:
        pool.closeall()


def test_a_check_that_breaks_the_connection_fails_it_whatever_it_raises(dsn: str, app: str) -> None:
    def closing_check(conn: Any) -> None:
        conn.close()
        raise RuntimeError("gave up on it")

    calls: list[int] = []

    def check(conn: Any) -> None:
        calls.append(1)
        if len(calls) == 1:
            closing_check(conn)

    pool = make(dsn, app, 1, 1, check=check)
    try:
        first = pool._pool[0]
        conn = pool.getconn()  # the first failed its check; a new one was opened
        assert conn is not first and first.closed
        assert pool.get_stats()["connections_lost"] == 1
        pool.putconn(conn)
    finally:
        pool.closeall()


@pytest.mark.parametrize("bug", [NameError, TypeError, AttributeError])
def test_a_bug_in_reset_is_raised_and_the_connection_closed(
    dsn: str, app: str, pg_admin: Any, bug: type[Exception]
) -> None:
    """A reset that did not run leaves session state: the connection is closed, its slot
    freed, and the bug reaches the caller of putconn (before: a WARNING, every return)."""

    def buggy_reset(conn: Any) -> None:
        raise bug("a bug in the reset")

    pool = make(dsn, app, 1, 1, reset=buggy_reset)
    try:
        conn = pool.getconn()
        with pytest.raises(bug) as info:
            pool.putconn(conn)
        assert any("pool's reset callable" in n for n in pgctx_notes(info.value))
        assert conn.closed and pool._used == {} and pool._connecting == 0
        assert pool.get_stats()["returns_bad"] == 1
        assert wait_backends(pg_admin, app, 0) == 0
        assert pool.getconn() is not conn  # the slot was freed
    finally:
        pool.closeall()


def test_a_bug_in_configure_is_raised_with_a_note_and_logged_as_an_error_by_the_refill(
    dsn: str, app: str, pg_admin: Any, caplog: Any
) -> None:
    broken = [False]

    def configure(conn: Any) -> None:
        if broken[0]:
            conn.autocommitt = True  # a typo: AttributeError

    pool = make(dsn, app, 1, 2, configure=configure, max_idle=0.2, timeout=5)
    try:
        broken[0] = True
        held = pool.getconn()
        with pytest.raises(AttributeError) as info:
            pool.getconn()  # needs a new connection
        assert any("pool's configure callable" in n for n in pgctx_notes(info.value))
        assert pool._connecting == 0 and wait_backends(pg_admin, app, 1) == 1
        caplog.set_level(logging.INFO, logger="pgctx")
        pool.putconn(held, close=True)  # the maintenance thread refills to minconn=1
        assert wait_until(lambda: any(r.pgctx_event == "refill_failed" for r in caplog.records))
        record = next(r for r in caplog.records if r.pgctx_event == "refill_failed")
        assert record.levelno == logging.ERROR  # a bug, not a server that is down
        broken[0] = False
        assert wait_until(lambda: len(pool._pool) == 1)
    finally:
        pool.closeall()
    with pytest.raises(AttributeError) as info:
        make(dsn, app, 1, 1, configure=lambda conn: conn.autocommitt)
    assert any("pool's configure callable" in n for n in pgctx_notes(info.value))
    assert wait_backends(pg_admin, app, 0) == 0


# -- leak reports --------------------------------------------------------------------------


def test_leak_is_reported_with_the_takers_stack_and_again_on_return(
    dsn: str, app: str, caplog: Any
) -> None:
    caplog.set_level(logging.INFO, logger="pgctx")
    pool = make(dsn, app, 0, 2, leak_timeout=0.2)
    try:

        def code_that_forgets_its_connection() -> Any:
            return pool.getconn()

        conn = code_that_forgets_its_connection()
        assert wait_until(lambda: pool.get_stats()["leaks_reported"] == 1)
        report = next(r for r in caplog.records if "not returned yet" in r.getMessage())
        assert report.levelno == logging.WARNING
        assert "code_that_forgets_its_connection" in report.getMessage()
        assert "pgctx/basepool.py" not in report.getMessage()
        pool.putconn(conn)
        assert any("came back after" in r.getMessage() for r in caplog.records)
        assert pool.get_stats()["leaks_reported"] == 1  # reported once, not every tick
    finally:
        pool.closeall()


def test_leak_tracking_holds_no_reference_to_the_connection(dsn: str, app: str) -> None:
    pool = make(dsn, app, 0, 1, leak_timeout=60)
    try:
        conn = pool.getconn()
        info = pool._life.info[id(conn)]
        assert all(
            not isinstance(v, psycopg2.extensions.connection)
            for v in (info.expires, info.idle_since, info.taken_at, info.reported)
        )
        assert info.taken_from and all(isinstance(f.filename, str) for f in info.taken_from)
        pool.putconn(conn)
    finally:
        pool.closeall()


# -- bad options ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "error", "text"),
    [
        ({"check": "SELECT 1"}, TypeError, "check must be a callable"),
        ({"reset": 1}, TypeError, "reset must be a callable"),
        ({"configure": object()}, TypeError, "configure must be a callable"),
        ({"max_lifetime": 0}, ValueError, "max_lifetime must be > 0"),
        ({"max_idle": -1}, ValueError, "max_idle must be a finite number"),
        ({"leak_timeout": "5"}, TypeError, "leak_timeout must be a number"),
        ({"check_after_idle": 5}, ValueError, "check_after_idle has no effect without check"),
        ({"check": lambda: None}, TypeError, "check must accept the connection as its one"),
        ({"check": lambda conn, extra: None}, TypeError, r"signature \(conn, extra\)"),
        ({"reset": lambda *, conn: None}, TypeError, "reset must accept the connection"),
        ({"configure": dict.get}, TypeError, "configure must accept the connection"),
    ],
)
def test_bad_policy_options_are_refused_before_connecting(
    dsn: str, app: str, pg_admin: Any, options: Any, error: Any, text: str
) -> None:
    with pytest.raises(error, match=text):
        make(dsn, app, 1, 1, **options)
    assert wait_backends(pg_admin, app, 0) == 0


def test_policies_under_thread_stress(dsn: str, app: str, pg_admin: Any) -> None:
    pool = make(
        dsn,
        app,
        1,
        3,
        timeout=20,
        check=check_connection,
        reset=reset_session,
        max_lifetime=0.2,
        max_idle=0.1,
        leak_timeout=30,
    )
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            for _ in range(15):
                conn = pool.getconn()
                backend_pid(conn)
                pool.putconn(conn)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert errors == [] and not any(t.is_alive() for t in threads)
    assert pool._used == {} and pool._connecting == 0
    assert len(pool._life.info) == len(pool._pool)  # no bookkeeping for closed connections
    pool.closeall()
    assert wait_backends(pg_admin, app, 0) == 0


def test_log_records_carry_event_and_pool_fields(dsn: str, app: str, caplog: Any) -> None:
    def broken_reset(conn: Any) -> None:
        raise psycopg2.OperationalError("reset failed")

    caplog.set_level(logging.INFO, logger="pgctx")
    pool = make(dsn + " password=s3cret", app, 1, 1, reset=broken_reset)
    try:
        pool.putconn(pool.getconn())
        record = next(r for r in caplog.records if "reset failed" in r.getMessage())
        assert record.pgctx_event == "reset_failed"  # type: ignore[attr-defined]
        label = record.pgctx_pool  # type: ignore[attr-defined]
        assert "ThreadedConnectionPool" in label and app in label and "s3cret" not in label
    finally:
        pool.closeall()


@pytest.mark.parametrize(
    "hook",
    [
        lambda conn: None,
        lambda *args: None,
        lambda conn, *, retries=3: None,
        functools.partial(lambda label, conn: None, "label"),
        print,  # a builtin whose signature may not be inspectable: accepted
        type("Callable", (), {"__call__": lambda self, conn: None})(),
    ],
)
def test_hooks_that_accept_one_positional_argument_are_accepted(
    dsn: str, app: str, hook: Any
) -> None:
    make(dsn, app, 0, 1, check=hook, reset=hook, configure=hook).closeall()
