"""Subclasses that override psycopg2's pool hooks (``pgctx.hooks``), on a real server.

Tests taking ``module`` run the same subclass body on ``psycopg2.pool`` and on
``pgctx.pool``: the behaviour must be the same (the differential test in
test_pool.py compares whole operation sequences with logged hook calls). The
others cover what only pgctx has: waiting (``timeout=``), ``connection()``
blocks, ``PersistentConnectionPool``, configure/statistics, and class creation.
"""

from __future__ import annotations

import inspect
import random
import threading
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import psycopg2
import psycopg2.pool
import pytest

import pgctx.pool
from pgctx.basepool import AbstractConnectionPool as BaseAbstract
from pgctx.errors import PoolError, PoolTimeout
from pgctx.poolcore import PoolCore
from tests.differential import HOOKS, recording_subclass
from tests.helpers import unique_app, wait_backends, wait_until

GENEROUS = 30.0  # bound for things that happen within milliseconds when all is well
MODULES = [pytest.param(psycopg2.pool, id="psycopg2"), pytest.param(pgctx.pool, id="pgctx")]
CLASSES = ["SimpleConnectionPool", "ThreadedConnectionPool"]


@pytest.fixture
def app() -> str:
    return unique_app("hooks")


@pytest.fixture
def pools() -> Iterator[list[Any]]:
    """Pools to close at teardown, whatever the test left."""
    made: list[Any] = []
    yield made
    for pool in made:
        if not pool.closed:
            pool.closeall()


def scoped(module: Any) -> type:
    """The Threaded class of ``module`` with connection() blocks (pgctx's already has them)."""
    cls = module.ThreadedConnectionPool
    if module is pgctx.pool:
        return cls  # type: ignore[no-any-return]
    return type("Scoped", (pgctx.ConnectionScopesMixin, cls), {})


def lock_is_free(pool: Any) -> bool:
    """Whether another thread could take the pool's lock right now."""

    def try_lock(i: int) -> bool:
        if not pool._lock.acquire(blocking=False):
            return False
        pool._lock.release()
        return True

    return bool(run_threads(1, try_lock)[0])


def run_threads(count: int, target: Callable[[int], Any]) -> list[Any]:
    """Run ``target(i)`` in ``count`` threads; their results (or exceptions), in order."""
    results: list[Any] = [None] * count

    def run(i: int) -> None:
        try:
            results[i] = target(i)
        except BaseException as exc:
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(GENEROUS)
    assert not any(t.is_alive() for t in threads), "a thread is stuck"
    return results


# ---------------------------------------------------------------------------------
# The patterns of real projects, rewritten minimally
# ---------------------------------------------------------------------------------


def overflow_pool(base: type) -> type:
    """openGauss-DBMind's pattern: when exhausted, open one extra connection instead."""

    class OverflowPool(base):  # type: ignore[valid-type,misc]
        def _getconn(self, key: Any = None) -> Any:
            if len(self._used) >= self.maxconn:  # answering matters more than the limit
                if key is None:
                    key = self._getkey()
                return self._connect(key)
            return super()._getconn(key)

    return OverflowPool


@pytest.mark.parametrize("module", MODULES)
def test_overflow_getconn_answers_every_caller(
    module: Any, dsn: str, app: str, pg_admin: Any, pools: list[Any]
) -> None:
    # 4 threads on maxconn=2, each holding its connection until all 4 have one.
    pool = overflow_pool(module.ThreadedConnectionPool)(1, 2, dsn, application_name=app)
    pools.append(pool)
    all_in = threading.Barrier(4, timeout=GENEROUS)

    def query(i: int) -> int:
        conn = pool.getconn()
        try:
            with conn.cursor() as cur:
                cur.execute("SELECT %s", (i,))
                (value,) = cur.fetchone()
            all_in.wait()
            return int(value)
        finally:
            pool.putconn(conn)

    assert run_threads(4, query) == [0, 1, 2, 3]
    assert len(pool._used) == 0
    assert wait_backends(pg_admin, app, 1) == 1  # the extra ones were closed on return


