"""pool.connection() blocks against a real server: commit, rollback, discard, nesting."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import warnings
from collections.abc import Iterator
from typing import Any

import psycopg2
import psycopg2.extensions
import psycopg2.pool
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import pgctx
import pgctx.pool
from pgctx.errors import ScopeError, TransactionAborted
from pgctx.registry import current_connection
from pgctx.scope import ConnectionScopesMixin
from tests.helpers import backends, in_use, insert, rows, unique_app, wait_backends

Pool = pgctx.pool.ThreadedConnectionPool


class Psycopg2Pool(ConnectionScopesMixin, psycopg2.pool.ThreadedConnectionPool):
    pass


PersistentPool = pgctx.pool.PersistentConnectionPool


@pytest.fixture
def app() -> str:
    return unique_app("scope")


@pytest.fixture
def pool(dsn: str, app: str) -> Iterator[Pool]:
    p = Pool(1, 4, dsn, application_name=app, timeout=30)
    yield p
    if not p.closed:
        p.closeall()


def pid(conn: Any) -> int:
    return int(conn.get_backend_pid())


def test_clean_exit_commits_and_returns(pool: Pool, pg_admin: Any, table: str) -> None:
    with pool.connection() as conn:
        insert(conn, table, 1)
        assert rows(pg_admin, table) == []  # not yet committed
        assert in_use(pool) == 1
    assert rows(pg_admin, table) == [1]
    assert in_use(pool) == 0
    assert conn.info.transaction_status == psycopg2.extensions.TRANSACTION_STATUS_IDLE


def test_exception_rolls_back_and_returns_the_same_connection(
    pool: Pool, pg_admin: Any, table: str
) -> None:
    with pytest.raises(ValueError), pool.connection() as conn:
        first = pid(conn)
        insert(conn, table, 1)
        raise ValueError("boom")
    assert rows(pg_admin, table) == []
    assert in_use(pool) == 0
    assert not conn.closed
    with pool.connection() as again:
        assert pid(again) == first  # returned, not closed


def test_ordinary_database_error_keeps_the_connection(pool: Pool, table: str) -> None:
    with pytest.raises(psycopg2.errors.UniqueViolation), pool.connection() as conn:
        first = pid(conn)
        insert(conn, table, 1)
        insert(conn, table, 1)
    assert not conn.closed and in_use(pool) == 0
    with pool.connection() as again:
        assert pid(again) == first


def test_statement_timeout_is_not_a_disconnect(pool: Pool) -> None:
    with pytest.raises(psycopg2.errors.QueryCanceled), pool.connection() as conn:
        first = pid(conn)
        with conn.cursor() as cur:
            cur.execute("SET LOCAL statement_timeout = '10ms'")
            cur.execute("SELECT pg_sleep(5)")
    with pool.connection() as again:
        assert pid(again) == first


def test_terminated_backend_is_closed_not_returned(
    pool: Pool, pg_server: Any, pg_admin: Any, app: str, table: str
) -> None:
    with pytest.raises(psycopg2.OperationalError), pool.connection() as conn:
        insert(conn, table, 1)
        assert pg_server.terminate_backends(application_name=app) == 1
        insert(conn, table, 2)
    assert conn.closed
    assert in_use(pool) == 0
    with pool.connection() as fresh:  # the pool still serves working connections
        insert(fresh, table, 3)
    assert rows(pg_admin, table) == [3]
    assert wait_backends(pg_admin, app, 1) == 1


def test_close_on_error_closes_on_any_exception(pool: Pool, pg_admin: Any, app: str) -> None:
    with pytest.raises(KeyError), pool.connection(close_on_error=True) as conn:
        raise KeyError("x")
    assert conn.closed and in_use(pool) == 0
    assert wait_backends(pg_admin, app, 0) == 0


def test_nested_blocks_join_and_commit_once(pool: Pool, pg_admin: Any, table: str) -> None:
    with pool.connection() as outer:
        insert(outer, table, 1)
        with pool.connection() as inner:
            assert inner is outer
            insert(inner, table, 2)
        assert rows(pg_admin, table) == []  # the inner exit did not commit
        assert in_use(pool) == 1
    assert rows(pg_admin, table) == [1, 2]


def test_failed_inner_block_never_becomes_a_silent_commit(
    pool: Pool, pg_admin: Any, table: str
) -> None:
    with pytest.raises(TransactionAborted) as info, pool.connection() as outer:
        insert(outer, table, 1)
        try:
            with pool.connection() as inner:
                insert(inner, table, 2)
                raise ValueError("inner failed")
        except ValueError:
            pass
        insert(outer, table, 3)  # the transaction itself is fine; the unit is not
    assert isinstance(info.value.__cause__, ValueError)
    assert rows(pg_admin, table) == []
    assert in_use(pool) == 0 and not outer.closed


def test_caught_database_error_aborts_instead_of_committing(
    pool: Pool, pg_admin: Any, table: str
) -> None:
    with pytest.raises(TransactionAborted), pool.connection() as conn:
        insert(conn, table, 1)
        with contextlib.suppress(psycopg2.errors.UniqueViolation):
            insert(conn, table, 1)  # psycopg2's commit() would now "succeed", saving nothing
    assert rows(pg_admin, table) == []
    assert in_use(pool) == 0


def test_commit_error_is_raised_after_the_connection_is_returned(
    pool: Pool, pg_admin: Any, table: str
) -> None:
    seen: list[int] = []
    with pg_admin.cursor() as cur:
        cur.execute(
            f"CREATE TABLE {table}_ref (x int REFERENCES {table} DEFERRABLE INITIALLY DEFERRED)"
        )
    try:
        with pytest.raises(psycopg2.errors.ForeignKeyViolation):
            try:
                with pool.connection() as conn:
                    insert(conn, f"{table}_ref", 42)  # checked only at COMMIT
            except psycopg2.Error:
                seen.append(in_use(pool))
                raise
        assert seen == [0]
        assert not conn.closed
    finally:
        with pg_admin.cursor() as cur:
            cur.execute(f"DROP TABLE {table}_ref")


class FailingRollback(psycopg2.extensions.connection):
    fail = False

    def rollback(self) -> None:
        if FailingRollback.fail:
            raise psycopg2.OperationalError("rollback refused by the test")
        super().rollback()


def test_failed_rollback_discards_and_keeps_the_body_error(dsn: str, app: str) -> None:
    pool = Pool(1, 2, dsn, application_name=app, connection_factory=FailingRollback)
    try:
        FailingRollback.fail = True
        with pytest.raises(ValueError) as info, pool.connection() as conn:
            with conn.cursor() as cur:
                cur.execute("SELECT 1")
            raise ValueError("body")
        notes = getattr(info.value, "__notes__", [])
        assert any("rollback refused" in note for note in notes)
        assert conn.closed and in_use(pool) == 0
    finally:
        FailingRollback.fail = False
        pool.closeall()


def test_autocommit_connection_commits_nothing(
    dsn: str, app: str, pg_admin: Any, table: str
) -> None:
    pool = Pool(1, 2, dsn, application_name=app)
    try:
        with pool.connection() as conn:
            conn.autocommit = True
            insert(conn, table, 1)
            assert rows(pg_admin, table) == [1]
        with pytest.raises(TransactionAborted), pool.connection() as conn:
            with conn.cursor() as cur:
                cur.execute("BEGIN")
            insert(conn, table, 2)  # a hand-made transaction left open is not committed
        assert rows(pg_admin, table) == [1]
        assert in_use(pool) == 0
        assert conn.closed or conn.info.transaction_status == 0
    finally:
        pool.closeall()


def test_separate_takes_its_own_connection_and_transaction(
    pool: Pool, pg_admin: Any, table: str
) -> None:
    with pytest.raises(RuntimeError), pool.connection() as outer:
        insert(outer, table, 1)
        with pool.connection(separate=True) as side:
            assert side is not outer
            assert current_connection(pool) is side
            insert(side, table, 2)
        assert current_connection(pool) is outer
        assert rows(pg_admin, table) == [2]  # committed on its own
        raise RuntimeError("outer fails")
    assert rows(pg_admin, table) == [2]
    assert in_use(pool) == 0


def test_keys_name_different_connections(pool: Pool) -> None:
    with pool.connection() as a, pool.connection("audit") as b:
        assert a is not b
        assert current_connection(pool, "audit") is b
        assert current_connection(pool) is a
        assert in_use(pool) == 2
    assert in_use(pool) == 0


def test_misuse_raises_and_leaves_the_pool_alone(pool: Pool) -> None:
    block = pool.connection()
    with block:
        pass
    with pytest.raises(ScopeError, match="only once"), block:
        pass
    with pytest.raises(ScopeError, match="without being entered"):
        pool.connection().__exit__(None, None, None)
    with pytest.raises(TypeError, match="hashable"), pool.connection(["list"]):
        pass
    assert in_use(pool) == 0


def test_keyboard_interrupt_inside_a_block_leaves_the_pool_whole(
    pool: Pool, pg_admin: Any, table: str
) -> None:
    with pytest.raises(KeyboardInterrupt), pool.connection() as conn:
        insert(conn, table, 1)
        raise KeyboardInterrupt
    assert rows(pg_admin, table) == []
    assert in_use(pool) == 0
    with pool.connection() as again:
        insert(again, table, 2)
    assert rows(pg_admin, table) == [2]


@pytest.mark.timeout(60)
def test_cancelled_task_inside_a_block_leaves_the_pool_whole(
    pool: Pool, pg_admin: Any, table: str
) -> None:
    async def main() -> None:
        entered = asyncio.Event()

        async def work() -> None:
            async with pool.connection() as conn:
                insert(conn, table, 1)
                entered.set()
                await asyncio.Event().wait()

        task = asyncio.create_task(work())
        await asyncio.wait_for(entered.wait(), 30)
        assert in_use(pool) == 1
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    assert rows(pg_admin, table) == []
    assert in_use(pool) == 0


@pytest.mark.timeout(60)
def test_cancelled_hand_off_returns_the_connection_when_the_thread_ends(
    pool: Pool, pg_admin: Any, table: str
) -> None:
    inside = threading.Event()
    release = threading.Event()
    outcome: list[str] = []

    def worker() -> None:
        try:
            with pool.connection() as conn:  # joins the task's block
                insert(conn, table, 2)
                inside.set()
                release.wait(30)
        except TransactionAborted:
            outcome.append("aborted")

    async def main() -> None:
        async def work() -> None:
            with pool.connection() as conn:
                insert(conn, table, 1)
                await asyncio.to_thread(worker)

        task = asyncio.create_task(work())
        await asyncio.to_thread(inside.wait, 30)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        # The thread is still using the connection: it must not be back in the pool.
        assert in_use(pool) == 1
        release.set()

    asyncio.run(main())
    assert outcome == ["aborted"]
    assert rows(pg_admin, table) == []
    assert in_use(pool) == 0


def test_persistent_pool_blocks(dsn: str, app: str, pg_admin: Any, table: str) -> None:
    pool = PersistentPool(1, 2, dsn, application_name=app)
    try:
        with pool.connection() as conn:
            insert(conn, table, 1)
            with (
                pytest.raises(ScopeError, match="PersistentConnectionPool"),
                pool.connection(separate=True),
            ):
                pass
            insert(conn, table, 2)  # the refused block did not touch this transaction
        assert rows(pg_admin, table) == [1, 2]
        with pool.connection() as again:
            assert again is conn
    finally:
        pool.closeall()


def test_works_on_psycopg2_pool_classes(dsn: str, app: str, pg_admin: Any, table: str) -> None:
    pool = Psycopg2Pool(1, 2, dsn, application_name=app)
    try:
        with pool.connection() as conn:
            insert(conn, table, 1)
        with pytest.raises(ZeroDivisionError), pool.connection() as conn:
            insert(conn, table, 2)
            1 / 0  # noqa: B018
        assert rows(pg_admin, table) == [1]
        assert len(pool._used) == 0
    finally:
        pool.closeall()
    assert backends(pg_admin, app) == 0 or wait_backends(pg_admin, app, 0) == 0


@pytest.mark.timeout(60)
def test_async_blocks_wait_for_a_connection_off_the_event_loop(dsn: str, app: str) -> None:
    pool = Pool(0, 2, dsn, application_name=app, timeout=30)

    async def work(n: int) -> int:
        async with pool.connection() as conn:
            await asyncio.sleep(0.01)  # holds its connection across an await
            return int(conn.get_backend_pid()) + 0 * n

    async def main() -> list[int]:
        return await asyncio.wait_for(asyncio.gather(*(work(n) for n in range(10))), 30)

    try:
        pids = asyncio.run(main())  # a blocking wait on the loop would deadlock here
        assert len(pids) == 10 and len(set(pids)) <= 2
        assert in_use(pool) == 0
    finally:
        pool.closeall()


@pytest.mark.timeout(60)
def test_cancelled_while_waiting_for_a_connection(dsn: str, app: str) -> None:
    pool = Pool(0, 1, dsn, application_name=app, timeout=30)

    async def main() -> None:
        holder_in = asyncio.Event()
        release = asyncio.Event()

        async def holder() -> None:
            async with pool.connection():
                holder_in.set()
                await release.wait()

        async def waiter() -> None:
            async with pool.connection():
                raise AssertionError("must not get the connection")

        first = asyncio.create_task(holder())
        await holder_in.wait()
        second = asyncio.create_task(waiter())
        await asyncio.sleep(0.1)  # the waiter is now blocked in getconn (in a thread)
        second.cancel()
        with pytest.raises(asyncio.CancelledError):
            await second
        release.set()
        await first
        for _ in range(500):  # the abandoned checkout is put back when it completes
            if in_use(pool) == 0:
                break
            await asyncio.sleep(0.01)

    try:
        asyncio.run(main())
        assert in_use(pool) == 0
        with pool.connection():
            pass
    finally:
        pool.closeall()


# --- a joined block that ends the enclosing block's transaction ------------------------


def _rewritten_put(pool: Pool, table: str, x: int, action: str) -> None:
    """Library code rewritten from getconn/commit/putconn to a block, keeping its commit."""
    with pool.connection() as conn:
        insert(conn, table, x)
        if action == "commit":
            conn.commit()
        elif action == "rollback":
            conn.rollback()


def _decorated_put(pool: Pool, table: str, x: int, action: str) -> None:
    @pgctx.with_connection(pool)
    def put(conn: Any = None) -> None:
        _rewritten_put(pool, table, x, action)  # joins this block in turn

    put()


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    outer=st.sampled_from(["with", "decorated", "async with, to_thread"]),
    inner=st.sampled_from([_rewritten_put, _decorated_put]),
    outer_work=st.booleans(),
    action=st.sampled_from(["commit", "rollback", "neither"]),
)
def test_a_joined_block_that_commits_the_enclosing_unit_warns(
    table: str, pool: Pool, pg_admin: Any, outer: str, inner: Any, outer_work: bool, action: str
) -> None:
    """Detected without a round trip: the transaction was open when the block joined and
    is idle at its clean exit. The warning names both blocks' places."""
    with pg_admin.cursor() as cur:
        cur.execute(f"DELETE FROM {table}")

    def unit_of_work(conn: Any) -> None:
        if outer_work:
            insert(conn, table, 1)
        inner(pool, table, 2, action)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if outer == "with":
            with pool.connection() as conn:
                unit_of_work(conn)
        elif outer == "decorated":
            pgctx.with_connection(pool)(unit_of_work)(None)
        else:

            async def main() -> None:
                async with pool.connection() as conn:
                    if outer_work:
                        insert(conn, table, 1)
                    await asyncio.to_thread(inner, pool, table, 2, action)  # a hand-off

            asyncio.run(main())
    found = [w for w in caught if issubclass(w.category, pgctx.JoinedCommitWarning)]
    assert len(found) == (outer_work and action != "neither")  # once, by the innermost
    if found:
        message = str(found[0].message)
        assert f"{__file__}:" in message and "_rewritten_put" in message
        here = "test_a_joined_block_that_commits_the_enclosing_unit_warns()"
        if outer == "decorated":
            assert f"the call of @with_connection {unit_of_work.__qualname__} by {here}" in message
        else:
            assert ("main()" if outer.startswith("async") else here) in message
        assert found[0].filename == __file__  # attributed to the joined block's line
    assert in_use(pool) == 0


