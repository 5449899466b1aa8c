"""``pgctx.pool`` against ``psycopg2.pool`` on a real server.

1. A differential test: hypothesis drives the same operation sequences through
   both modules' pools (the classes themselves, or the same subclass body overriding
   some of psycopg2's hooks and logging their calls) and every observable outcome,
   hook calls included, must agree.
2. One test per psycopg2 defect that pgctx fixes, run on both modules; the
   psycopg2 variant is a strict xfail, proving the defect exists there.
3. The module surface: names, exception identity, class hierarchy, signatures.
"""

from __future__ import annotations

import inspect
import re
import threading
import time
import types
from collections.abc import Callable, Iterator
from typing import Any

import psycopg2
import psycopg2.errors
import psycopg2.extensions
import psycopg2.pool
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import pgctx.pool
from tests.differential import (
    EXPLICIT_KEYS,
    HOOKS,
    OP_KINDS,
    PUT_MODES,
    World,
    settle_backend_counts,
    unique_app,
)

# Generous bound for things that should happen within milliseconds.
GENEROUS = 15.0

CLASSES = ["SimpleConnectionPool", "ThreadedConnectionPool"]

# Where each module looks up psycopg2.connect (the same function object in the end).
CONNECT_TARGET = {
    psycopg2.pool: "psycopg2.pool.psycopg2.connect",
    pgctx.pool: "pgctx.basepool.psycopg2.connect",
}


def both_modules(defect: str, raises: Any) -> list[Any]:
    """psycopg2.pool (strict xfail: the defect is there) and pgctx.pool (fixed)."""
    return [
        pytest.param(
            psycopg2.pool,
            id="psycopg2",
            marks=pytest.mark.xfail(
                strict=True, raises=raises, reason=f"psycopg2.pool defect: {defect}"
            ),
        ),
        pytest.param(pgctx.pool, id="pgctx"),
    ]