@pytest.mark.parametrize("module", MODULES)
def test_overflow_getconn_inside_connection_blocks(
    module: Any, dsn: str, app: str, pools: list[Any]
) -> None:
    pool = overflow_pool(scoped(module))(0, 1, dsn, application_name=app)
    pools.append(pool)
    with pool.connection() as first, pool.connection(separate=True) as second:
        assert first is not second  # the second block got the overflow connection
        with second.cursor() as cur:
            cur.execute("SELECT 1")
    assert len(pool._used) == 0


@pytest.mark.parametrize("module", MODULES)
def test_connection_blocks_go_through_the_hooks(
    module: Any, dsn: str, app: str, pools: list[Any]
) -> None:
    cls = recording_subclass(scoped(module), frozenset({"_getconn", "_putconn"}))
    pool = cls(0, 1, dsn, application_name=app)
    pools.append(pool)
    with pool.connection() as conn, conn.cursor() as cur:
        cur.execute("SELECT 1")
    assert [(hook, args) for hook, args, _ in pool.hook_log] == [
        ("_getconn", (None,)),
        ("_putconn", (conn, None, False)),
    ]


def authenticating_mixin(base: type) -> type:
    """approzium's pattern: connect through an authenticator given as an extra keyword."""

    class AuthenticatingPool(base):  # type: ignore[valid-type,misc]
        def _connect(self, key: Any = None) -> Any:
            kwargs = dict(self._kwargs)
            authenticator = kwargs.pop("authenticator")
            conn = psycopg2.connect(*self._args, **authenticator(kwargs))
            if key is not None:
                self._used[key] = conn
                self._rused[id(conn)] = key
            else:
                self._pool.append(conn)
            return conn

    return AuthenticatingPool


class Authenticator:
    """Hands out the connect arguments (a real one would add a password); logs its calls."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        self.calls += 1
        return kwargs


@pytest.mark.parametrize("module", MODULES)
@pytest.mark.parametrize("cls_name", CLASSES)
def test_authenticating_connect_opens_every_connection(
    module: Any, cls_name: str, dsn: str, app: str, pg_admin: Any, pools: list[Any]
) -> None:
    # As approzium does: a mixin on AbstractConnectionPool, put before the pool class.
    mixin = authenticating_mixin(module.AbstractConnectionPool)
    cls = type(f"Authenticating{cls_name}", (mixin, getattr(module, cls_name)), {})
    auth = Authenticator()
    pool = cls(2, 3, dsn, application_name=app, authenticator=auth)  # not a libpq option
    pools.append(pool)
    assert auth.calls == 2
    conns = [pool.getconn() for _ in range(3)]
    assert auth.calls == 3
    assert len({id(c) for c in conns}) == 3
    with pytest.raises(PoolError, match="exhausted"):
        pool.getconn()
    for conn in conns:
        pool.putconn(conn)
    assert (len(pool._pool), len(pool._used), len(pool._rused)) == (2, 0, 0)
    assert wait_backends(pg_admin, app, 2) == 2


def test_unknown_keyword_still_refused_without_connect_override(dsn: str) -> None:
    with pytest.raises(psycopg2.ProgrammingError, match="authenticator"):
        pgctx.pool.ThreadedConnectionPool(0, 1, dsn, authenticator=object())


def test_authenticating_connect_used_by_waiters_and_refill(
    dsn: str, app: str, pg_admin: Any, pools: list[Any]
) -> None:
    # pgctx's own connects (a waiter's slot, the refill to minconn) go through it too.
    mixin = authenticating_mixin(pgctx.pool.AbstractConnectionPool)
    cls = type("AuthThreaded", (mixin, pgctx.pool.ThreadedConnectionPool), {})
    auth = Authenticator()
    pool = cls(1, 1, dsn, application_name=app, authenticator=auth, timeout=GENEROUS)
    pools.append(pool)
    conn = pool.getconn()
    got: list[Any] = []
    waiter = threading.Thread(target=lambda: got.append(pool.getconn()))
    waiter.start()
    assert wait_until(lambda: len(pool._waiters) == 1)
    pool.putconn(conn, close=True)  # frees the slot: the waiter connects
    waiter.join(GENEROUS)
    assert got and got[0] is not conn and auth.calls >= 2
    pool.putconn(got[0], close=True)
    pool._maintain()  # what the maintenance thread does: back to minconn
    assert len(pool._pool) == 1
    assert auth.calls == pool.get_stats()["connections_num"] >= 3  # every one through it
    assert wait_backends(pg_admin, app, 1) == 1


def semaphore_recipe(base: type) -> type:
    """The gevent recipe's shape: its own semaphore around the unlocked hooks."""

    class SemaphorePool(base):  # type: ignore[valid-type,misc]
        def __init__(self, minconn: int, maxconn: int, *args: Any, **kwargs: Any) -> None:
            self._semaphore = threading.BoundedSemaphore(maxconn)
            super().__init__(minconn, maxconn, *args, **kwargs)

        def getconn(self, *args: Any, **kwargs: Any) -> Any:
            self._semaphore.acquire()
            try:
                return self._getconn(*args, **kwargs)
            except BaseException:
                self._semaphore.release()
                raise

        def putconn(self, *args: Any, **kwargs: Any) -> None:
            try:
                self._putconn(*args, **kwargs)
            finally:
                self._semaphore.release()

        def closeall(self) -> None:
            self._closeall()

    return SemaphorePool