@pytest.mark.timeout(120)
def test_async_waiters_do_not_starve_the_default_executor(dsn: str, app: str) -> None:
    """18 tasks, 2 connections, 6 default executor threads: the holders' own to_thread
    calls must not queue behind threads that only wait for a connection."""
    from concurrent.futures import ThreadPoolExecutor

    pool = Pool(0, 2, dsn, application_name=app, timeout=10)

    def unit_of_work(conn: Any) -> int:
        with conn.cursor() as cur:
            cur.execute("SELECT 1")
            return int(cur.fetchone()[0])

    async def task() -> int:
        async with pool.connection() as conn:
            return await asyncio.to_thread(unit_of_work, conn)

    async def main() -> list[Any]:
        asyncio.get_running_loop().set_default_executor(ThreadPoolExecutor(6))
        return await asyncio.gather(*(task() for _ in range(18)), return_exceptions=True)

    try:
        results = asyncio.run(main())
        assert results == [1] * 18  # before: 12 PoolTimeouts
        assert in_use(pool) == 0
        assert pool.get_stats()["requests_timeouts"] == 0
    finally:
        pool.closeall()


@pytest.mark.timeout(120)
def test_cancelled_async_waiters_never_lose_a_connection(dsn: str, app: str) -> None:
    import random

    pool = Pool(0, 2, dsn, application_name=app, timeout=20)
    rng = random.Random(1234)

    async def holder(release: asyncio.Event) -> None:
        async with pool.connection():
            await release.wait()

    async def waiter() -> None:
        async with pool.connection():
            await asyncio.sleep(0)

    async def main() -> None:
        for _ in range(30):
            release = asyncio.Event()
            holders = [asyncio.create_task(holder(release)) for _ in range(2)]
            waiters = [asyncio.create_task(waiter()) for _ in range(rng.randint(1, 6))]
            for _ in range(rng.randint(0, 3)):
                await asyncio.sleep(0)
            doomed = rng.sample(waiters, rng.randint(0, len(waiters)))
            if rng.random() < 0.5:
                release.set()  # connections are being handed over while we cancel
            for task in doomed:
                task.cancel()
            release.set()
            await asyncio.wait_for(asyncio.gather(*holders, *waiters, return_exceptions=True), 30)
        for _ in range(3000):  # a connection handed to a cancelled waiter comes back
            if in_use(pool) == 0:
                break
            await asyncio.sleep(0.01)

    try:
        asyncio.run(main())
        assert in_use(pool) == 0
        stats = pool.get_stats()
        assert stats["requests_waiting"] == 0
        with pool.connection(), pool.connection(separate=True):
            pass  # both slots are usable: nothing was lost
    finally:
        pool.closeall()


