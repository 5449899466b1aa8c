"""The contextvar registry: visibility, default pool, hand-offs and concurrent use."""

from __future__ import annotations

import asyncio
import contextvars
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import pgctx.pool
from pgctx import registry
from pgctx.decorators import with_connection
from pgctx.errors import ConcurrentUseError, NoActiveConnection, TransactionAborted
from pgctx.registry import (
    NoDefaultPool,
    current_connection,
    get_default_pool,
    in_scope,
    set_default_pool,
)
from tests.helpers import AsyncBarrier, in_use, insert, rows, unique_app

Pool = pgctx.pool.ThreadedConnectionPool


@pytest.fixture
def pool(dsn: str) -> Iterator[Pool]:
    p = Pool(1, 4, dsn, application_name=unique_app("registry"), timeout=30)
    yield p
    if not p.closed:
        p.closeall()


@pytest.fixture
def default_pool(pool: Pool) -> Iterator[Pool]:
    previous = set_default_pool(pool)
    yield pool
    set_default_pool(previous)


def test_outside_a_block_current_connection_says_how_to_open_one(pool: Pool) -> None:
    with pytest.raises(NoActiveConnection, match=r"pool\.connection\(\)") as info:
        current_connection(pool)
    assert isinstance(info.value, LookupError)
    assert in_use(pool) == 0  # never checks one out
    assert not in_scope(pool)


def test_default_pool(pool: Pool) -> None:
    previous = set_default_pool(None)
    try:
        with pytest.raises(NoDefaultPool, match="set_default_pool"):
            current_connection()
        with pytest.raises(TypeError, match="connection pool"):
            set_default_pool("host=localhost")
        assert set_default_pool(pool) is None
        assert get_default_pool() is pool
        with pool.connection() as conn:
            assert current_connection() is conn
            assert in_scope()
    finally:
        set_default_pool(previous)


def test_binding_is_gone_after_the_block_even_in_copied_contexts(pool: Pool) -> None:
    with pool.connection() as conn:
        inside = contextvars.copy_context()
        assert inside.run(current_connection, pool) is conn
    assert in_use(pool) == 0
    with pytest.raises(NoActiveConnection):
        inside.run(current_connection, pool)
    with pytest.raises(NoActiveConnection):
        current_connection(pool)


def test_copy_context_run_in_the_same_thread_joins(pool: Pool, pg_admin: Any, table: str) -> None:
    def nested() -> Any:
        with pool.connection() as conn:
            insert(conn, table, 2)
            return conn

    with pool.connection() as conn:
        insert(conn, table, 1)
        assert contextvars.copy_context().run(nested) is conn
        assert rows(pg_admin, table) == []
    assert rows(pg_admin, table) == [1, 2]


def test_to_thread_hand_off_joins_the_transaction(pool: Pool, pg_admin: Any, table: str) -> None:
    seen: dict[str, Any] = {}

    @with_connection(pool)
    def in_thread(conn: Any) -> None:
        seen["thread"] = threading.get_ident()
        seen["conn"] = conn
        with conn.cursor() as cur:
            cur.execute(f"SELECT count(*) FROM {table}")
            seen["visible"] = cur.fetchone()[0]  # the task's uncommitted row
        insert(conn, table, 2)

    async def main() -> None:
        with pool.connection() as conn:
            insert(conn, table, 1)
            await asyncio.to_thread(in_thread)
            assert seen["conn"] is conn
            assert current_connection(pool) is conn  # the owner uses it again afterwards
            assert rows(pg_admin, table) == []

    asyncio.run(main())
    assert seen["thread"] != threading.get_ident()
    assert seen["visible"] == 1
    assert rows(pg_admin, table) == [1, 2]
    assert in_use(pool) == 0


@pytest.mark.timeout(60)
def test_two_threads_using_one_connection_at_once_is_refused(
    pool: Pool, pg_admin: Any, table: str
) -> None:
    inside = threading.Event()
    done = threading.Event()

    def worker() -> None:
        with pool.connection() as conn:
            insert(conn, table, 2)
            inside.set()
            done.wait(30)

    with pytest.raises(ConcurrentUseError, match="separate=True"), pool.connection() as conn:
        insert(conn, table, 1)
        thread = threading.Thread(target=contextvars.copy_context().run, args=(worker,))
        thread.start()
        try:
            assert inside.wait(30)
            current_connection(pool)  # the owner, while the thread is inside
        finally:
            done.set()
            thread.join(30)
    assert rows(pg_admin, table) == []
    assert in_use(pool) == 0