@pytest.mark.parametrize("module", MODULES)
def test_semaphore_recipe_calling_the_hooks(
    module: Any, dsn: str, app: str, pools: list[Any]
) -> None:
    pool = semaphore_recipe(module.AbstractConnectionPool)(1, 2, dsn, application_name=app)
    pools.append(pool)

    def work(i: int) -> int:
        conn = pool.getconn()
        try:
            with conn.cursor() as cur:
                cur.execute("SELECT %s", (i,))
                return int(cur.fetchone()[0])
        finally:
            pool.putconn(conn)

    assert run_threads(6, work) == list(range(6))
    assert len(pool._used) == 0
    pool.closeall()
    assert pool.closed


@pytest.mark.parametrize("module", MODULES)
def test_semaphore_recipe_with_a_connect_override(
    module: Any, dsn: str, app: str, pools: list[Any]
) -> None:
    # The recipe's _getconn reaches the authenticating _connect of a mixin.
    mixin = authenticating_mixin(module.AbstractConnectionPool)
    cls = type("AuthSemaphore", (mixin, semaphore_recipe(module.AbstractConnectionPool)), {})
    auth = Authenticator()
    pool = cls(0, 2, dsn, application_name=app, authenticator=auth)
    pools.append(pool)
    first, second = pool.getconn(), pool.getconn()
    assert auth.calls == 2
    pool.putconn(first)
    pool.putconn(second)


# ---------------------------------------------------------------------------------
# pgctx's options and classes with overrides
# ---------------------------------------------------------------------------------


def test_getconn_override_waits_with_the_lock_released(
    dsn: str, app: str, pools: list[Any]
) -> None:
    # psycopg2 calls _getconn under the lock: with timeout=, pgctx's _getconn must
    # not keep it while waiting, or the connection it waits for could never come back.
    cls = recording_subclass(pgctx.pool.ThreadedConnectionPool, frozenset({"_getconn"}))
    pool = cls(0, 1, dsn, application_name=app, timeout=GENEROUS)
    pools.append(pool)
    held = pool.getconn()
    got = run_in_thread_when(pool, lambda: pool.getconn(), lambda: pool.putconn(held))
    assert got is held
    assert [entry[0] for entry in pool.hook_log] == ["_getconn", "_getconn"]
    pool.putconn(got)