@pytest.mark.timeout(60)
def test_async_blocks_never_use_the_default_executor(dsn: str, app: str) -> None:
    from concurrent.futures import ThreadPoolExecutor

    class Counting(ThreadPoolExecutor):
        jobs = 0

        def submit(self, *args: Any, **kwargs: Any) -> Any:
            Counting.jobs += 1
            return super().submit(*args, **kwargs)

    pool = Pool(1, 2, dsn, application_name=app, timeout=10)

    async def main() -> None:
        asyncio.get_running_loop().set_default_executor(Counting(2))
        for _ in range(20):  # an idle connection: taken on the loop
            async with pool.connection():
                pass
        async with pool.connection(), pool.connection(separate=True):
            pass  # a connect: in pgctx's own executor

    try:
        asyncio.run(main())
        assert Counting.jobs == 0
        assert in_use(pool) == 0
    finally:
        pool.closeall()


@pytest.mark.xfail(
    strict=False,
    reason="the joined-commit check compares the status at join and at exit only: work "
    "done after the commit opens a new transaction and hides it",
)
def test_a_joined_commit_followed_by_more_work_still_warns(
    table: str, pool: Pool, pg_admin: Any
) -> None:
    with pool.connection() as conn:
        insert(conn, table, 1)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with pool.connection() as inner:
                inner.commit()  # commits the enclosing block's insert
                insert(inner, table, 2)
        assert rows(pg_admin, table) == [1]  # the enclosing block's work is committed
        assert any(issubclass(w.category, pgctx.JoinedCommitWarning) for w in caught)
        conn.rollback()
