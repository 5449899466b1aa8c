"""Session state left behind by one borrower, seen by the next (scenario 34 of the catalogue).

Each test uses a one-connection pool, so the second borrower gets the very same server
session as the first (the backend pid proves it). With ``reset=pgctx.health.reset_session``
nothing the first borrower did is visible any more; without a reset the pool only rolls
back, as psycopg2.pool does, and all of it leaks.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import psycopg2
import psycopg2.errors
import psycopg2.extensions
import pytest

from pgctx.health import reset_session
from pgctx.pool import ThreadedConnectionPool
from tests.helpers import unique_app

LOCK_KEY = 0x5E55_1011  # an advisory lock key no other test uses


@pytest.fixture
def app() -> str:
    return unique_app("session")


@pytest.fixture
def one_conn_pool(dsn: str, app: str, request: pytest.FixtureRequest) -> Iterator[Any]:
    """A pool of exactly one connection; ``reset`` from the test's ``reset`` parameter."""
    reset = getattr(request, "param", None)
    pool = ThreadedConnectionPool(1, 1, dsn, application_name=app, reset=reset)
    try:
        yield pool
    finally:
        pool.closeall()


def observe(conn: Any) -> dict[str, Any]:
    """The session state a borrower could see, read without changing it."""
    with conn.cursor() as cur:
        cur.execute(
            """
            SELECT pg_backend_pid(),
                   current_user,
                   current_setting('search_path'),
                   current_setting('work_mem'),
                   coalesce(current_setting('pgctx.tenant', true), ''),
                   to_regclass('pg_temp.pgctx_leak') IS NOT NULL,
                   (SELECT count(*) FROM pg_prepared_statements),
                   (SELECT count(*) FROM pg_locks
                     WHERE locktype = 'advisory' AND pid = pg_backend_pid()),
                   (SELECT count(*) FROM pg_listening_channels()),
                   (SELECT count(*) FROM pg_cursors)
            """
        )
        row = cur.fetchone()
    conn.rollback()
    names = [
        "pid",
        "role",
        "search_path",
        "work_mem",
        "custom_guc",
        "temp_table",
        "prepared_statements",
        "advisory_locks",
        "listen",
        "cursors",
    ]
    return dict(zip(names, row, strict=True))


def dirty(conn: Any, end: str) -> None:
    """Leave every kind of session state behind, then end as ``end`` says."""
    with conn.cursor() as cur:
        cur.execute("SET search_path TO pgctx_elsewhere, public")
        cur.execute("SET work_mem = '7777kB'")
        cur.execute("SELECT set_config('pgctx.tenant', 'tenant-a', false)")
        cur.execute("CREATE TEMP TABLE pgctx_leak (secret text)")
        cur.execute("INSERT INTO pgctx_leak VALUES ('tenant-a data')")
        cur.execute("PREPARE pgctx_stmt AS SELECT secret FROM pgctx_leak")
        cur.execute("SELECT pg_advisory_lock(%s)", (LOCK_KEY,))
        cur.execute("LISTEN pgctx_channel")
        cur.execute("DECLARE pgctx_cursor CURSOR WITH HOLD FOR SELECT 1")
        cur.execute("SET ROLE pg_monitor")  # last: the role may not do the above
        if end == "commit":
            conn.commit()
        elif end == "error":
            with pytest.raises(psycopg2.errors.DivisionByZero):
                cur.execute("SELECT 1/0")
        # "open": the transaction is left open


ALL_DIRTY = {
    "role": "pg_monitor",
    "search_path": "pgctx_elsewhere, public",
    "work_mem": "7777kB",
    "custom_guc": "tenant-a",
    "temp_table": True,
    "prepared_statements": 1,
    "advisory_locks": 1,
    "listen": 1,
    "cursors": 1,
}


@pytest.mark.parametrize("one_conn_pool", [reset_session], indirect=True, ids=["reset"])
@pytest.mark.parametrize("end", ["commit", "open", "error"])
def test_reset_session_leaves_nothing_for_the_next_borrower(one_conn_pool: Any, end: str) -> None:
    pool = one_conn_pool
    conn = pool.getconn()
    clean = observe(conn)
    dirty(conn, end)
    pool.putconn(conn)

    again = pool.getconn()
    seen = observe(again)
    assert seen["pid"] == clean["pid"]  # the same session, reused rather than replaced
    assert seen == clean
    pool.putconn(again)
    stats = pool.get_stats()
    assert stats["connections_num"] == 1
    assert stats["returns_bad"] == stats["connections_discarded"] == 0