def run_in_thread_when(pool: Any, call: Callable[[], Any], then: Callable[[], Any]) -> Any:
    """Start ``call`` in a thread; once it waits in the pool, run ``then``; ``call``'s result."""
    box: list[Any] = []
    thread = threading.Thread(target=lambda: box.append(call()))
    thread.start()
    assert wait_until(lambda: len(pool._waiters) == 1, GENEROUS)
    then()
    thread.join(GENEROUS)
    assert not thread.is_alive(), "the waiter never got the connection"
    return box[0]


def test_code_calling_getconn_under_the_lock_can_wait(dsn: str, app: str, pools: list[Any]) -> None:
    pool = pgctx.pool.ThreadedConnectionPool(0, 1, dsn, application_name=app, timeout=GENEROUS)
    pools.append(pool)
    held = pool.getconn()

    def locked_getconn() -> Any:
        with pool._lock, pool._lock:  # held twice: let go of entirely, then held twice again
            conn = pool._getconn()
            assert pool._lock._is_owned()
        assert not pool._lock._is_owned()
        return conn

    assert run_in_thread_when(pool, locked_getconn, lambda: pool.putconn(held)) is held
    pool.putconn(held)


def test_per_call_timeout_reaches_pgctx_getconn(dsn: str, app: str, pools: list[Any]) -> None:
    cls = recording_subclass(pgctx.pool.ThreadedConnectionPool, frozenset({"_getconn"}))
    pool = cls(0, 1, dsn, application_name=app, timeout=10 * GENEROUS)
    pools.append(pool)
    held = pool.getconn()
    # Without the per-call timeout, this would wait 300 s (and the thread be stuck).
    [error] = run_threads(1, lambda i: pool.getconn(timeout=0.01))
    assert isinstance(error, PoolTimeout)
    assert not pool._getconn_timeouts  # the per-call entry is gone
    pool.putconn(held)


@pytest.mark.parametrize("timeout", [None, GENEROUS])
def test_getconn_override_keeps_the_lock_unless_it_may_wait(
    dsn: str, app: str, pools: list[Any], timeout: float | None
) -> None:
    # psycopg2 holds the lock throughout _getconn, connect included: an override's code
    # around super() sees no other thread's work in between. pgctx keeps it too, but
    # with a timeout (a wait) it must let go, like Condition.wait.
    held_while_connecting: list[bool] = []

    class Probe(pgctx.pool.ThreadedConnectionPool):
        def _getconn(self, key: Any = None) -> Any:
            conn = super()._getconn(key)
            assert self._lock._is_owned()
            return conn

    pool = Probe(
        0,
        1,
        dsn,
        application_name=app,
        timeout=timeout,
        configure=lambda conn: held_while_connecting.append(pool._lock._is_owned()),
    )
    pools.append(pool)
    pool.putconn(pool.getconn())
    assert held_while_connecting == [timeout is None]


@pytest.mark.parametrize("module", MODULES)
def test_connect_override_runs_under_the_lock(
    module: Any, dsn: str, app: str, pools: list[Any]
) -> None:
    observed: list[bool] = []

    class Checking(module.ThreadedConnectionPool):  # type: ignore[name-defined,misc]
        def _connect(self, key: Any = None) -> Any:
            observed.append(lock_is_free(self))
            return super()._connect(key)

    pool = Checking(0, 2, dsn, application_name=app)
    pools.append(pool)
    pool.putconn(pool.getconn())
    assert observed == [False]


def test_persistent_pool_subclass_goes_through_the_hooks(
    dsn: str, app: str, pools: list[Any]
) -> None:
    cls = recording_subclass(pgctx.pool.PersistentConnectionPool, frozenset(HOOKS))
    pool = cls(1, 2, dsn, application_name=app)
    pools.append(pool)
    conn = pool.getconn()
    assert pool.getconn() is conn
    key = pool._rused[id(conn)]
    assert key is pool._thread_key()
    [error] = run_threads(1, lambda i: pool.putconn(conn))
    assert isinstance(error, PoolError)  # another thread's connection: refused as before
    pool.putconn()
    pool.closeall()
    calls = [(hook, args) for hook, args, _ in pool.hook_log]
    assert calls == [
        ("_connect", ()),
        ("_getconn", (key,)),
        ("_getconn", (key,)),
        ("_putconn", (conn, key, False)),
        ("_closeall", ()),
    ]