@pytest.mark.timeout(60)
def test_gather_children_never_interleave_on_one_connection(
    pool: Pool, pg_admin: Any, table: str
) -> None:
    @with_connection(pool)
    async def child(n: int, started: asyncio.Event, go: asyncio.Event, conn: Any) -> None:
        insert(conn, table, n)
        started.set()
        await go.wait()  # suspended inside its block: the connection is in use
        insert(conn, table, n + 100)

    async def main() -> list[Any]:
        with pool.connection() as conn:
            insert(conn, table, 1)
            started, go = asyncio.Event(), asyncio.Event()
            first = asyncio.create_task(child(2, started, go, None))
            await started.wait()
            second = asyncio.create_task(child(3, asyncio.Event(), go, None))
            results = await asyncio.gather(second, return_exceptions=True)
            go.set()
            results += await asyncio.gather(first, return_exceptions=True)
            return results

    with pytest.raises(TransactionAborted) as info:
        asyncio.run(main())
    assert isinstance(info.value.__cause__, ConcurrentUseError)
    assert rows(pg_admin, table) == []  # the refused interleaving committed nothing
    assert in_use(pool) == 0


def test_sequential_children_join_the_parent(pool: Pool, pg_admin: Any, table: str) -> None:
    @with_connection(pool)
    async def child(n: int, conn: Any) -> Any:
        insert(conn, table, n)
        return conn

    async def main() -> None:
        with pool.connection() as conn:
            results = await asyncio.gather(child(1), child(2))
            assert results == [conn, conn]

    asyncio.run(main())
    assert rows(pg_admin, table) == [1, 2]


@pytest.mark.timeout(60)
def test_separate_children_run_concurrently_on_their_own_connections(
    pool: Pool, pg_admin: Any, table: str
) -> None:
    @with_connection(pool, separate=True)
    async def child(n: int, both: AsyncBarrier, conn: Any) -> int:
        insert(conn, table, n)
        await both.wait()  # both inside their blocks at the same time
        return int(conn.get_backend_pid())

    async def main() -> None:
        with pool.connection() as conn:
            both = AsyncBarrier(2)
            pids = await asyncio.wait_for(asyncio.gather(child(1, both), child(2, both)), 30)
            assert len(set(pids)) == 2 and conn.get_backend_pid() not in pids

    asyncio.run(main())
    assert rows(pg_admin, table) == [1, 2]
    assert in_use(pool) == 0


def test_task_outliving_its_scope_sees_nothing(pool: Pool) -> None:
    async def main() -> None:
        gate = asyncio.Event()

        async def late() -> str:
            await gate.wait()
            try:
                current_connection(pool)
            except NoActiveConnection:
                return "absent"
            return "stale binding visible"

        with pool.connection():
            task = asyncio.create_task(late())
        gate.set()
        assert await task == "absent"

    asyncio.run(main())
    assert in_use(pool) == 0


def test_executor_threads_never_see_a_finished_or_suspended_binding(pool: Pool) -> None:
    def raw_generator() -> Iterator[int]:
        with pool.connection() as conn:
            yield int(conn.get_backend_pid())

    @with_connection(pool)
    def decorated_generator(conn: Any) -> Iterator[int]:
        yield int(conn.get_backend_pid())

    def job1() -> tuple[Any, Any]:
        with pool.connection():
            pass
        raw = raw_generator()
        decorated = decorated_generator()
        return raw, next(raw), decorated, next(decorated)

    def job2() -> tuple[str, int]:
        try:
            current_connection(pool)
            seen = "binding visible"
        except NoActiveConnection:
            seen = "absent"
        with pool.connection() as conn:
            return seen, int(conn.get_backend_pid())

    with ThreadPoolExecutor(max_workers=1) as executor:
        raw, raw_pid, decorated, decorated_pid = executor.submit(job1).result(30)
        assert in_use(pool) == 2  # both generators hold their connection while suspended
        seen, own_pid = executor.submit(job2).result(30)
        assert seen == "absent"
        assert own_pid not in (raw_pid, decorated_pid)
        raw.close()
        decorated.close()
    assert in_use(pool) == 0


