"""pool.scope(): lazy, one connection per key reused by its blocks, everything put away."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import pytest

from pgctx.errors import ScopeError
from pgctx.pool import ThreadedConnectionPool
from tests.helpers import unique_app, wait_backends


@pytest.fixture
def pool(dsn: str) -> Iterator[Any]:
    pool = ThreadedConnectionPool(0, 4, dsn, application_name=unique_app("rscope"), timeout=10)
    yield pool
    pool.closeall()


def test_nothing_is_checked_out_until_first_use(pool: Any, pg_admin: Any) -> None:
    app = pool._kwargs["application_name"]
    with pool.scope():
        assert pool.get_stats()["checked_out"] == 0
        assert wait_backends(pg_admin, app, 0) == 0
    assert pool.get_stats()["requests_num"] == 0


def test_blocks_of_a_scope_share_its_connection_but_commit_on_their_own(pool: Any) -> None:
    with pool.connection() as conn, conn.cursor() as cur:
        cur.execute("CREATE TABLE IF NOT EXISTS rscope_t (x int)")
        cur.execute("TRUNCATE rscope_t")
    with pool.scope():
        with pool.connection() as first, first.cursor() as cur:
            cur.execute("INSERT INTO rscope_t VALUES (1)")
        assert pool.get_stats()["checked_out"] == 1  # kept by the scope between blocks
        with pytest.raises(ValueError), pool.connection() as second:
            with second.cursor() as cur:
                cur.execute("INSERT INTO rscope_t VALUES (2)")
            raise ValueError
        assert second is first
    assert pool.get_stats()["checked_out"] == 0
    with pool.connection() as conn, conn.cursor() as cur:
        cur.execute("SELECT array_agg(x) FROM rscope_t")
        assert cur.fetchone() == ([1],)  # the first block committed, the second rolled back
        cur.execute("DROP TABLE rscope_t")


def test_each_key_gets_its_own_connection(pool: Any) -> None:
    with pool.scope():
        with pool.connection("a") as a, pool.connection("b") as b:
            assert a is not b
        assert pool.get_stats()["checked_out"] == 2
    assert pool.get_stats()["checked_out"] == 0


def test_a_nested_scope_joins_the_outer_one(pool: Any) -> None:
    with pool.scope():
        with pool.connection() as outer_conn:
            pass
        with pool.scope(), pool.connection() as inner_conn:
            assert inner_conn is outer_conn
        assert pool.get_stats()["checked_out"] == 1  # the inner scope's end kept it
    assert pool.get_stats()["checked_out"] == 0


def test_a_busy_scope_connection_is_not_shared_with_another_thread(pool: Any) -> None:
    with pool.scope():
        seen: list[Any] = []
        with pool.connection() as mine:
            # a thread started inside the scope, while this block holds the connection
            thread = threading.Thread(
                target=lambda: seen.append(_in_block(pool)),
            )
            thread.start()
            thread.join(30)
        assert seen and seen[0] is not mine
    assert pool.get_stats()["checked_out"] == 0


def _in_block(pool: Any) -> Any:
    with pool.connection(separate=True) as conn:
        return conn


def test_a_scope_is_entered_once(pool: Any) -> None:
    scope = pool.scope()
    with scope, pytest.raises(ScopeError, match="entered only once"), scope:
        pass
    with pytest.raises(ScopeError, match="without being entered"):
        pool.scope().__exit__(None, None, None)
