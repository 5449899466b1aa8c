"""@with_connection on every callable kind, against a real server."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import inspect
import threading
import warnings
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import psycopg2
import pytest
import wrapt
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import pgctx.pool
from pgctx.decorators import with_connection
from pgctx.errors import NoActiveConnection, ScopeError, TransactionAborted
from pgctx.registry import current_connection, in_scope, set_default_pool
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


# --- kinds hidden behind other decorators ------------------------------------------


def passthrough(func: Any) -> Any:
    """A logging/retry-style decorator: a plain function returning ``func(*a, **kw)``."""

    @functools.wraps(func)
    def logged(*args: Any, **kwargs: Any) -> Any:
        return func(*args, **kwargs)

    return logged


def test_with_connection_above_contextmanager_spans_the_with_body(
    table: str, pool: Pool, pg_admin: Any
) -> None:
    events: list[str] = []

    @with_connection
    @contextlib.contextmanager
    def unit(x: int, conn: Any = None) -> Iterator[Any]:
        insert(conn, table, x)
        try:
            yield conn
        finally:
            events.append(f"inner exit, in_use={in_use(pool)}")  # still inside the block

    with unit(1) as conn:
        assert in_use(pool) == 1 and current_connection() is conn
        insert(conn, table, 2)
        assert rows(pg_admin, table) == []  # not committed before the with body ends
    assert rows(pg_admin, table) == [1, 2]
    assert events == ["inner exit, in_use=1"] and in_use(pool) == 0

    with pytest.raises(ZeroDivisionError), unit(3) as conn:
        insert(conn, table, 4)
        raise ZeroDivisionError
    assert rows(pg_admin, table) == [1, 2]  # rolled back
    assert in_use(pool) == 0


def test_with_connection_above_contextmanager_that_suppresses(
    table: str, pool: Pool, pg_admin: Any
) -> None:
    @with_connection
    @passthrough
    @contextlib.contextmanager
    def tolerant(conn: Any = None) -> Iterator[Any]:
        try:
            yield conn
        except KeyError:
            insert(conn, table, 9)  # handled inside: the unit goes on and commits

    with tolerant() as conn:
        insert(conn, table, 1)
        raise KeyError("handled by the context manager")
    assert rows(pg_admin, table) == [1, 9]
    assert in_use(pool) == 0


def test_with_connection_above_asynccontextmanager_spans_the_body(
    table: str, pool: Pool, pg_admin: Any
) -> None:
    class Repo:
        @with_connection
        @classmethod
        @contextlib.asynccontextmanager
        async def unit(cls, conn: Any = None) -> AsyncIterator[Any]:
            yield conn

    async def main() -> None:
        async with Repo.unit() as conn:
            await asyncio.sleep(0)
            assert in_use(pool) == 1 and current_connection() is conn
            insert(conn, table, 1)
        assert in_use(pool) == 0
        with pytest.raises(ValueError):
            async with Repo.unit() as conn:
                insert(conn, table, 2)
                raise ValueError

    asyncio.run(main())
    assert rows(pg_admin, table) == [1]
    assert in_use(pool) == 0


def test_a_passthrough_wrapper_gets_the_kind_it_hides(
    table: str, pool: Pool, pg_admin: Any
) -> None:
    @with_connection
    @passthrough
    def numbers(conn: Any = None) -> Iterator[int]:
        for i in range(3):
            assert in_use(pool) == 1 and current_connection() is conn
            insert(conn, table, i)
            yield i

    @with_connection
    @passthrough
    async def one(conn: Any = None) -> int:
        await asyncio.sleep(0)
        assert in_use(pool) == 1 and current_connection() is conn
        insert(conn, table, 10)
        return 10

    @with_connection
    @passthrough
    async def stream(conn: Any = None) -> AsyncIterator[int]:
        for i in (20, 21):
            await asyncio.sleep(0)
            assert in_use(pool) == 1 and current_connection() is conn
            insert(conn, table, i)
            yield i

    assert list(numbers()) == [0, 1, 2]
    assert asyncio.run(one()) == 10

    async def drain() -> list[int]:
        return [i async for i in stream()]

    assert asyncio.run(drain()) == [20, 21]
    assert rows(pg_admin, table) == [0, 1, 2, 10, 20, 21]
    assert in_use(pool) == 0


def _returns(kind: str) -> Any:
    """An object whose code runs only later: what a hidden lazy callable returns."""

    async def coroutine() -> None:
        raise AssertionError("must never run")

    def generator() -> Iterator[int]:
        raise AssertionError("must never run")
        yield 0

    async def async_generator() -> AsyncIterator[int]:
        raise AssertionError("must never run")
        yield 0

    made = {
        "coroutine": coroutine,
        "generator": generator,
        "async generator": async_generator,
        "contextmanager": contextlib.contextmanager(generator),
        "asynccontextmanager": contextlib.asynccontextmanager(async_generator),
    }[kind]
    return made()


LAZY = ["coroutine", "generator", "async generator", "contextmanager", "asynccontextmanager"]


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(kind=st.sampled_from(LAZY), work_first=st.booleans(), nested=st.booleans())
def test_a_plain_function_that_returns_a_lazy_object_is_refused(
    table: str, pool: Pool, pg_admin: Any, kind: str, work_first: bool, nested: bool
) -> None:
    """No __wrapped__ to follow: only the returned object shows the mistake. The block
    ends by rolling back, the object is closed (no 'never awaited' warning)."""
    with pg_admin.cursor() as cur:
        cur.execute(f"DELETE FROM {table}")

    @with_connection
    def hides(conn: Any = None) -> Any:
        if work_first:
            insert(conn, table, 1)
        return _returns(kind)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with contextlib.ExitStack() as stack:
            if nested:
                stack.enter_context(pytest.raises(TransactionAborted))
                stack.enter_context(pool.connection())
            with pytest.raises(TypeError, match="returned") as info:
                hides()
        gc.collect()
    assert kind.split()[0] in str(info.value)
    assert [w for w in caught if issubclass(w.category, RuntimeWarning)] == []
    assert rows(pg_admin, table) == []
    assert in_use(pool) == 0


def test_combinations_that_cannot_be_covered_are_refused_when_decorating() -> None:
    def gen(conn: Any = None) -> Iterator[int]:
        yield 1

    @functools.wraps(gen)
    async def async_over_generator(*args: Any, **kwargs: Any) -> Any:
        return gen(*args, **kwargs)

    async def coro(conn: Any = None) -> None:
        pass

    @functools.wraps(coro)
    def generator_over_coroutine(*args: Any, **kwargs: Any) -> Iterator[Any]:
        yield coro(*args, **kwargs)

    for refused in (async_over_generator, generator_over_coroutine):
        with pytest.raises(TypeError, match="directly above"):
            with_connection(refused)
    with pytest.raises(TypeError, match="lru_cache"):

        @with_connection
        @functools.lru_cache
        def cached(x: int, conn: Any = None) -> int:
            return x


@pytest.mark.skipif(not hasattr(wrapt, "mark_as_sync"), reason="wrapt without markers")
def test_wrapt_markers_say_the_real_kind(table: str, pool: Pool, pg_admin: Any) -> None:
    def run_to_completion(func: Any) -> Any:  # hides an async def behind a sync call
        @functools.wraps(func)
        def run(*args: Any, **kwargs: Any) -> Any:
            return asyncio.run(func(*args, **kwargs))

        return run

    @with_connection
    @wrapt.mark_as_sync
    @run_to_completion
    async def sync_in_truth(conn: Any = None) -> int:
        insert(conn, table, 1)
        return 1

    def later(func: Any) -> Any:  # a plain def returning a coroutine, no __wrapped__
        def call(*args: Any, **kwargs: Any) -> Any:
            return func(*args, **kwargs)

        return call

    async def body() -> int:
        await asyncio.sleep(0)
        assert in_use(pool) == 1  # still inside the block after an await
        insert(current_connection(), table, 2)
        return 2

    async_in_truth = with_connection(wrapt.mark_as_async(later(body)))
    assert inspect.iscoroutinefunction(async_in_truth)
    assert sync_in_truth() == 1
    assert asyncio.run(async_in_truth()) == 2
    assert rows(pg_admin, table) == [1, 2]
    assert in_use(pool) == 0


# --- where `conn` goes, for every callable shape --------------------------------------

PARAMS = {"first": "conn, a, b", "last": "a, b, conn=None", "kwonly": "a, b, *, conn=None"}
POSITIONAL = {"first": ["conn", "a", "b"], "last": ["a", "b", "conn"], "kwonly": ["a", "b"]}
EXPLICIT = object()  # a caller's own "connection": used as given, no block opened


def _report(bound: Any, conn: Any, a: Any, b: Any) -> tuple[Any, ...]:
    current = current_connection() if in_scope() else None
    return bound, conn, a, b, current


def _raw(placement: str, first: str | None) -> Any:
    """``def f([first,] <params of placement>)`` reporting what it received."""
    prefix = f"{first}, " if first else ""
    namespace: dict[str, Any] = {"report": _report}
    exec(  # a function per signature shape; the body is the same for all
        f"def f({prefix}{PARAMS[placement]}):\n    return report({first}, conn, a, b)\n",
        namespace,
    )
    return namespace["f"]


def _shape(name: str, placement: str, pool: Pool) -> tuple[Any, tuple[Any, ...], Any]:
    """(callable to call, arguments to put first, what it must see as self/cls/tag)."""
    deco = with_connection(pool)
    if name == "function":
        return deco(_raw(placement, None)), (), None
    if name == "partial":
        return deco(functools.partial(_raw(placement, "tag"), "p")), (), "p"
    if name == "callable object":
        obj = type("Callable", (), {"__call__": _raw(placement, "self")})()
        wrapped = deco(obj)
        assert inspect.signature(wrapped) == inspect.signature(obj)
        return wrapped, (), obj
    cls: Any = type(
        "Shapes",
        (),
        {
            "method": deco(_raw(placement, "self")),
            "raw": _raw(placement, "self"),
            "klass": deco(classmethod(_raw(placement, "cls"))),
            "klass_inside": classmethod(deco(_raw(placement, "cls"))),
            "static": deco(staticmethod(_raw(placement, None))),
            "static_inside": staticmethod(deco(_raw(placement, None))),
            "partial": deco(functools.partial(_raw(placement, "tag"), "p")),
        },
    )
    obj = cls()
    return {
        "method via instance": (obj.method, (), obj),
        "method via class": (cls.method, (obj,), obj),
        "bound method": (deco(obj.raw), (), obj),
        "partial of a bound method": (deco(functools.partial(obj.raw)), (), obj),
        "partial in a class, via instance": (obj.partial, (), "p"),
        "classmethod": (cls.klass, (), cls),
        "classmethod via instance": (obj.klass, (), cls),
        "classmethod, decorator inside": (cls.klass_inside, (), cls),
        "staticmethod": (cls.static, (), None),
        "staticmethod via instance": (obj.static, (), None),
        "staticmethod, decorator inside": (obj.static_inside, (), None),
    }[name]


SHAPES = [
    "function",
    "partial",
    "callable object",
    "method via instance",
    "method via class",
    "bound method",
    "partial of a bound method",
    "partial in a class, via instance",
    "classmethod",
    "classmethod via instance",
    "classmethod, decorator inside",
    "staticmethod",
    "staticmethod via instance",
    "staticmethod, decorator inside",
]


@st.composite
def calls(draw: Any) -> tuple[str, str, int, str]:
    placement = draw(st.sampled_from(sorted(PARAMS)))
    positional = POSITIONAL[placement]
    n_pos = draw(st.integers(0, len(positional)))
    conn_positional = "conn" in positional[:n_pos]
    conn = draw(
        st.sampled_from(
            ["none", "explicit"] if conn_positional else ["omitted", "none", "explicit"]
        )
    )
    return draw(st.sampled_from(SHAPES)), placement, n_pos, conn


@pytest.mark.filterwarnings("ignore:functools.partial will be a method descriptor:FutureWarning")
@settings(
    max_examples=400,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(call=calls())
def test_conn_goes_where_it_belongs_for_every_callable_shape(
    pool: Pool, call: tuple[str, str, int, str]
) -> None:
    """Each call sees the right ``conn`` (the block's, or the caller's own) and the right
    other arguments, whatever the callable's shape and however ``conn`` is passed."""
    shape, placement, n_pos, conn_style = call
    func, first_args, bound = _shape(shape, placement, pool)
    values = {"a": "A", "b": "B", "conn": None if conn_style == "none" else EXPLICIT}
    names = POSITIONAL[placement]
    args = [*first_args, *(values[n] for n in names[:n_pos])]
    kwargs = {n: values[n] for n in ("a", "b") if n not in names[:n_pos]}
    if "conn" not in names[:n_pos] and conn_style != "omitted":
        kwargs["conn"] = values["conn"]
    got_bound, got_conn, a, b, current = func(*args, **kwargs)
    assert (a, b) == ("A", "B")
    assert got_bound is bound
    if conn_style == "explicit":
        assert got_conn is EXPLICIT and current is None  # used as given, no block
    else:
        assert got_conn is not None and got_conn is current  # the block's connection
    assert in_use(pool) == 0