def test_registry_mapping_is_replaced_never_mutated(pool: Pool) -> None:
    before = registry.get_mapping()
    with pool.connection():
        during = registry.get_mapping()
        assert during is not before and len(during) == len(before) + 1
    assert registry.get_mapping() is before


def test_raw_block_in_async_generator_is_not_visible_to_its_consumer(pool: Pool) -> None:
    async def rows() -> Any:
        async with pool.connection() as conn:
            yield conn
            yield current_connection(pool)

    async def main() -> None:
        agen = rows()
        first = await agen.__anext__()
        with pytest.raises(NoActiveConnection):
            current_connection(pool)  # the suspended generator's binding is not ours
        assert await agen.__anext__() is first  # but the generator still sees it
        await agen.aclose()

    asyncio.run(main())
    assert in_use(pool) == 0


# -- children hold a parent's binding until they are done -------------------------------


def _use(pool: Pool, table: str, n: int) -> None:
    """What a child does with the parent's connection: find it and write through it."""
    insert(current_connection(pool), table, n)


@pytest.mark.timeout(60)
def test_concurrent_to_thread_children_are_refused(pool: Pool, pg_admin: Any, table: str) -> None:
    both_in = threading.Barrier(2)

    def child(n: int) -> None:
        both_in.wait(30)  # both threads are running before either uses the connection
        _use(pool, table, n)
        both_in.wait(30)  # and neither is done before both have tried

    def tolerant(n: int) -> Any:
        try:
            child(n)
        except ConcurrentUseError as exc:
            both_in.wait(30)
            return exc
        return None

    async def main() -> list[Any]:
        with pool.connection() as conn:
            insert(conn, table, 1)
            return await asyncio.gather(
                asyncio.to_thread(tolerant, 2), asyncio.to_thread(tolerant, 3)
            )

    with pytest.raises(TransactionAborted) as info:
        asyncio.run(main())
    assert isinstance(info.value.__cause__, ConcurrentUseError)
    assert rows(pg_admin, table) == []  # the unit was marked failed: nothing committed
    assert in_use(pool) == 0


@pytest.mark.timeout(60)
def test_concurrent_tasks_using_current_connection_are_refused(
    pool: Pool, pg_admin: Any, table: str
) -> None:
    async def child(n: int, first_in: asyncio.Event, go: asyncio.Event) -> None:
        _use(pool, table, n)
        first_in.set()
        await go.wait()  # not done yet: still holds the connection

    async def main() -> None:
        with pool.connection():
            first_in, go = asyncio.Event(), asyncio.Event()
            first = asyncio.create_task(child(1, first_in, go))
            await first_in.wait()
            with pytest.raises(ConcurrentUseError, match="separate=True"):
                await asyncio.create_task(child(2, asyncio.Event(), go))
            with pytest.raises(ConcurrentUseError):
                current_connection(pool)  # nor may the parent while the child is not done
            go.set()
            await first
            current_connection(pool)  # the child is done: the parent may use it again

    with pytest.raises(TransactionAborted):
        asyncio.run(main())
    assert rows(pg_admin, table) == []
    assert in_use(pool) == 0


@pytest.mark.skipif(not hasattr(asyncio, "TaskGroup"), reason="TaskGroup came in 3.11")
@pytest.mark.timeout(60)
def test_task_group_children_are_refused(pool: Pool, pg_admin: Any, table: str) -> None:
    async def child(n: int, barrier: AsyncBarrier) -> None:
        await barrier.wait()
        _use(pool, table, n)
        await barrier.wait2()  # type: ignore[attr-defined]

    class TwoBarriers(AsyncBarrier):
        def __init__(self) -> None:
            super().__init__(2)
            self._second = AsyncBarrier(2)

        async def wait2(self) -> None:
            await self._second.wait()

    async def main() -> None:
        with pool.connection():
            barrier = TwoBarriers()
            try:
                async with asyncio.TaskGroup() as group:  # type: ignore[attr-defined]
                    group.create_task(child(1, barrier))
                    group.create_task(child(2, barrier))
            except BaseException as exc:  # an ExceptionGroup on 3.11+
                errors = exc.exceptions  # type: ignore[attr-defined]
                assert [type(e) for e in errors] == [ConcurrentUseError]
            else:
                raise AssertionError("the second child was not refused")

    with pytest.raises(TransactionAborted):
        asyncio.run(main())
    assert rows(pg_admin, table) == []
    assert in_use(pool) == 0


