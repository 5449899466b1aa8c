"""pgctx.savepoint(): contain a failure inside the current unit of work."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import psycopg2
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import pgctx.pool
from pgctx.errors import NoActiveConnection, ScopeError, TransactionAborted
from pgctx.savepoint import savepoint
from tests.helpers import backend_pid, insert, rows, unique_app

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


class _FakeSqlstateError(psycopg2.OperationalError):
    """An error carrying a disconnect SQLSTATE although the connection is fine."""

    pgcode = "08006"


def _cursor_already_closed(conn: Any) -> None:
    cur = conn.cursor()
    cur.close()
    cur.execute("SELECT 1")  # psycopg2.InterfaceError: cursor already closed


def _raise(exc: BaseException) -> Callable[[Any], None]:
    def go(conn: Any) -> None:
        raise exc

    return go


# Ways to leave a savepoint with an error while the connection itself stays healthy:
# errors that only look like a disconnect (no SQLSTATE, or a class-08 one), and others.
HEALTHY_FAILURES: dict[str, Callable[[Any], None]] = {
    "cursor already closed": _cursor_already_closed,
    "InterfaceError()": _raise(psycopg2.InterfaceError("looks like a disconnect")),
    "OperationalError()": _raise(psycopg2.OperationalError("looks like a disconnect")),
    "SQLSTATE 08006, healthy": _raise(_FakeSqlstateError("says the socket failed")),
    "ValueError": _raise(ValueError("ordinary")),
    "KeyboardInterrupt": _raise(KeyboardInterrupt()),
}


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    failures=st.lists(st.sampled_from(sorted(HEALTHY_FAILURES)), min_size=1, max_size=4),
    depth=st.integers(min_value=1, max_value=3),
)
def test_an_error_that_only_looks_like_a_disconnect_still_rolls_back_to_the_savepoint(
    pool: Pool, pg_admin: Any, table: str, failures: list[str], depth: int
) -> None:
    """The savepoint's work is undone and the unit goes on, whatever the exception's type:
    only the connection's own state (or a failing ROLLBACK TO) may say it is broken."""
    with pg_admin.cursor() as cur:
        cur.execute(f"DELETE FROM {table}")
    with pool.connection() as conn:
        before = backend_pid(conn)
        insert(conn, table, 1)
        for n, name in enumerate(failures):
            base = 10 * (n + 1)
            with pytest.raises((Exception, KeyboardInterrupt)), contextlib.ExitStack() as stack:
                for level in range(depth):  # nested savepoints, all undone
                    stack.enter_context(savepoint(pool))
                    insert(conn, table, base + level)
                HEALTHY_FAILURES[name](conn)
        insert(conn, table, 2)
    assert rows(pg_admin, table) == [1, 2]  # none of the savepoints' rows were committed
    with pool.connection() as again:
        assert again is conn and backend_pid(again) == before  # kept: it was healthy
    assert len(pool._used) == 0


def test_a_savepoint_on_a_killed_connection_fails_the_unit(
    pool: Pool, pg_admin: Any, table: str
) -> None:
    """Really broken: ROLLBACK TO cannot run, so the unit is marked failed and the block
    discards the connection instead of committing anything."""
    with pytest.raises(TransactionAborted), pool.connection() as conn:
        insert(conn, table, 1)
        with pytest.raises(psycopg2.OperationalError), savepoint(pool):
            insert(conn, table, 2)
            with pg_admin.cursor() as cur:
                cur.execute("SELECT pg_terminate_backend(%s)", (backend_pid(conn),))
            insert(conn, table, 3)
    assert conn.closed
    assert rows(pg_admin, table) == []
    assert len(pool._used) == 0