@wrapt.decorator
def wrapt_passthrough(wrapped: Any, instance: Any, args: Any, kwargs: Any) -> Any:
    return wrapped(*args, **kwargs)


class Units:
    """@with_connection and context managers stacked with other decorators, every order."""

    def __init__(self, table: str) -> None:
        self.table = table

    @with_connection
    @wrapt_passthrough
    @contextlib.contextmanager
    def through_wrapt(self, x: int, conn: Any = None) -> Iterator[Any]:
        insert(conn, self.table, x)
        yield conn

    @classmethod
    @with_connection
    @contextlib.contextmanager
    def inside_classmethod(cls, conn: Any = None) -> Iterator[Any]:
        yield conn

    @with_connection
    @staticmethod
    @passthrough
    @contextlib.contextmanager
    def static(conn: Any = None) -> Iterator[Any]:
        yield conn

    @with_connection
    @passthrough
    @contextlib.asynccontextmanager
    async def async_unit(self, x: int, conn: Any = None) -> AsyncIterator[Any]:
        insert(conn, self.table, x)
        yield conn


def test_context_managers_stacked_with_other_decorators(
    table: str, pool: Pool, pg_admin: Any
) -> None:
    units = Units(table)
    for enter in (
        lambda: units.through_wrapt(1),
        lambda: Units.through_wrapt(units, 2),
        Units.inside_classmethod,
        units.inside_classmethod,
        Units.static,
        units.static,
    ):
        with enter() as conn:
            assert conn is not None and current_connection() is conn and in_use(pool) == 1
        assert in_use(pool) == 0

    async def main() -> None:
        async with units.async_unit(3) as conn:
            assert current_connection() is conn and in_use(pool) == 1

    asyncio.run(main())
    assert rows(pg_admin, table) == [1, 2, 3]
    with pool.connection() as outer:  # inside a block, they join it
        with units.through_wrapt(4) as conn:
            assert conn is outer
        assert rows(pg_admin, table) == [1, 2, 3]
    assert rows(pg_admin, table) == [1, 2, 3, 4]