@pytest.mark.timeout(120)
def test_long_sequential_hand_off_chains_join(pool: Pool, pg_admin: Any, table: str) -> None:
    """Hundreds of hand-offs landing on whichever worker thread is free: no false refusal."""

    async def main() -> None:
        loop = asyncio.get_running_loop()
        loop.set_default_executor(ThreadPoolExecutor(max_workers=8))
        with pool.connection() as conn:
            for n in range(300):
                await asyncio.to_thread(_use, pool, table, n)
                if n % 7 == 0:
                    assert current_connection(pool) is conn  # the parent, between hand-offs
                if n % 11 == 0:
                    await asyncio.create_task(asyncio.to_thread(_use, pool, table, 1000 + n))

    asyncio.run(main())
    assert rows(pg_admin, table) == sorted(
        list(range(300)) + [1000 + n for n in range(300) if n % 11 == 0]
    )
    assert in_use(pool) == 0


@pytest.mark.timeout(120)
def test_executor_hand_offs_with_copy_context(pool: Pool, pg_admin: Any, table: str) -> None:
    with (
        pytest.raises(TransactionAborted),
        ThreadPoolExecutor(max_workers=4) as executor,
        pool.connection() as conn,
    ):
        for n in range(100):  # sequential: each job is done before the next starts
            executor.submit(contextvars.copy_context().run, _use, pool, table, n).result(30)
        assert current_connection(pool) is conn
        gate = threading.Event()
        inside = threading.Event()

        def holder() -> None:
            _use(pool, table, 500)
            inside.set()
            gate.wait(30)

        first = executor.submit(contextvars.copy_context().run, holder)
        assert inside.wait(30)
        second = executor.submit(contextvars.copy_context().run, _use, pool, table, 501)
        with pytest.raises(ConcurrentUseError):
            second.result(30)
        gate.set()
        first.result(30)
    assert rows(pg_admin, table) == []  # the refused concurrent use failed the unit
    assert in_use(pool) == 0


def _select(pool: Pool) -> None:
    with current_connection(pool).cursor() as cur:
        cur.execute("SELECT 1")


@settings(
    max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    phases=st.lists(
        st.tuples(
            st.sampled_from(["task", "thread"]), st.sampled_from(["task", "thread"]), st.booleans()
        ),
        min_size=1,
        max_size=5,
    )
)
@pytest.mark.timeout(300)
def test_random_schedules_of_children(pool: Pool, phases: list[tuple[str, str, bool]]) -> None:
    """Sequential children (any kind, any worker) join; of two at once the second is refused."""

    async def child(
        kind: str, before: threading.Event | None, after: threading.Event | None
    ) -> Any:
        def body() -> Any:
            if before is not None:
                assert before.wait(30)
            try:
                _select(pool)
            except ConcurrentUseError as exc:
                return exc
            finally:
                if after is not None:
                    after.set()
            return None

        if kind == "thread":
            return await asyncio.to_thread(body)

        async def in_task() -> Any:
            loop = asyncio.get_running_loop()
            if before is not None:  # run_in_executor copies no context: not a user
                assert await loop.run_in_executor(None, before.wait, 30)
            try:
                _select(pool)
            except ConcurrentUseError as exc:
                return exc
            finally:
                if after is not None:
                    after.set()
            return None

        return await asyncio.create_task(in_task())

    async def holder(kind: str, used: threading.Event, release: threading.Event) -> Any:
        def body() -> None:
            _select(pool)
            used.set()
            assert release.wait(30)  # not done until the other child has tried

        if kind == "thread":
            return await asyncio.to_thread(body)

        async def in_task() -> None:
            _select(pool)
            used.set()
            assert await asyncio.get_running_loop().run_in_executor(None, release.wait, 30)

        return await asyncio.create_task(in_task())

    async def main() -> None:
        with pool.connection():
            for first, second, at_once in phases:
                if at_once:
                    used, tried = threading.Event(), threading.Event()
                    results = await asyncio.gather(
                        holder(first, used, tried), child(second, used, tried)
                    )
                    assert results[0] is None
                    assert isinstance(results[1], ConcurrentUseError)
                else:
                    assert await child(first, None, None) is None
                    assert await child(second, None, None) is None
                _select(pool)  # the children are done: the parent uses it again

    if any(at_once for _, _, at_once in phases):
        with pytest.raises(TransactionAborted):
            asyncio.run(main())
    else:
        asyncio.run(main())
    assert in_use(pool) == 0
