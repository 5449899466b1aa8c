"""end_transaction / roll_back_for_return on real connections: what is committed, what is kept."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import psycopg2
import pytest

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
