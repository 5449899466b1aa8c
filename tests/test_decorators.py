"""@with_connection on every callable kind, against a real server."""

from __future__ import annotations

import asyncio
import gc
import inspect
import threading
from collections.abc import AsyncIterator, Iterator
from typing import Any

import psycopg2
import pytest

import pgctx.pool
from pgctx.decorators import with_connection
from pgctx.errors import NoActiveConnection
from pgctx.registry import current_connection, set_default_pool
from tests.helpers import backends, in_use, insert, rows, unique_app, wait_backends

Pool = pgctx.pool.ThreadedConnectionPool


@pytest.fixture
def app() -> str:
    return unique_app("decorators")


@pytest.fixture
def pool(dsn: str, app: str) -> Iterator[Pool]:
    p = Pool(1, 4, dsn, application_name=app, timeout=30)
    previous = set_default_pool(p)
    yield p
    set_default_pool(previous)
    if not p.closed:
        p.closeall()


def test_function_gets_its_connection_and_commits(pool: Pool, pg_admin: Any, table: str) -> None:
    @with_connection
    def add(x: int, conn: Any = None) -> Any:
        assert current_connection() is conn
        assert in_use(pool) == 1
        insert(conn, table, x)
        return conn

    add(1)
    assert rows(pg_admin, table) == [1]
    assert in_use(pool) == 0


def test_function_without_conn_parameter_uses_current_connection(
    pool: Pool, pg_admin: Any, table: str
) -> None:
    @with_connection(pool)
    def add(x: int) -> None:
        insert(current_connection(pool), table, x)

    add(1)
    with pytest.raises(ZeroDivisionError):
        with_connection(pool)(lambda: (insert(current_connection(pool), table, 2), 1 / 0))()
    assert rows(pg_admin, table) == [1]


def test_explicit_conn_is_respected(pool: Pool, dsn: str, app: str) -> None:
    @with_connection
    def which(conn: Any = None) -> Any:
        return conn

    mine = psycopg2.connect(dsn, application_name=app)
    try:
        assert which(conn=mine) is mine
        assert which(mine) is mine
        assert in_use(pool) == 0  # nothing was checked out
        assert which(None) is not mine  # None means "not given"
    finally:
        mine.close()


def test_signature_and_kind_are_the_originals(pool: Pool) -> None:
    def plain(a: int, b: str = "x", *, conn: Any = None) -> int:
        return a

    async def coro(a: int) -> None:
        pass

    def gen(a: int) -> Iterator[int]:
        yield a

    async def agen(a: int) -> AsyncIterator[int]:
        yield a

    assert inspect.signature(with_connection(plain)) == inspect.signature(plain)
    assert inspect.iscoroutinefunction(with_connection(coro))
    assert inspect.isgeneratorfunction(with_connection(gen))
    assert inspect.isasyncgenfunction(with_connection(agen))
    with pytest.raises(TypeError, match="not classes"):
        with_connection(Pool)
    with pytest.raises(TypeError, match="connection pool"):
        with_connection("not a pool", key="k")  # type: ignore[call-overload]


def test_nested_decorated_calls_share_the_connection(pool: Pool, pg_admin: Any, table: str) -> None:
    @with_connection
    def inner(conn: Any) -> Any:
        insert(conn, table, 2)
        return conn

    @with_connection
    def outer(conn: Any) -> tuple[Any, Any]:
        insert(conn, table, 1)
        got = inner()
        assert rows(pg_admin, table) == []  # the inner call did not commit
        return conn, got

    a, b = outer()
    assert a is b
    assert rows(pg_admin, table) == [1, 2]


class Repo:
    def __init__(self, table: str) -> None:
        self.table = table

    @with_connection
    def method(self, x: int, conn: Any = None) -> Any:
        insert(conn, self.table, x)
        assert current_connection() is conn
        return conn

    @with_connection
    @classmethod
    def klass(cls, conn: Any = None) -> tuple[type, Any]:
        assert current_connection() is conn
        return cls, conn

    @with_connection
    @staticmethod
    def static(x: int, conn: Any = None) -> Any:
        assert current_connection() is conn
        return x, conn

    @with_connection
    async def coroutine(self, conn: Any = None) -> Any:
        await asyncio.sleep(0)
        assert current_connection() is conn  # still bound after an await
        return conn

    @with_connection
    async def agen(self, n: int, conn: Any = None) -> AsyncIterator[Any]:
        for _ in range(n):
            assert current_connection() is conn
            await asyncio.sleep(0)
            yield conn