@pytest.mark.parametrize("one_conn_pool", [reset_session], indirect=True, ids=["reset"])
def test_reset_session_releases_the_advisory_lock_for_other_sessions(
    one_conn_pool: Any, dsn: str
) -> None:
    pool = one_conn_pool
    conn = pool.getconn()
    dirty(conn, "commit")
    other = psycopg2.connect(dsn, application_name=unique_app("session-other"))
    try:
        with other.cursor() as cur:
            cur.execute("SELECT pg_try_advisory_lock(%s)", (LOCK_KEY,))
            assert cur.fetchone() == (False,)  # held by the borrower
            pool.putconn(conn)
            cur.execute("SELECT pg_try_advisory_lock(%s)", (LOCK_KEY,))
            assert cur.fetchone() == (True,)  # released by the reset on return
            cur.execute("SELECT pg_advisory_unlock(%s)", (LOCK_KEY,))
    finally:
        other.close()


def test_without_reset_committed_session_state_leaks(one_conn_pool: Any) -> None:
    """The psycopg2-compatible default: a rollback on return, nothing more."""
    pool = one_conn_pool
    conn = pool.getconn()
    clean = observe(conn)
    dirty(conn, "commit")
    pool.putconn(conn)

    again = pool.getconn()
    seen = observe(again)
    assert seen["pid"] == clean["pid"]
    assert {name: seen[name] for name in ALL_DIRTY} == ALL_DIRTY  # every item leaked
    with again.cursor() as cur:
        cur.execute("RESET ROLE")  # SET ROLE is no isolation boundary: anyone can undo it
        cur.execute("SELECT current_user")
        assert cur.fetchone() == ("postgres",)
        cur.execute("EXECUTE pgctx_stmt")  # the next borrower reads the first one's data
        assert cur.fetchone() == ("tenant-a data",)
    again.rollback()
    pool.putconn(again, close=True)


def test_without_reset_a_rolled_back_transaction_still_leaks_session_level_state(
    one_conn_pool: Any,
) -> None:
    """The rollback on return undoes SET, temp tables and LISTEN, but not these."""
    pool = one_conn_pool
    conn = pool.getconn()
    clean = observe(conn)
    dirty(conn, "open")
    pool.putconn(conn)  # rolled back

    seen = observe(pool.getconn())
    assert seen["pid"] == clean["pid"]
    undone = ["role", "search_path", "work_mem", "custom_guc", "temp_table", "listen", "cursors"]
    assert {name: seen[name] for name in undone} == {name: clean[name] for name in undone}
    assert seen["prepared_statements"] == 1  # PREPARE is not transactional
    assert seen["advisory_locks"] == 1  # session-level advisory locks outlive the rollback


@pytest.mark.parametrize("one_conn_pool", [reset_session], indirect=True, ids=["reset"])
def test_client_side_attributes_survive_the_reset(one_conn_pool: Any) -> None:
    """psycopg2-compatible, and documented: ``autocommit``, ``readonly``,
    ``isolation_level`` and ``deferrable`` are attributes of the Python connection object
    that no reset restores; the borrower that changes them must restore them.
    """
    pool = one_conn_pool
    serializable = psycopg2.extensions.ISOLATION_LEVEL_SERIALIZABLE
    conn = pool.getconn()
    conn.set_session(isolation_level=serializable, readonly=True, deferrable=True)
    conn.autocommit = True
    pool.putconn(conn)

    again = pool.getconn()
    assert again is conn
    assert again.autocommit is True and again.readonly is True
    assert again.isolation_level == serializable and again.deferrable is True
    again.autocommit = False
    with pytest.raises(psycopg2.errors.ReadOnlySqlTransaction), again.cursor() as cur:
        cur.execute("CREATE TEMP TABLE pgctx_ro (x int)")  # BEGIN READ ONLY, client-side
    again.rollback()
    again.set_session(isolation_level="DEFAULT", readonly="DEFAULT", deferrable="DEFAULT")
    pool.putconn(again)