@pytest.mark.parametrize("calls_super", [True, False], ids=["super", "own-connect"])
def test_configure_and_stats_once_per_connection(
    dsn: str, app: str, pools: list[Any], calls_super: bool
) -> None:
    configured: list[Any] = []

    class Own(pgctx.pool.ThreadedConnectionPool):
        def _connect(self, key: Any = None) -> Any:
            if calls_super:
                return super()._connect(key)
            return psycopg2.connect(*self._args, **self._kwargs)  # registers nothing

    pool = Own(1, 2, dsn, application_name=app, configure=configured.append)
    pools.append(pool)
    conns = [pool.getconn(), pool.getconn()]
    assert configured == conns  # the prefilled one first, each once
    stats = pool.get_stats()
    assert (stats["connections_num"], stats["connections_errors"]) == (2, 0)
    assert (len(pool._pool), len(pool._used)) == (0, 2)
    for conn in conns:
        pool.putconn(conn)


def test_connect_override_returning_none_is_refused(dsn: str, app: str, pools: list[Any]) -> None:
    class Broken(pgctx.pool.ThreadedConnectionPool):
        def _connect(self, key: Any = None) -> Any:
            return None

    with pytest.raises(TypeError, match=r"Broken\._connect\(\) returned None"):
        Broken(1, 2, dsn, application_name=app)
    pool = Broken(0, 2, dsn, application_name=app)
    pools.append(pool)
    with pytest.raises(TypeError, match="returned None"):
        pool.getconn()
    assert (pool._connecting, len(pool._used)) == (0, 0)


def test_connect_override_racing_a_caller_with_the_same_key(
    dsn: str, app: str, pools: list[Any], mocker: Any
) -> None:
    # While a getconn("k") connects (through the override, which registers "k" as
    # psycopg2's _connect does), another caller gets "k" from a returned connection:
    # both must end up with that one, and the pool's maps must stay consistent.
    cls = authenticating_mixin(pgctx.pool.ThreadedConnectionPool)
    pool = cls(1, 2, dsn, application_name=app, authenticator=Authenticator())
    pools.append(pool)
    first = pool.getconn()  # the idle one: the racer has to connect
    reached, go = threading.Event(), threading.Event()
    real = pool._new_connection

    def paused(*args: Any) -> Any:
        reached.set()
        assert go.wait(GENEROUS)
        return real(*args)

    mocker.patch.object(pool, "_new_connection", side_effect=paused)
    got: list[Any] = []
    racer = threading.Thread(target=lambda: got.append(pool.getconn("k")))
    racer.start()
    assert reached.wait(GENEROUS)
    pool.putconn(first)
    assert pool.getconn("k") is first
    go.set()
    racer.join(GENEROUS)
    assert got == [first]
    assert pool._used == {"k": first} and pool._rused == {id(first): "k"}
    pool.putconn(first)
    assert (pool._used, pool._rused, pool._connecting) == ({}, {}, 0)


class Interrupt(BaseException):
    pass


def test_interrupt_in_connect_override_leaves_the_pool_consistent(
    dsn: str, app: str, pools: list[Any]
) -> None:
    class Interrupted(pgctx.pool.ThreadedConnectionPool):
        fail = True

        def _connect(self, key: Any = None) -> Any:
            if self.fail:
                raise Interrupt
            return super()._connect(key)

    pool = Interrupted(0, 1, dsn, application_name=app)
    pools.append(pool)
    with pytest.raises(Interrupt):
        pool.getconn()
    assert (pool._connecting, len(pool._used), pool._lock._is_owned()) == (0, 0, False)
    assert lock_is_free(pool)
    pool.fail = False
    pool.putconn(pool.getconn())