def test_method_classmethod_staticmethod_coroutine_asyncgen(
    pool: Pool, pg_admin: Any, table: str
) -> None:
    repo = Repo(table)
    assert repo.method(1) is not None
    assert Repo.method(repo, 2) is not None
    cls, conn = repo.klass()
    assert cls is Repo and conn is not None
    assert Repo.klass()[0] is Repo
    assert repo.static(5)[0] == 5 and Repo.static(6)[1] is not None
    assert rows(pg_admin, table) == [1, 2]

    async def main() -> None:
        conn = await repo.coroutine()
        assert conn is not None and in_use(pool) == 0
        seen = [c async for c in repo.agen(3)]
        assert len(seen) == 3 and seen[0] is seen[1] is seen[2]
        assert in_use(pool) == 0
        with pool.connection() as outer:  # inside a block, they join it
            assert await repo.coroutine() is outer
            assert [c async for c in repo.agen(2)] == [outer, outer]

    asyncio.run(main())
    assert in_use(pool) == 0


def test_async_def_scope_covers_the_body(pool: Pool) -> None:
    events: list[str] = []

    @with_connection
    async def body(conn: Any) -> None:
        events.append(f"body in_use={in_use(pool)}")
        await asyncio.sleep(0.01)
        events.append(f"after await in_use={in_use(pool)}")

    coro = body()
    assert in_use(pool) == 0  # calling does not check out: running does
    asyncio.run(coro)
    assert events == ["body in_use=1", "after await in_use=1"]
    assert in_use(pool) == 0


def test_generator_returns_its_connection_when_exhausted_closed_or_collected(pool: Pool) -> None:
    @with_connection
    def numbers(n: int, conn: Any = None) -> Iterator[int]:
        for i in range(n):
            assert current_connection() is conn
            yield i
        return None

    gen = numbers(3)
    assert in_use(pool) == 0  # not at call time
    assert list(gen) == [0, 1, 2]
    assert in_use(pool) == 0  # exhausted

    gen = numbers(3)
    assert next(gen) == 0
    assert in_use(pool) == 1
    with pytest.raises(NoActiveConnection):
        current_connection()  # the consumer never sees the generator's connection
    gen.close()
    assert in_use(pool) == 0  # closed

    gen = numbers(3)
    next(gen)
    del gen
    gc.collect()
    assert in_use(pool) == 0  # garbage-collected


def test_generator_error_and_send_throw(pool: Pool, pg_admin: Any, table: str) -> None:
    @with_connection
    def echo(conn: Any = None) -> Iterator[Any]:
        insert(conn, table, 1)
        got = yield "ready"
        try:
            yield got * 2
        except KeyError:
            yield "caught"
        raise ValueError("stop")

    gen = echo()
    assert next(gen) == "ready"
    assert gen.send(21) == 42
    assert gen.throw(KeyError("k")) == "caught"
    with pytest.raises(ValueError):
        next(gen)
    assert rows(pg_admin, table) == []  # the failed generator rolled back
    assert in_use(pool) == 0


def test_async_generator_returns_its_connection_on_aclose(pool: Pool) -> None:
    @with_connection
    async def stream(conn: Any = None) -> AsyncIterator[int]:
        for i in range(10):
            yield i

    async def main() -> None:
        agen = stream()
        assert await agen.__anext__() == 0
        assert in_use(pool) == 1
        await agen.aclose()
        assert in_use(pool) == 0

    asyncio.run(main())


def test_key_and_separate_options(pool: Pool) -> None:
    @with_connection(key="audit")
    def audit(conn: Any = None) -> Any:
        return conn

    @with_connection(separate=True)
    def side(conn: Any = None) -> Any:
        return conn

    with pool.connection() as main, pool.connection("audit") as audit_conn:
        assert audit() is audit_conn
        other = side()
        assert other is not main and other is not audit_conn
    assert in_use(pool) == 0


