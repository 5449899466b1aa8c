"""end_transaction / roll_back_for_return on real connections: what is committed, what is kept."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import psycopg2
import pytest

import pgctx.pool
from pgctx.errors import TransactionAborted
from pgctx.transaction import add_note, end_transaction, roll_back_for_return, rollback

IDLE = psycopg2.extensions.TRANSACTION_STATUS_IDLE


@pytest.fixture
def conn(dsn: str) -> Iterator[Any]:
    connection = psycopg2.connect(dsn)
    with connection.cursor() as cur:
        cur.execute("CREATE TEMP TABLE t (x int)")
    connection.commit()
    yield connection
    connection.close()


def rows(conn: Any) -> int:
    with conn.cursor() as cur:
        cur.execute("SELECT count(*) FROM t")
        (count,) = cur.fetchone()
    conn.rollback()
    return int(count)


def insert(conn: Any) -> None:
    with conn.cursor() as cur:
        cur.execute("INSERT INTO t VALUES (1)")


def test_clean_exit_commits(conn: Any) -> None:
    insert(conn)
    assert end_transaction(conn, None) == (False, None)
    assert rows(conn) == 1


def test_idle_connection_needs_nothing(conn: Any) -> None:
    assert end_transaction(conn, None) == (False, None)
    assert conn.info.transaction_status == IDLE


def test_exception_rolls_back_and_keeps_the_connection(conn: Any) -> None:
    insert(conn)
    assert end_transaction(conn, ValueError("body failed")) == (False, None)
    assert rows(conn) == 0


def test_aborted_unit_rolls_back_and_says_so(conn: Any) -> None:
    insert(conn)
    cause = ValueError("inner block failed")
    discard, problem = end_transaction(conn, None, aborted=True, abort_cause=cause)
    assert not discard and isinstance(problem, TransactionAborted)
    assert problem.__cause__ is cause
    assert rows(conn) == 0


def test_failed_transaction_is_never_committed_silently(conn: Any) -> None:
    insert(conn)
    with pytest.raises(psycopg2.errors.DivisionByZero), conn.cursor() as cur:
        cur.execute("SELECT 1/0")  # caught by the caller, transaction now INERROR
    discard, problem = end_transaction(conn, None)
    assert not discard and isinstance(problem, TransactionAborted)
    assert rows(conn) == 0


def test_broken_connection_is_discarded(conn: Any, pg_server: Any) -> None:
    with conn.cursor() as cur:
        cur.execute("SELECT pg_backend_pid()")
        (pid,) = cur.fetchone()
    with pg_server.connect() as admin, admin.cursor() as cur:
        cur.execute("SELECT pg_terminate_backend(%s)", (pid,))
    with pytest.raises(psycopg2.OperationalError) as info, conn.cursor() as cur:
        cur.execute("SELECT 1")
    assert end_transaction(conn, info.value) == (True, None)
    discard, problem = end_transaction(conn, None)
    assert discard and isinstance(problem, TransactionAborted)


def test_close_on_error_discards_without_a_round_trip(conn: Any) -> None:
    insert(conn)
    assert end_transaction(conn, ValueError(), close_on_error=True) == (True, None)


def test_begin_on_an_autocommit_connection_is_rolled_back(conn: Any) -> None:
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute("BEGIN")
        cur.execute("INSERT INTO t VALUES (1)")
    discard, problem = end_transaction(conn, None)
    assert not discard and isinstance(problem, TransactionAborted)
    assert rows(conn) == 0


def test_rollback_works_after_a_manual_begin_in_autocommit(conn: Any) -> None:
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute("BEGIN")
    rollback(conn)
    assert conn.info.transaction_status == IDLE
    assert roll_back_for_return(conn, None) == (False, None)


def test_add_note_keeps_the_original_exception() -> None:
    exc = ValueError("body")
    add_note(exc, RuntimeError("rollback failed"))
    assert str(exc) == "body"
    assert any("rollback failed" in note for note in getattr(exc, "__notes__", ["rollback failed"]))


class _FakeSqlstateError(psycopg2.OperationalError):
    pgcode = "08006"  # a disconnect SQLSTATE on an exception from a healthy connection


def _cursor_already_closed(conn: Any) -> BaseException:
    cur = conn.cursor()
    cur.close()
    try:
        cur.execute("SELECT 1")
    except psycopg2.InterfaceError as exc:
        return exc
    raise AssertionError("psycopg2 ran a query on a closed cursor")


@pytest.mark.parametrize(
    "make_error",
    [
        _cursor_already_closed,
        lambda conn: psycopg2.InterfaceError("no SQLSTATE"),
        lambda conn: psycopg2.OperationalError("no SQLSTATE"),
        lambda conn: _FakeSqlstateError("class 08"),
    ],
    ids=["cursor already closed", "InterfaceError", "OperationalError", "SQLSTATE 08006"],
)
def test_an_error_that_only_looks_like_a_disconnect_keeps_a_healthy_connection(
    conn: Any, make_error: Any
) -> None:
    """The exception's type decides nothing: the connection is rolled back and kept."""
    insert(conn)
    exc = make_error(conn)
    assert end_transaction(conn, exc) == (False, None)
    assert not conn.closed and conn.info.transaction_status == IDLE
    assert rows(conn) == 0  # rolled back, not left open


def test_a_rollback_that_fails_discards_whatever_the_error_was(conn: Any, pg_server: Any) -> None:
    insert(conn)
    with conn.cursor() as cur:
        cur.execute("SELECT pg_backend_pid()")
        (pid,) = cur.fetchone()
    with pg_server.connect() as admin, admin.cursor() as cur:
        cur.execute("SELECT pg_terminate_backend(%s)", (pid,))
    # psycopg2 has not noticed yet (nothing was sent since): the status still says
    # INTRANS, so only the failing ROLLBACK can tell; the error type is ordinary.
    assert not conn.closed
    discard, problem = roll_back_for_return(conn, ValueError("ordinary"))
    assert discard and isinstance(problem, psycopg2.OperationalError)


def test_a_block_left_by_such_an_error_returns_its_connection_to_the_pool(dsn: str) -> None:
    pool = pgctx.pool.ThreadedConnectionPool(1, 1, dsn)
    try:
        for make_error in (_cursor_already_closed, lambda c: _FakeSqlstateError("08")):
            with pytest.raises(psycopg2.Error), pool.connection() as conn:
                with conn.cursor() as cur:
                    cur.execute("SELECT 1")  # a transaction is open
                raise make_error(conn)
            assert not conn.closed  # rolled back and returned, not discarded
            with pool.connection() as again:
                assert again is conn
    finally:
        pool.closeall()