def test_a_context_manager_block_inside_a_generator_is_hidden_from_its_consumer(
    table: str, pool: Pool
) -> None:
    units = Units(table)

    def producer() -> Iterator[Any]:
        with units.through_wrapt(1) as conn:
            assert current_connection() is conn
            yield conn
            assert current_connection() is conn  # the generator's own block, again

    gen = producer()
    conn = next(gen)
    assert in_use(pool) == 1
    with pytest.raises(NoActiveConnection):
        current_connection()  # the consumer is not inside the generator's block
    with pytest.raises(StopIteration):
        next(gen)
    assert in_use(pool) == 0 and conn is not None


def test_cache_above_with_connection_skips_the_block_on_a_hit(pool: Pool) -> None:
    calls: list[Any] = []

    @functools.lru_cache
    @with_connection
    def lookup(x: int, conn: Any = None) -> int:
        calls.append(conn)
        return x * 2

    assert lookup(2) == 4 and lookup(2) == 4
    assert len(calls) == 1 and calls[0] is not None
    assert in_use(pool) == 0


def test_contextmanager_above_with_connection_holds_the_block_from_enter_to_exit(
    table: str, pool: Pool, pg_admin: Any
) -> None:
    """The other order works too, as a generator: the with body gets the yielded
    connection, but is not inside the generator's block (so code there that asks for
    the current connection does not join it)."""

    @contextlib.contextmanager
    @with_connection
    def unit(conn: Any = None) -> Iterator[Any]:
        yield conn

    with unit() as conn:
        assert in_use(pool) == 1
        insert(conn, table, 1)
        assert not in_scope()
    assert rows(pg_admin, table) == [1]
    assert in_use(pool) == 0