@pytest.mark.timeout(120)
def test_32_threads_on_a_pool_of_4(dsn: str, app: str, pg_admin: Any) -> None:
    pool = Pool(0, 4, dsn, application_name=app, timeout=60)
    holders: dict[int, int] = {}  # backend pid -> thread ident
    lock = threading.Lock()
    problems: list[str] = []
    start = threading.Barrier(32)

    @with_connection(pool)
    def inner(conn: Any) -> int:
        return int(conn.get_backend_pid())

    @with_connection(pool)
    def work(i: int, conn: Any) -> None:
        pid = int(conn.get_backend_pid())
        with lock:
            if pid in holders:
                problems.append(f"pid {pid} held by two threads")
            holders[pid] = threading.get_ident()
        try:
            with conn.cursor() as cur:
                cur.execute("SELECT pg_sleep(0.005), %s", (i,))
                assert cur.fetchone()[1] == i
            if inner() != pid:
                problems.append("nested call got another connection")
        finally:
            with lock:
                del holders[pid]

    def thread_main(n: int) -> None:
        try:
            start.wait(30)
            for i in range(10):
                work(n * 100 + i)
        except BaseException as exc:  # report, do not hang the join
            problems.append(repr(exc))

    threads = [threading.Thread(target=thread_main, args=(n,)) for n in range(32)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(100)
        assert not any(t.is_alive() for t in threads)
        assert problems == []
        assert in_use(pool) == 0
        assert backends(pg_admin, app) <= 4
    finally:
        pool.closeall()
    assert wait_backends(pg_admin, app, 0) == 0


# -- a decorated generator's own context ------------------------------------------------


def test_generator_keeps_the_blocks_it_opened_from_step_to_step(
    pool: Pool, pg_admin: Any, table: str
) -> None:
    @with_connection
    def export(conn: Any = None) -> Iterator[str]:
        insert(conn, table, 1)  # the main unit: rolled back below
        with pool.connection("replica") as replica, pool.connection(separate=True) as audit:
            yield "opened"
            assert current_connection(pool, "replica") is replica  # still bound after a yield
            assert current_connection(pool) is audit  # the separate block shadows the main one
            insert(audit, table, 2)  # the audit row, committed on its own
            yield "audited"
            assert current_connection(pool) is audit
        assert current_connection(pool) is conn
        yield "done"
        raise RuntimeError("the main unit fails")

    gen = export()
    assert inspect.isgenerator(gen)
    assert next(gen) == "opened"
    with pytest.raises(NoActiveConnection):
        current_connection(pool, "replica")  # the consumer never sees the generator's blocks
    with pytest.raises(NoActiveConnection):
        current_connection(pool)
    assert next(gen) == "audited"
    assert in_use(pool) == 3
    assert next(gen) == "done"
    with pytest.raises(RuntimeError):
        next(gen)
    assert rows(pg_admin, table) == [2]  # the audit row survived the main rollback
    assert in_use(pool) == 0


def test_async_generator_keeps_the_blocks_it_opened_from_step_to_step(
    pool: Pool, pg_admin: Any, table: str
) -> None:
    @with_connection
    async def export(conn: Any = None) -> AsyncIterator[str]:
        insert(conn, table, 1)
        async with (
            pool.connection("replica") as replica,
            pool.connection(separate=True) as audit,
        ):
            yield "opened"
            await asyncio.sleep(0)
            assert current_connection(pool, "replica") is replica
            assert current_connection(pool) is audit
            insert(audit, table, 2)
            yield "audited"
        yield "done"
        raise RuntimeError("the main unit fails")

    async def main() -> None:
        agen = export()
        assert inspect.isasyncgen(agen)
        assert await agen.__anext__() == "opened"
        with pytest.raises(NoActiveConnection):
            current_connection(pool, "replica")
        assert await agen.__anext__() == "audited"
        assert in_use(pool) == 3
        assert await agen.__anext__() == "done"
        with pytest.raises(RuntimeError):
            await agen.__anext__()

    asyncio.run(main())
    assert rows(pg_admin, table) == [2]
    assert in_use(pool) == 0


def test_generator_sees_the_consumer_context_of_its_first_step(pool: Pool) -> None:
    @with_connection
    def seen(conn: Any = None) -> Iterator[Any]:
        while True:
            try:
                yield current_connection(pool, "other")
            except NoActiveConnection:
                yield None

    gen = seen()
    with pool.connection("other") as other:
        assert next(gen) is other  # the consumer's block, at the first step
    assert next(gen) is None  # that block has ended: a released binding is never visible
    with pool.connection("other"):
        assert next(gen) is None  # blocks the consumer opens later are not seen
    gen.close()
    assert in_use(pool) == 0


def test_consumer_uses_the_connection_between_steps_of_a_joined_generator(
    pool: Pool, pg_admin: Any, table: str
) -> None:
    @with_connection
    def numbers(n: int, conn: Any = None) -> Iterator[int]:
        for i in range(n):
            insert(conn, table, i)
            yield i

    with pool.connection() as conn:
        for i in numbers(5):
            insert(conn, table, 100 + i)  # the consumer, between the generator's steps
            assert current_connection(pool) is conn
            with pool.connection() as again:
                assert again is conn
    assert rows(pg_admin, table) == [0, 1, 2, 3, 4, 100, 101, 102, 103, 104]
    assert in_use(pool) == 0


@pytest.mark.timeout(120)
def test_generator_stepped_from_different_threads_and_tasks(
    pool: Pool, pg_admin: Any, table: str
) -> None:
    """Like Starlette's iterate_in_threadpool: each step on whichever worker is free."""
    from concurrent.futures import ThreadPoolExecutor

    @with_connection
    def numbers(n: int, conn: Any = None) -> Iterator[int]:
        for i in range(n):
            with pool.connection() as inner:  # joins the generator's own block
                assert inner is conn
                insert(current_connection(pool), table, i)
            yield i

    gen = numbers(40)
    with ThreadPoolExecutor(max_workers=4) as executor:
        got = [executor.submit(next, gen).result(30) for _ in range(40)]
    assert got == list(range(40))
    with pytest.raises(StopIteration):
        next(gen)

    @with_connection
    async def stream(n: int, conn: Any = None) -> AsyncIterator[int]:
        for i in range(n):
            insert(current_connection(pool), table, 100 + i)
            await asyncio.sleep(0)
            yield i

    async def main() -> list[int]:
        agen = stream(10)
        got = [await asyncio.create_task(agen.__anext__()) for _ in range(10)]  # type: ignore[arg-type]
        with pytest.raises(StopAsyncIteration):
            await asyncio.create_task(agen.__anext__())  # type: ignore[arg-type]
        return got

    assert asyncio.run(main()) == list(range(10))
    assert rows(pg_admin, table) == list(range(40)) + list(range(100, 110))
    assert in_use(pool) == 0


def test_abandoned_async_generator_is_closed_by_the_loop(pool: Pool) -> None:
    @with_connection
    async def stream(conn: Any = None) -> AsyncIterator[int]:
        async with pool.connection("replica"):
            for i in range(10):
                yield i

    async def main() -> None:
        agen = stream()
        assert await agen.__anext__() == 0
        assert in_use(pool) == 2
        del agen  # the loop's asyncgen hook schedules aclose()
        for _ in range(1000):
            if in_use(pool) == 0:
                break
            await asyncio.sleep(0.01)

    asyncio.run(main())
    assert in_use(pool) == 0


@pytest.mark.timeout(120)
def test_generator_streamed_through_starlettes_threadpool(
    pool: Pool, pg_admin: Any, table: str
) -> None:
    """A StreamingResponse body: each next() on whichever anyio worker is free."""
    concurrency = pytest.importorskip("starlette.concurrency")

    @with_connection
    def export(conn: Any = None) -> Iterator[int]:
        for i in range(30):
            insert(current_connection(), table, i)
            yield i

    async def main() -> list[int]:
        with pool.connection() as outer:  # the generator joins the endpoint's block
            got = [i async for i in concurrency.iterate_in_threadpool(export())]
            for n in range(30):  # and sequential hand-offs to the same threadpool
                await concurrency.run_in_threadpool(
                    lambda n=n: insert(current_connection(), table, 100 + n)  # in the worker
                )
            assert current_connection() is outer
            return got

    assert asyncio.run(main()) == list(range(30))
    assert rows(pg_admin, table) == list(range(30)) + list(range(100, 130))
    assert in_use(pool) == 0