def wait_until(predicate: Callable[[], bool], timeout: float = GENEROUS) -> bool:
    """Poll ``predicate`` until true or ``timeout`` passes; return its last value."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return bool(predicate())
        time.sleep(0.005)
    return True


def settled_count(admin: Any, app: str, expected: int) -> int:
    """The backend count of ``app`` once it equals ``expected`` (or after a generous wait)."""
    return settle_backend_counts(admin, {app: expected}, GENEROUS)[app]


@pytest.fixture
def make_pool(dsn: str) -> Iterator[Callable[..., Any]]:
    """Build pools with a unique application_name; close whatever is left at teardown."""
    pools: list[Any] = []

    def make(module: Any, cls_name: str, minconn: int, maxconn: int, app: str) -> Any:
        pool = getattr(module, cls_name)(minconn, maxconn, dsn, application_name=app)
        pools.append(pool)
        return pool

    yield make
    for pool in pools:
        if not pool.closed:
            pool.closeall()


# ---------------------------------------------------------------------------------
# 1. Differential test
# ---------------------------------------------------------------------------------

# Deliberate differences are never generated (each is tested below on its own):
# - D8: putconn with a wrong or unknown explicit key (and ThreadedConnectionPool's
#   putconn(key=k) with conn omitted, an AttributeError in psycopg2): explicit keys
#   are only ever passed for the held connection they belong to;
# - D9: explicit keys that equal psycopg2's automatic int keys (EXPLICIT_KEYS);
# - D5: closing a connection after it was returned (only held ones are closed);
# - D4: rollback failures in putconn (no backend is killed here);
# - D7: minconn > maxconn or negative sizes (sizes are drawn with minconn <= maxconn);
# - timeout= (pgctx only) is never passed.

sizes = st.integers(0, 2).flatmap(lambda lo: st.tuples(st.just(lo), st.integers(lo, 3)))
raw_ops = st.tuples(
    st.sampled_from(OP_KINDS),
    st.integers(0, 7),
    st.sampled_from(PUT_MODES),
    st.sampled_from(EXPLICIT_KEYS),
)


def assert_same_state(admin: Any, ref: World, new: World, step: str) -> None:
    """Both pools, their connections and their server backends agree."""
    assert new.snapshot() == ref.snapshot(), step
    ref_open, new_open = ref.expected_backends(), new.expected_backends()
    assert list(new_open.values()) == list(ref_open.values()), step
    wanted = {**ref_open, **new_open}
    observed = settle_backend_counts(admin, wanted, GENEROUS)
    assert observed[new.app] == observed[ref.app], f"{step}: server backends differ {observed}"
    assert observed == wanted, f"{step}: server backends {observed}, pools hold {wanted}"


@pytest.mark.parametrize("cls_name", CLASSES)
@settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    size=sizes,
    ops=st.lists(raw_ops, min_size=8, max_size=40),
    hooks=st.none() | st.frozensets(st.sampled_from(HOOKS)),
)
def test_differential(
    pg_admin: Any,
    dsn: str,
    cls_name: str,
    size: tuple[int, int],
    ops: list[Any],
    hooks: frozenset[str] | None,
) -> None:
    minconn, maxconn = size
    tag = unique_app("diff")
    event("no subclass" if hooks is None else f"subclass overriding {len(hooks)} hooks")
    ref = World(psycopg2.pool, cls_name, minconn, maxconn, dsn, f"{tag}-psycopg2", hooks)
    try:
        new = World(pgctx.pool, cls_name, minconn, maxconn, dsn, f"{tag}-pgctx", hooks)
    except BaseException:
        ref.cleanup()
        raise
    try:
        created = f"after {cls_name}({minconn}, {maxconn}) overriding {hooks}"
        assert new.hook_calls() == ref.hook_calls(), created
        assert_same_state(pg_admin, ref, new, created)
        for n, raw in enumerate(ops):
            op = ref.resolve(raw)
            assert new.resolve(raw) == op
            step = f"step {n}: {op}"
            before = ref.describe(op)
            outcome = ref.apply(op)
            assert new.apply(op) == outcome, step
            assert new.hook_calls() == ref.hook_calls(), f"{step}: hook calls"
            event(f"{before} -> {outcome[2] if outcome[0] == 'raise' else ref.describe(op)}")
            assert_same_state(pg_admin, ref, new, step)
        # Tear down through the pools themselves: nothing may stay open on the server.
        for world in (ref, new):
            if not world.pool.closed:
                world.pool.closeall()
            assert all(c.closed for c in world.tracked())
            for conn in world.foreign:
                with conn.cursor() as cur:  # never adopted nor closed by the pool
                    cur.execute("SELECT 1")
                conn.close()
        assert new.hook_calls() == ref.hook_calls(), "closeall at the end"
        gone = {ref.app: 0, new.app: 0, ref.foreign_app: 0, new.foreign_app: 0}
        assert settle_backend_counts(pg_admin, gone, GENEROUS) == gone
    finally:
        ref.cleanup()
        new.cleanup()


# ---------------------------------------------------------------------------------
# 2. Defects of psycopg2.pool that pgctx fixes
# ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "module",
    both_modules(
        "D4: a putconn whose rollback fails raises and leaks the slot",
        raises=psycopg2.OperationalError,
    ),
)
@pytest.mark.parametrize("cls_name", CLASSES)
def test_d4_failed_rollback_frees_slot(
    module: Any, cls_name: str, make_pool: Any, pg_admin: Any
) -> None:
    app = unique_app("d4")
    pool = make_pool(module, cls_name, 1, 1, app)
    conn = pool.getconn()
    conn.cursor().execute("SELECT 1")
    assert conn.info.transaction_status == psycopg2.extensions.TRANSACTION_STATUS_INTRANS
    with pg_admin.cursor() as cur:
        cur.execute("SELECT pg_terminate_backend(%s)", (conn.get_backend_pid(),))
    assert settled_count(pg_admin, app, 0) == 0
    # minconn=1 and nothing idle: the pool tries to roll back and keep it; that fails.
    pool.putconn(conn)
    assert len(pool._used) == 0
    assert len(pool._rused) == 0
    assert conn not in pool._pool
    fresh = pool.getconn()  # maxconn=1: only possible if the slot was freed
    assert fresh is not conn
    with fresh.cursor() as cur:
        cur.execute("SELECT 1")
        assert cur.fetchone() == (1,)
    pool.putconn(fresh)
    assert pool._pool == [fresh]
    assert settled_count(pg_admin, app, 1) == 1  # the dead connection left nothing behind


@pytest.mark.parametrize(
    "module",
    both_modules(
        "D8: putconn(foreign, key=unknown) adopts the foreign conn, then KeyError",
        raises=KeyError,
    ),
)
@pytest.mark.parametrize("cls_name", CLASSES)
def test_d8_unknown_key_changes_nothing(
    module: Any, cls_name: str, make_pool: Any, dsn: str, pg_admin: Any
) -> None:
    app = unique_app("d8-foreign")
    pool = make_pool(module, cls_name, 1, 3, app)
    held = pool.getconn()  # the constructor's idle conn: _pool is now below minconn
    foreign = psycopg2.connect(dsn, application_name=f"{app}-foreign")
    try:
        before = (list(pool._pool), dict(pool._used), dict(pool._rused), pool._keys)
        with pytest.raises(module.PoolError):
            pool.putconn(foreign, key="nope")
        assert (list(pool._pool), dict(pool._used), dict(pool._rused), pool._keys) == before
        assert not any(c is foreign for c in pool._pool)
        assert foreign.closed == 0
        assert held.closed == 0
        pool.putconn(held)
        assert pool._pool == [held]
        assert pool.getconn() is held  # the foreign connection was never adopted
        with foreign.cursor() as cur:
            cur.execute("SELECT 1")
    finally:
        foreign.close()
    assert settled_count(pg_admin, f"{app}-foreign", 0) == 0


@pytest.mark.parametrize(
    "module",
    both_modules(
        "D8: putconn(a, key=<b's key>) closes a and corrupts _used/_rused silently",
        raises=pytest.fail.Exception,  # pytest.raises finds nothing raised
    ),
)
@pytest.mark.parametrize("cls_name", CLASSES)
def test_d8_wrong_key_changes_nothing(
    module: Any, cls_name: str, make_pool: Any, pg_admin: Any
) -> None:
    app = unique_app("d8-wrong")
    pool = make_pool(module, cls_name, 0, 3, app)
    a = pool.getconn("a")
    b = pool.getconn("b")
    before = (list(pool._pool), dict(pool._used), dict(pool._rused))
    with pytest.raises(module.PoolError):
        pool.putconn(a, key="b")
    assert (list(pool._pool), dict(pool._used), dict(pool._rused)) == before
    assert pool._used == {"a": a, "b": b}
    assert pool._rused == {id(a): "a", id(b): "b"}
    for conn in (a, b):
        assert conn.closed == 0
        with conn.cursor() as cur:
            cur.execute("SELECT 1")
    assert pool.getconn("a") is a
    assert pool.getconn("b") is b
    pool.putconn(a)
    pool.putconn(b, key="b")
    assert pool._used == {}
    assert pool._rused == {}
    assert settled_count(pg_admin, app, 0) == 0  # minconn=0: both closed on return


@pytest.mark.parametrize(
    "module",
    both_modules(
        "D9: getconn(key=1) and a later getconn() share one connection", raises=AssertionError
    ),
)
@pytest.mark.parametrize("cls_name", CLASSES)
def test_d9_auto_keys_never_collide(module: Any, cls_name: str, make_pool: Any) -> None:
    pool = make_pool(module, cls_name, 0, 3, unique_app("d9"))
    explicit = pool.getconn(key=1)
    auto = pool.getconn()
    assert auto is not explicit
    assert len(pool._used) == 2
    assert pool._keys == 1  # the automatic key counter still counts as in psycopg2
    pool.putconn(auto)
    assert pool._used == {1: explicit}
    pool.putconn(explicit, key=1)


@pytest.mark.parametrize(
    "module",
    both_modules(
        "D10: ThreadedConnectionPool holds its lock during psycopg2.connect()",
        raises=AssertionError,
    ),
)
def test_d10_no_connect_under_lock(module: Any, make_pool: Any, mocker: Any) -> None:
    pool = make_pool(module, "ThreadedConnectionPool", 1, 3, unique_app("d10"))
    idle = pool.getconn()  # the constructor's idle connection: no connect needed

    real_connect = psycopg2.connect
    entered = threading.Event()
    release = threading.Event()
    gate_lock = threading.Lock()
    gated: list[bool] = []

    def slow_connect(*args: Any, **kwargs: Any) -> Any:
        with gate_lock:
            first = not gated
            gated.append(True)
        if first:  # only the first connect after patching is held up
            entered.set()
            release.wait(GENEROUS)
        return real_connect(*args, **kwargs)

    mocker.patch(CONNECT_TARGET[module], side_effect=slow_connect)

    results: dict[str, Any] = {}
    errors: list[BaseException] = []
    other_done = threading.Event()

    def connecting() -> None:
        try:
            results["connecting"] = pool.getconn()
        except BaseException as exc:
            errors.append(exc)

    def other() -> None:
        try:
            pool.putconn(idle)  # kept: _pool was below minconn
            results["other"] = pool.getconn()  # and taken again, from _pool
            results["release_set_when_done"] = release.is_set()
            other_done.set()
        except BaseException as exc:
            errors.append(exc)

    slow = threading.Thread(target=connecting, daemon=True)
    fast = threading.Thread(target=other, daemon=True)
    slow.start()
    try:
        assert entered.wait(GENEROUS), "the connecting thread never reached connect()"
        fast.start()
        # The other thread needs no connect; it must not wait for the slow one. The
        # wait is bounded (psycopg2 blocks here until `release`), 5 s is still generous.
        assert other_done.wait(5.0), "putconn/getconn blocked behind another thread's connect"
    finally:
        release.set()
        slow.join(GENEROUS)
        if fast.is_alive():
            fast.join(GENEROUS)
    assert not errors
    assert results["release_set_when_done"] is False
    assert results["other"] is idle
    assert results["connecting"] is not idle
    assert results["connecting"].closed == 0
    assert len(pool._used) == 2


@pytest.mark.parametrize(
    "module",
    both_modules(
        "D12: a failing constructor leaves the connections it opened open",
        raises=AssertionError,
    ),
)
@pytest.mark.parametrize("cls_name", CLASSES)
def test_d12_failed_constructor_closes_what_it_opened(
    module: Any, cls_name: str, dsn: str, pg_admin: Any, mocker: Any
) -> None:
    app = unique_app("d12")
    real_connect = psycopg2.connect
    opened: list[Any] = []

    def third_fails(*args: Any, **kwargs: Any) -> Any:
        if len(opened) == 2:
            raise psycopg2.OperationalError("simulated failure on 3rd connect")
        conn = real_connect(*args, **kwargs)
        opened.append(conn)
        return conn

    mocker.patch(CONNECT_TARGET[module], side_effect=third_fails)
    try:
        with pytest.raises(psycopg2.OperationalError, match="simulated failure"):
            getattr(module, cls_name)(3, 3, dsn, application_name=app)
        assert len(opened) == 2
        assert [c.closed for c in opened] == [1, 1]
        assert settled_count(pg_admin, app, 0) == 0
    finally:
        for conn in opened:
            conn.close()


@pytest.mark.parametrize(
    "module",
    both_modules(
        "D5: a connection closed while idle in the pool is handed out again",
        raises=AssertionError,
    ),
)
@pytest.mark.parametrize("cls_name", CLASSES)
def test_d5_closed_idle_conn_never_handed_out(
    module: Any, cls_name: str, make_pool: Any, pg_admin: Any
) -> None:
    app = unique_app("d5")
    pool = make_pool(module, cls_name, 1, 2, app)
    conn = pool.getconn()
    pool.putconn(conn)
    assert pool._pool == [conn]
    conn.close()  # user code keeps a reference after returning it, and closes it
    again = pool.getconn()
    assert again is not conn
    assert again.closed == 0
    with again.cursor() as cur:
        cur.execute("SELECT 1")
        assert cur.fetchone() == (1,)
    assert conn not in pool._pool
    pool.putconn(again)
    assert settled_count(pg_admin, app, 1) == 1


@pytest.mark.parametrize(
    "module",
    both_modules(
        "D7: minconn > maxconn silently makes the pool unbounded", raises=pytest.fail.Exception
    ),
)
@pytest.mark.parametrize("cls_name", CLASSES)
def test_d7_minconn_above_maxconn_rejected(
    module: Any, cls_name: str, make_pool: Any, pg_admin: Any
) -> None:
    app = unique_app("d7")
    with pytest.raises(ValueError) as info:
        make_pool(module, cls_name, 3, 1, app)
    message = str(info.value)
    assert "minconn" in message
    assert "maxconn" in message
    assert re.search(r"\b3\b", message), message
    assert re.search(r"\b1\b", message), message
    assert settled_count(pg_admin, app, 0) == 0  # nothing was opened


def test_d17_dead_threads_connection_is_reclaimed(dsn: str, pg_admin: Any) -> None:
    # psycopg2 2.7's PersistentConnectionPool (removed in 2.8, so no xfail variant)
    # keyed connections by threading.get_ident(). Idents are recycled once a thread
    # ends, so a new thread with the dead thread's ident got its checked-out
    # connection, still inside the dead thread's transaction (it would see the temp
    # table and the uncommitted row below); with maxconn=1 and no ident reuse, every
    # other thread got "connection pool exhausted" forever.
    app = unique_app("d17")
    table = f"pgctx_d17_{app.rsplit('-', 1)[1]}"
    with pg_admin.cursor() as cur:
        cur.execute(f"CREATE TABLE {table} (x int)")
    pool = pgctx.pool.PersistentConnectionPool(0, 1, dsn, application_name=app)
    try:
        dead: dict[str, Any] = {}
        errors: list[BaseException] = []

        def leave_transaction_open() -> None:
            try:
                conn = pool.getconn()
                with conn.cursor() as cur:
                    cur.execute("CREATE TEMP TABLE pgctx_dead_thread (x int)")
                    cur.execute(f"INSERT INTO {table} VALUES (1)")
                dead.update(
                    conn=conn,
                    ident=threading.get_ident(),
                    pid=conn.get_backend_pid(),
                    status=conn.info.transaction_status,
                )
            except BaseException as exc:
                errors.append(exc)
            # ends without putconn

        thread = threading.Thread(target=leave_transaction_open)
        thread.start()
        thread.join(GENEROUS)
        assert not thread.is_alive()
        assert not errors
        assert dead["status"] == psycopg2.extensions.TRANSACTION_STATUS_INTRANS

        # The slot is given back when the thread's state is released.
        assert wait_until(lambda: len(pool._used) == 0), pool._used
        assert dead["conn"].closed  # an open transaction is closed, never reused
        assert dead["conn"] not in pool._pool
        assert settled_count(pg_admin, app, 0) == 0  # its backend (and transaction) is gone

        seen: dict[str, Any] = {}

        def new_thread() -> None:
            try:
                conn = pool.getconn()  # maxconn=1: works only if the slot was freed
                with conn.cursor() as cur:
                    cur.execute("SELECT to_regclass('pg_temp.pgctx_dead_thread')")
                    seen["temp_table"] = cur.fetchall()
                    cur.execute(f"SELECT count(*) FROM {table}")
                    seen["rows"] = cur.fetchall()
                seen.update(
                    conn=conn,
                    ident=threading.get_ident(),
                    pid=conn.get_backend_pid(),
                    again=pool.getconn(),  # same thread, same connection
                )
                pool.putconn(conn)
            except BaseException as exc:
                errors.append(exc)

        thread = threading.Thread(target=new_thread)
        thread.start()
        thread.join(GENEROUS)
        assert not thread.is_alive()
        assert not errors
        # Whether or not the new thread reused the dead one's ident (seen["ident"] ==
        # dead["ident"] is common on Linux), it gets a connection of its own.
        assert seen["conn"] is not dead["conn"]
        assert seen["again"] is seen["conn"]
        assert seen["pid"] != dead["pid"]
        assert seen["temp_table"] == [(None,)]
        assert seen["rows"] == [(0,)]
        assert len(pool._used) == 0
        with pg_admin.cursor() as cur:
            cur.execute(f"SELECT count(*) FROM {table}")
            assert cur.fetchone() == (0,)  # the dead thread's insert was never committed
    finally:
        if not pool.closed:
            pool.closeall()
        with pg_admin.cursor() as cur:
            cur.execute(f"DROP TABLE IF EXISTS {table}")


# ---------------------------------------------------------------------------------
# 3. Module surface
# ---------------------------------------------------------------------------------


def test_pool_error_is_psycopg2s() -> None:
    assert pgctx.pool.PoolError is psycopg2.pool.PoolError
    assert issubclass(pgctx.pool.PoolTimeout, psycopg2.pool.PoolError)
    assert pgctx.pool.PoolTimeout is not psycopg2.pool.PoolError
    with pytest.raises(psycopg2.pool.PoolError):
        raise pgctx.pool.PoolTimeout("connection pool exhausted: timed out")


def test_module_has_psycopg2_pool_names() -> None:
    # psycopg2.pool's public names, less the `psycopg2` module it imports.
    theirs = {
        name
        for name in dir(psycopg2.pool)
        if not name.startswith("_")
        and not isinstance(getattr(psycopg2.pool, name), types.ModuleType)
    }
    assert theirs == {
        "AbstractConnectionPool",
        "PoolError",
        "SimpleConnectionPool",
        "ThreadedConnectionPool",
    }
    ours = set(dir(pgctx.pool))
    assert theirs | {"PersistentConnectionPool"} <= ours
    assert not hasattr(psycopg2.pool, "PersistentConnectionPool")  # dropped in 2.8
    for name in theirs | {"PersistentConnectionPool"}:
        assert isinstance(getattr(pgctx.pool, name), type), name


def test_class_hierarchy_matches_psycopg2() -> None:
    # isinstance(p, pool.AbstractConnectionPool) must keep working after the switch.
    names = ["AbstractConnectionPool", "SimpleConnectionPool", "ThreadedConnectionPool"]
    for sub in names:
        for base in names:
            theirs = issubclass(getattr(psycopg2.pool, sub), getattr(psycopg2.pool, base))
            ours = issubclass(getattr(pgctx.pool, sub), getattr(pgctx.pool, base))
            assert ours == theirs, f"issubclass({sub}, {base}): psycopg2 {theirs}, pgctx {ours}"
    assert issubclass(pgctx.pool.PersistentConnectionPool, pgctx.pool.AbstractConnectionPool)


def _params(func: Any) -> list[tuple[str, Any, Any]]:
    return [(p.name, p.kind, p.default) for p in inspect.signature(func).parameters.values()]


@pytest.mark.parametrize("cls_name", CLASSES)
@pytest.mark.parametrize("method", ["getconn", "putconn", "closeall"])
def test_method_signatures_match_psycopg2(cls_name: str, method: str) -> None:
    theirs = _params(getattr(getattr(psycopg2.pool, cls_name), method))
    ours = _params(getattr(getattr(pgctx.pool, cls_name), method))
    if (cls_name, method) == ("ThreadedConnectionPool", "getconn"):
        # pgctx adds one keyword-only option, which psycopg2 callers never pass.
        extra = ours.pop()
        assert extra[:2] == ("timeout", inspect.Parameter.KEYWORD_ONLY)
    assert ours == theirs


def test_persistent_pool_signatures() -> None:
    # psycopg2 2.7.7: getconn(self) and putconn(self, conn=None, close=False).
    cls = pgctx.pool.PersistentConnectionPool
    assert [p[0] for p in _params(cls.getconn)] == ["self"]
    assert _params(cls.putconn) == [
        ("self", inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.empty),
        ("conn", inspect.Parameter.POSITIONAL_OR_KEYWORD, None),
        ("close", inspect.Parameter.POSITIONAL_OR_KEYWORD, False),
    ]
