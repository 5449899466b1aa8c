"""pgctx.savepoint(): contain a failure inside the current unit of work."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import psycopg2
import pytest

import pgctx.pool
from pgctx.errors import NoActiveConnection, ScopeError, TransactionAborted
from pgctx.savepoint import savepoint
from tests.helpers import insert, rows, unique_app

Pool = pgctx.pool.ThreadedConnectionPool


@pytest.fixture
def pool(dsn: str) -> Iterator[Pool]:
    p = Pool(1, 2, dsn, application_name=unique_app("savepoint"))
    yield p
    if not p.closed:
        p.closeall()


def test_caught_error_inside_a_savepoint_does_not_abort_the_unit(
    pool: Pool, pg_admin: Any, table: str
) -> None:
    with pool.connection() as conn:
        insert(conn, table, 1)
        with pytest.raises(psycopg2.errors.UniqueViolation), savepoint(pool):
            insert(conn, table, 2)
            insert(conn, table, 1)
        insert(conn, table, 3)  # the transaction is usable again
    assert rows(pg_admin, table) == [1, 3]  # 2 was rolled back with its savepoint
    assert len(pool._used) == 0


def test_failed_nested_block_inside_a_savepoint(pool: Pool, pg_admin: Any, table: str) -> None:
    with pool.connection() as conn:
        insert(conn, table, 1)
        try:
            with savepoint(pool), pool.connection() as inner:
                insert(inner, table, 2)
                raise ValueError("inner block failed")
        except ValueError:
            pass
        insert(conn, table, 3)
    assert rows(pg_admin, table) == [1, 3]


def test_successful_savepoint_is_released_and_committed(
    pool: Pool, pg_admin: Any, table: str
) -> None:
    with pool.connection() as conn:
        with savepoint(pool) as same:
            assert same is conn
            insert(conn, table, 1)
            with savepoint(pool):  # nested savepoints get their own names
                insert(conn, table, 2)
        insert(conn, table, 3)
    assert rows(pg_admin, table) == [1, 2, 3]


def test_error_swallowed_inside_the_savepoint_is_not_silently_lost(
    pool: Pool, pg_admin: Any, table: str
) -> None:
    with pool.connection() as conn:
        insert(conn, table, 1)
        with pytest.raises(TransactionAborted, match="savepoint"), savepoint(pool):
            insert(conn, table, 2)
            with contextlib.suppress(psycopg2.errors.UniqueViolation):
                insert(conn, table, 1)
        insert(conn, table, 4)
    assert rows(pg_admin, table) == [1, 4]


def test_savepoint_does_not_clear_an_earlier_failure(pool: Pool, pg_admin: Any, table: str) -> None:
    with pytest.raises(TransactionAborted), pool.connection() as conn:
        try:
            with pool.connection():
                raise ValueError("before the savepoint")
        except ValueError:
            pass
        with pytest.raises(KeyError), savepoint(pool):
            raise KeyError("inside")
        insert(conn, table, 1)
    assert rows(pg_admin, table) == []


def test_savepoint_misuse(pool: Pool, dsn: str) -> None:
    with pytest.raises(NoActiveConnection, match=r"pool\.connection"), savepoint(pool):
        pass
    with pool.connection() as conn:
        conn.autocommit = True
        with pytest.raises(ScopeError, match="autocommit"), savepoint(pool):
            pass
        conn.autocommit = False
    assert len(pool._used) == 0