def test_a_context_manager_that_fails_ends_the_block(table: str, pool: Pool, pg_admin: Any) -> None:
    @with_connection
    @contextlib.contextmanager
    def fails_on_enter(conn: Any = None) -> Iterator[Any]:
        insert(conn, table, 1)
        raise KeyError("before yield")
        yield conn

    @with_connection
    @contextlib.contextmanager
    def fails_on_exit(conn: Any = None) -> Iterator[Any]:
        yield conn
        raise ValueError("after the body")

    @with_connection
    @contextlib.contextmanager
    def yields_twice(conn: Any = None) -> Iterator[Any]:
        yield conn
        yield conn

    with pytest.raises(KeyError), fails_on_enter():
        raise AssertionError("not reached")
    with pytest.raises(ValueError), fails_on_exit() as conn:
        insert(conn, table, 2)
    with pytest.raises(RuntimeError, match="didn't stop"), yields_twice() as conn:
        insert(conn, table, 3)
    assert rows(pg_admin, table) == []  # every one rolled back
    assert in_use(pool) == 0
    unit = fails_on_exit()
    with pytest.raises(ValueError), unit:
        pass
    with pytest.raises(ScopeError, match="only once"), unit:
        pass
    assert in_use(pool) == 0


def test_a_wrapper_that_does_not_return_what_it_wraps_is_caught(
    table: str, pool: Pool, pg_admin: Any
) -> None:
    def collect(func: Any) -> Any:  # claims to be `func`, but consumes the generator
        @functools.wraps(func)
        def listed(*args: Any, **kwargs: Any) -> Any:
            return list(func(*args, **kwargs))

        return listed

    @with_connection
    @collect
    def numbers(conn: Any = None) -> Iterator[int]:
        insert(conn, table, 1)
        yield 1

    gen = numbers()
    with pytest.raises(TypeError, match="mark_as_sync"):
        next(gen)
    assert rows(pg_admin, table) == [] and in_use(pool) == 0

    @with_connection
    async def forgot_await(conn: Any = None) -> Any:
        async def inner() -> None:
            insert(conn, table, 2)

        return inner()  # a coroutine handed out of the block, never run

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(TypeError, match="returned a coroutine"):
            asyncio.run(forgot_await())
        gc.collect()
    assert [w for w in caught if issubclass(w.category, RuntimeWarning)] == []
    assert rows(pg_admin, table) == [] and in_use(pool) == 0