@pytest.mark.parametrize("per_call", [False, True], ids=["pool-timeout", "per-call-timeout"])
def test_interrupt_while_the_lock_is_let_go_of(
    dsn: str, app: str, pools: list[Any], per_call: bool
) -> None:
    # An interrupt inside pgctx's _getconn (here in a connect, with the lock let go
    # of for the wait) leaves the lock as the caller had it, and the pool usable.
    failures = [Interrupt()]

    def configure(conn: Any) -> None:
        if failures:
            raise failures.pop()

    cls = recording_subclass(pgctx.pool.ThreadedConnectionPool, frozenset({"_getconn"}))
    pool = cls(0, 1, dsn, application_name=app, timeout=GENEROUS, configure=configure)
    pools.append(pool)
    with pytest.raises(Interrupt):
        pool.getconn(timeout=GENEROUS) if per_call else pool.getconn()
    assert not pool._lock._is_owned() and lock_is_free(pool)
    assert not pool._getconn_timeouts
    assert (pool._connecting, len(pool._used)) == (0, 0)
    pool.putconn(pool.getconn())


def test_abstract_pool_subclass_getconn_goes_through_its_getconn(
    dsn: str, pools: list[Any]
) -> None:
    # psycopg2's AbstractConnectionPool has no getconn; pgctx's routes like Threaded's.
    cls = recording_subclass(pgctx.pool.AbstractConnectionPool, frozenset(HOOKS))
    pool = cls(0, 1, dsn)
    pools.append(pool)
    conn = pool.getconn()
    pool.putconn(conn)
    pool.closeall()
    assert [hook for hook, _, _ in pool.hook_log] == [
        "_getconn",
        "_getkey",
        "_connect",
        "_putconn",
        "_closeall",
    ]


@pytest.mark.parametrize("module", MODULES)
def test_getkey_override_names_the_keys(module: Any, dsn: str, pools: list[Any]) -> None:
    class Named(module.ThreadedConnectionPool):  # type: ignore[name-defined,misc]
        def _getkey(self) -> str:
            self._keys += 1
            return f"job-{self._keys}"

    pool = Named(0, 2, dsn)
    pools.append(pool)
    first, second = pool.getconn(), pool.getconn()
    assert sorted(pool._used) == ["job-1", "job-2"]
    assert pool.getconn("job-1") is first
    pool.putconn(first)
    pool.putconn(second, key="job-2")
    assert pool._used == {}


@pytest.mark.parametrize("module", MODULES)
def test_mixin_overriding_getconn_is_ignored_by_simple_pools(
    module: Any, dsn: str, pools: list[Any]
) -> None:
    # psycopg2 binds SimpleConnectionPool.getconn to the base _getconn: a mixin's
    # override reaches ThreadedConnectionPool.getconn only, even from one mixin class.
    calls: list[str] = []

    class Mixin(module.AbstractConnectionPool):  # type: ignore[name-defined,misc]
        def _getconn(self, key: Any = None) -> Any:
            calls.append(type(self).__name__)
            return super()._getconn(key)

    simple = type("Simple", (Mixin, module.SimpleConnectionPool), {})(0, 1, dsn)
    threaded = type("Threaded", (Mixin, module.ThreadedConnectionPool), {})(0, 1, dsn)
    pools.extend([simple, threaded])
    simple.putconn(simple.getconn())
    threaded.putconn(threaded.getconn())
    assert calls == ["Threaded"]