# --- every stacking order, driven for real --------------------------------------------

LAYERS: dict[str, Callable[[Any], Any]] = {
    "functools.wraps": passthrough,
    "wrapt": wrapt_passthrough,
    "partial": functools.partial,
}


def _bases(check: Callable[[Any], None]) -> dict[str, Any]:
    def plain(*lead: Any, conn: Any = None) -> str:
        check(conn)
        return "done"

    async def coro(*lead: Any, conn: Any = None) -> str:
        await asyncio.sleep(0)
        check(conn)
        return "done"

    def gen(*lead: Any, conn: Any = None) -> Iterator[str]:
        check(conn)
        yield "done"
        check(conn)

    async def agen(*lead: Any, conn: Any = None) -> AsyncIterator[str]:
        check(conn)
        await asyncio.sleep(0)
        yield "done"
        check(conn)

    return {
        "plain": plain,
        "async def": coro,
        "generator": gen,
        "async generator": agen,
        "contextmanager": contextlib.contextmanager(gen),
        "asynccontextmanager": contextlib.asynccontextmanager(agen),
    }


def _drive(kind: str, func: Any, check: Callable[[Any], None]) -> None:
    if kind == "plain":
        assert func() == "done"
    elif kind == "async def":
        assert asyncio.run(func()) == "done"
    elif kind == "generator":
        assert list(func()) == ["done"]
    elif kind == "async generator":

        async def drain() -> list[str]:
            return [x async for x in func()]

        assert asyncio.run(drain()) == ["done"]
    elif kind == "contextmanager":
        with func() as value:
            assert value == "done"
            check(current_connection())  # the with body is inside the block
    else:

        async def enter() -> None:
            async with func() as value:
                assert value == "done"
                check(current_connection())

        asyncio.run(enter())


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    kind=st.sampled_from(
        [
            "plain",
            "async def",
            "generator",
            "async generator",
            "contextmanager",
            "asynccontextmanager",
        ]
    ),
    layers=st.lists(st.sampled_from(sorted(LAYERS)), max_size=3),
    descriptor=st.sampled_from([None, "classmethod", "staticmethod"]),
    via_instance=st.booleans(),
)
def test_every_stacking_order_covers_the_body(
    pool: Pool, kind: str, layers: list[str], descriptor: str | None, via_instance: bool
) -> None:
    def check(conn: Any) -> None:
        assert conn is not None and current_connection() is conn and in_use(pool) == 1

    func = _bases(check)[kind]
    for layer in layers:
        func = LAYERS[layer](func)
    if descriptor is None:
        decorated = with_connection(pool)(func)
    else:
        wrap = classmethod if descriptor == "classmethod" else staticmethod
        holder = type("Holder", (), {"f": with_connection(pool)(wrap(func))})
        decorated = holder().f if via_instance else holder.f
    _drive(kind, decorated, check)


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