@pytest.mark.parametrize("timeout", [None, GENEROUS], ids=["no-timeout", "timeout"])
@pytest.mark.parametrize("seed", range(3))
def test_threads_hammering_a_pool_with_every_hook_overridden(
    dsn: str, app: str, pg_admin: Any, pools: list[Any], timeout: float | None, seed: int
) -> None:
    # Random schedules: getconn (with and without keys and per-call timeouts), returns
    # with close=True, rolled-back transactions. Afterwards nothing is leaked.
    recording = recording_subclass(pgctx.pool.ThreadedConnectionPool, frozenset(HOOKS))
    overflow = overflow_pool(recording)
    pool = overflow(1, 3, dsn, application_name=app, timeout=timeout)
    pools.append(pool)

    def worker(i: int) -> int:
        rng = random.Random(seed * 100 + i)
        done = 0
        for _ in range(40):
            key = rng.choice([None, None, f"t{i}"])
            per_call = {"timeout": GENEROUS} if timeout is not None and rng.random() < 0.3 else {}
            conn = pool.getconn(key, **per_call)
            if rng.random() < 0.3:
                conn.cursor().execute("SELECT 1")  # left in a transaction: rolled back
            pool.putconn(conn, close=rng.random() < 0.2)
            done += 1
        return done

    assert run_threads(6, worker) == [40] * 6
    assert (pool._used, pool._rused, pool._connecting) == ({}, {}, 0)
    assert not pool._getconn_timeouts and lock_is_free(pool)
    opened = pool.get_stats()["connections_num"]
    assert opened == sum(1 for hook, _, outcome in pool.hook_log if hook == "_connect")
    assert wait_backends(pg_admin, app, len(pool._pool)) == len(pool._pool) <= 1


# ---------------------------------------------------------------------------------
# Class creation
# ---------------------------------------------------------------------------------


@pytest.mark.parametrize("cls_name", [*CLASSES, "PersistentConnectionPool"])
def test_classes_without_overrides_keep_the_fast_methods(cls_name: str) -> None:
    base = getattr(pgctx.pool, cls_name)
    sub = type("Sub", (base,), {"getconn": base.getconn})  # its own method, no hook
    for cls in (base, sub):
        assert cls._overridden_hooks == frozenset()
        assert cls._checkout is BaseAbstract._checkout
        assert cls.closeall is PoolCore.closeall
    assert "putconn" not in vars(sub) and "_checkout" not in vars(sub)
    assert pgctx.pool.ThreadedConnectionPool.putconn is PoolCore.putconn


def _params(func: Any) -> list[tuple[str, Any, Any]]:
    return [(p.name, p.kind, p.default) for p in inspect.signature(func).parameters.values()]


@pytest.mark.parametrize("cls_name", CLASSES)
@pytest.mark.parametrize("method", ["getconn", "putconn", "closeall"])
def test_methods_of_classes_with_overrides_keep_psycopg2s_signatures(
    cls_name: str, method: str
) -> None:
    ours = recording_subclass(getattr(pgctx.pool, cls_name), frozenset(HOOKS))
    theirs = _params(getattr(getattr(psycopg2.pool, cls_name), method))
    assert _params(getattr(ours, method))[: len(theirs)] == theirs


def test_own_putconn_through_super_with_a_putconn_override_warns() -> None:
    with pytest.warns(RuntimeWarning, match=r"_putconn\(\).*Wrapped\.putconn\(\)") as caught:

        class Wrapped(pgctx.pool.ThreadedConnectionPool):
            def _putconn(self, conn: Any, key: Any = None, close: bool = False) -> None:
                super()._putconn(conn, key, close)

            def putconn(self, *args: Any, **kwargs: Any) -> None:
                super().putconn(*args, **kwargs)

    assert caught[0].filename == __file__  # points at the class statement


def test_own_methods_calling_the_hooks_do_not_warn() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        recipe = semaphore_recipe(pgctx.pool.AbstractConnectionPool)
        overrides = {
            "_putconn": lambda self, *args: BaseAbstract._putconn(self, *args),
            "_closeall": lambda self: BaseAbstract._closeall(self),
        }
        cls = type("WithOverrides", (recipe,), overrides)
    assert cls._overridden_hooks == {"_putconn", "_closeall"}
    assert cls.putconn is recipe.putconn  # the recipe's own, which calls the hooks
