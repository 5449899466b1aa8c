"""Forks after the pool was created (scenario 39 of the fault catalogue).

A forked child shares its parent's sockets. If the child used one, two processes would
talk on one session; if it closed one (``closeall()``, ``conn.close()``), libpq would
send the server a Terminate message and end the *parent's* session. The pool must give
the child fresh connections of its own and leave the parent's sessions, borrowed or
idle, working after the child has used the pool, closed it, collected it and exited.

Each case runs for both kinds of fork (see tests/forking.py): ``os.fork()``, which runs
Python's fork hooks, and a C fork (uWSGI's master), which runs none: the pool must
notice the new process by itself on its first call there.
"""

from __future__ import annotations

import gc
import os
import random
import subprocess
import sys
import textwrap
import threading
import time
import traceback
from collections.abc import Iterator
from typing import Any

import pytest

import pgctx
from pgctx.errors import PoolError
from pgctx.pool import ThreadedConnectionPool
from pgctx.registry import Binding
from tests.forking import FORKS, GENEROUS, Child, in_child, needs_fork
from tests.helpers import backend_pid, backends, unique_app, wait_backends

pytestmark = needs_fork


@pytest.fixture
def app() -> str:
    return unique_app("fork")


@pytest.fixture
def pool(dsn: str, app: str) -> Iterator[ThreadedConnectionPool]:
    p = ThreadedConnectionPool(2, 4, dsn, application_name=app, timeout=GENEROUS)
    try:
        yield p
    finally:
        if not p.closed:
            p.closeall()


def _first_call(pool: ThreadedConnectionPool, first: str, inherited: Any) -> None:
    """The child's first call into the pool, of the kind ``first``."""
    if first == "getconn":
        conn = pool.getconn()
        backend_pid(conn)
        pool.putconn(conn)
    elif first == "block":
        with pool.connection() as conn:
            backend_pid(conn)
    elif first == "decorated":
        pgctx.with_connection(pool)(lambda conn: backend_pid(conn))()
    elif first == "get_stats":
        stats = pool.get_stats()
        assert (stats["checked_out"], stats["pool_available"]) == (0, 0), stats
    elif first == "putconn":  # what the parent had borrowed is not the child's to return
        with pytest.raises(PoolError):
            pool.putconn(inherited)
    elif first == "closeall":
        pool.closeall()
    else:
        raise AssertionError(first)


@pytest.mark.parametrize(
    "first", ["getconn", "block", "decorated", "get_stats", "putconn", "closeall"]
)
@pytest.mark.parametrize("how", FORKS)
def test_the_childs_first_call_leaves_the_parents_connections_alone(
    pool: ThreadedConnectionPool, app: str, pg_admin: Any, how: str, first: str
) -> None:
    borrowed = pool.getconn()
    idle = pool.getconn()
    borrowed_pid, idle_pid = backend_pid(borrowed), backend_pid(idle)
    idle.rollback()
    pool.putconn(idle)  # kept idle (minconn=2)
    with borrowed.cursor() as cur:  # mid-transaction during the fork
        cur.execute("CREATE TEMP TABLE fork_first (x int); INSERT INTO fork_first VALUES (7)")

    def child() -> list[int]:
        _first_call(pool, first, borrowed)
        if pool.closed:
            return []
        conns = [pool.getconn() for _ in range(2)]
        pids = [backend_pid(c) for c in conns]
        for conn in conns:
            pool.putconn(conn)  # open transactions: rolled back on return
        pool.closeall()
        return pids

    child_pids = set(in_child(child, how))
    assert not child_pids & {borrowed_pid, idle_pid}, "the child used the parent's sessions"
    assert wait_backends(pg_admin, app, 2) == 2
    with borrowed.cursor() as cur:  # the parent's transaction is intact
        cur.execute("SELECT x, pg_backend_pid() FROM fork_first")
        assert cur.fetchone() == (7, borrowed_pid)
    borrowed.rollback()
    again = pool.getconn()
    assert again is idle and backend_pid(again) == idle_pid
    pool.putconn(again)
    pool.putconn(borrowed)
    assert pool.get_stats()["returns_bad"] == 0


@pytest.mark.parametrize("child_ends_with", ["closeall", "close_inherited_handles", "gc"])
@pytest.mark.parametrize("how", FORKS)
def test_child_gets_its_own_connections_and_the_parents_keep_working(
    pool: ThreadedConnectionPool, app: str, pg_admin: Any, how: str, child_ends_with: str
) -> None:
    borrowed = pool.getconn()
    idle = pool.getconn()
    borrowed_pid, idle_pid = backend_pid(borrowed), backend_pid(idle)
    idle.rollback()
    pool.putconn(idle)  # kept idle (minconn=2)
    # The borrowed connection is in the middle of a transaction during the fork.
    with borrowed.cursor() as cur:
        cur.execute("CREATE TEMP TABLE fork_t (x int); INSERT INTO fork_t VALUES (42)")

    def child() -> dict[str, Any]:
        stats = pool.get_stats()
        assert (stats["checked_out"], stats["pool_available"]) == (0, 0), stats
        conns = [pool.getconn() for _ in range(2)]
        pids = [backend_pid(c) for c in conns]
        for _ in range(20):  # while the parent uses its own session concurrently
            for conn in conns:
                backend_pid(conn)
        for conn in conns:
            conn.rollback()
            pool.putconn(conn)
        if child_ends_with == "closeall":
            pool.closeall()
        elif child_ends_with == "close_inherited_handles":
            borrowed.close()  # user code closing what it inherited
            idle.close()
        gc.collect()
        return {"pids": pids}

    before_fork = backends(pg_admin, app)
    forked = Child(child, how)
    for _ in range(20):
        assert backend_pid(borrowed) == borrowed_pid  # the parent talks at the same time
    result = forked.result()

    child_pids = set(result["pids"])
    assert len(child_pids) == 2
    assert not child_pids & {borrowed_pid, idle_pid}  # fresh connections in the child
    # The child's own connections are gone with it; the parent's two sessions are not.
    assert wait_backends(pg_admin, app, before_fork) == before_fork == 2

    with borrowed.cursor() as cur:  # the parent's transaction is intact
        cur.execute("SELECT x, pg_backend_pid() FROM fork_t")
        assert cur.fetchone() == (42, borrowed_pid)
    borrowed.commit()
    again = pool.getconn()
    assert again is idle and backend_pid(again) == idle_pid
    again.rollback()
    pool.putconn(again)
    pool.putconn(borrowed)
    assert pool.get_stats()["returns_bad"] == 0


@pytest.mark.parametrize("how", FORKS)
def test_fork_while_a_parent_thread_is_mid_query(
    pool: ThreadedConnectionPool, app: str, pg_admin: Any, how: str
) -> None:
    """The child's fork handling touches no connection another thread is using."""
    borrowed = pool.getconn()
    borrowed_pid = backend_pid(borrowed)
    borrowed.rollback()
    querying, outcome = threading.Event(), []

    def query() -> None:
        with borrowed.cursor() as cur:
            querying.set()
            cur.execute("SELECT pg_sleep(0.5), pg_backend_pid()")
            (_, pid) = cur.fetchone() or (None, None)
            outcome.append(pid)

    thread = threading.Thread(target=query)
    thread.start()
    assert querying.wait(GENEROUS)

    def child() -> int:
        conn = pool.getconn()
        pid = backend_pid(conn)
        pool.putconn(conn, close=True)
        pool.closeall()
        gc.collect()
        return pid

    child_pid = in_child(child, how)
    thread.join(GENEROUS)
    assert outcome == [borrowed_pid] and child_pid != borrowed_pid
    assert backend_pid(borrowed) == borrowed_pid
    borrowed.rollback()
    pool.putconn(borrowed)
    assert wait_backends(pg_admin, app, 2) == 2


@pytest.mark.parametrize("how", FORKS)
def test_fork_while_another_thread_holds_the_pool_lock(
    pool: ThreadedConnectionPool, how: str
) -> None:
    """A thread of the parent in the middle of a pool call must not deadlock the child."""
    pool.putconn(pool.getconn())  # the pool has been used in the parent
    locked, release = threading.Event(), threading.Event()

    def hold_lock() -> None:
        with pool._lock:
            locked.set()
            release.wait(GENEROUS)

    holder = threading.Thread(target=hold_lock)
    holder.start()
    assert locked.wait(GENEROUS)
    try:

        def child() -> int:
            conn = pool.getconn()
            pid = backend_pid(conn)
            conn.rollback()
            pool.putconn(conn)
            pool.closeall()
            return pid

        assert in_child(child, how) > 0
    finally:
        release.set()
        holder.join(GENEROUS)
    conn = pool.getconn()  # the parent's pool is fine too
    assert backend_pid(conn) > 0
    conn.rollback()
    pool.putconn(conn)


def test_fork_while_another_thread_holds_the_binding_lock(
    pool: ThreadedConnectionPool,
) -> None:
    """The registry's lock (one for all blocks) is made anew in a child."""
    locked, release = threading.Event(), threading.Event()

    def hold_lock() -> None:
        with Binding.lock:
            locked.set()
            release.wait(GENEROUS)

    holder = threading.Thread(target=hold_lock)
    holder.start()
    assert locked.wait(GENEROUS)
    try:

        def child() -> int:
            with pool.connection() as conn:
                assert pgctx.current_connection(pool) is conn  # takes the binding's lock
                return backend_pid(conn)

        assert in_child(child) > 0
    finally:
        release.set()
        holder.join(GENEROUS)


def test_many_forks_while_parent_threads_run_blocks(dsn: str, app: str) -> None:
    """Forks at random moments of other threads' blocks, checks and guarded returns.

    Whatever lock of pgctx a parent thread holds at the fork (the pool's, the registry's,
    the watchdog's), every child finishes its own block, check and guarded return. The
    parent's threads spend most of their time holding one of them: joined blocks and
    ``current_connection()`` (the registry's lock), checks that need no round trip (the
    pool's lock and the watchdog's), and returns that need a rollback.
    """
    checks = [0]

    def quick_check(conn: Any) -> None:
        checks[0] += 1

    pool = ThreadedConnectionPool(
        4, 8, dsn, application_name=app, timeout=GENEROUS, check=quick_check
    )
    stop = threading.Event()
    errors: list[str] = []

    def joined_blocks() -> None:
        while not stop.is_set():
            with pool.connection() as conn:
                for _ in range(100):
                    with pool.connection() as inner:  # joins: the registry's lock
                        assert pgctx.current_connection(pool) is inner is conn

    def checked_checkouts() -> None:
        while not stop.is_set():
            pool.putconn(pool.getconn())  # check on checkout, under the watchdog

    def guarded_returns() -> None:
        while not stop.is_set():
            conn = pool.getconn()
            with conn.cursor() as cur:
                cur.execute("SELECT 1")
            pool.putconn(conn)  # open transaction: rolled back under the watchdog

    def run(loop: Any) -> None:
        try:
            loop()
        except BaseException:  # pragma: no cover - reported below
            errors.append(traceback.format_exc())

    def child() -> int:
        with pool.connection() as conn:
            assert pgctx.current_connection(pool) is conn
            pid = backend_pid(conn)
        conn = pool.getconn()
        backend_pid(conn)
        pool.putconn(conn)
        pool.closeall()
        return pid

    loops = [joined_blocks, checked_checkouts, checked_checkouts, guarded_returns]
    threads = [threading.Thread(target=run, args=(loop,)) for loop in loops]
    for t in threads:
        t.start()
    hung = failed = 0
    first_error = ""
    try:
        for _ in range(100):
            time.sleep(random.uniform(0, 0.002))
            outcome = Child(child).outcome(timeout=GENEROUS / 2)
            if outcome is None:
                hung += 1
            elif not outcome["ok"]:
                failed += 1
                first_error = outcome["error"]
    finally:
        stop.set()
        for t in threads:
            t.join(GENEROUS)
        pool.closeall()
    assert not errors, "\n".join(errors)
    assert checks[0] > 0
    assert hung == 0, f"{hung} of 100 children hung in their first block"
    assert failed == 0, f"{failed} children failed, e.g.:\n{first_error}"


_FORK_AFTER_CONSTRUCTION = textwrap.dedent(
    """
    import os, sys, threading, time
    import pgctx
    dsn, app = sys.argv[1:3]
    pool = pgctx.ThreadedConnectionPool(
        2, 4, dsn, application_name=app, timeout=5, check=pgctx.check_connection,
        max_lifetime=0.3, max_idle=60, leak_timeout=60, reset=pgctx.reset_session,
    )
    assert threading.active_count() == 1, threading.enumerate()
    pid = os.fork()  # -W error::DeprecationWarning: raises here if threads are running
    if pid == 0:
        code = 1
        try:
            with pool.connection() as conn, conn.cursor() as cur:
                cur.execute("SELECT 1")
            deadline = time.monotonic() + 20
            while pool.get_stats()["connections_recycled"] < 1:  # by the child's own thread
                assert time.monotonic() < deadline, "the child's pool was never maintained"
                time.sleep(0.02)
            pool.closeall()
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, "the child failed"
    assert threading.active_count() == 1, threading.enumerate()  # the parent never used it
    pool.closeall()
    """
)


def test_fork_after_construction_starts_no_thread_and_warns_nothing(
    dsn: str, app: str, pg_admin: Any
) -> None:
    """``gunicorn --preload``: the pool is built, then the master forks its workers."""
    done = subprocess.run(
        [
            sys.executable,
            "-W",
            "error::DeprecationWarning",
            "-c",
            _FORK_AFTER_CONSTRUCTION,
            dsn,
            app,
        ],
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert wait_backends(pg_admin, app, 0) == 0


@pytest.mark.parametrize("used_in_parent", [True, False])
@pytest.mark.parametrize("how", FORKS)
def test_maintenance_runs_in_the_child(
    dsn: str, app: str, pg_admin: Any, how: str, used_in_parent: bool
) -> None:
    pool = ThreadedConnectionPool(1, 2, dsn, application_name=app, max_lifetime=0.3)
    try:
        if used_in_parent:
            pool.putconn(pool.getconn())  # the parent's maintenance thread runs now

        def child() -> float:
            conn = pool.getconn()
            backend_pid(conn)
            conn.rollback()
            pool.putconn(conn)
            deadline = time.monotonic() + GENEROUS
            while pool.get_stats()["connections_recycled"] < 1:  # done by its own thread
                assert time.monotonic() < deadline, "the child's pool was never maintained"
                time.sleep(0.02)
            recycled = pool.get_stats()["connections_recycled"]
            pool.closeall()
            return recycled

        assert in_child(child, how) >= 1
        conn = pool.getconn()
        assert backend_pid(conn) > 0
        conn.rollback()
        pool.putconn(conn)
    finally:
        pool.closeall()
    assert wait_backends(pg_admin, app, 0) == 0


def test_a_child_never_terminates_the_parents_sessions_on_exit(
    dsn: str, app: str, pg_admin: Any
) -> None:
    """A C-forked child that exits normally (interpreter shutdown) without using the pool.

    psycopg2 does not close a connection it deallocates in another process than the
    one that opened it, so nothing reaches the parent's sessions.
    """
    script = textwrap.dedent(
        """
        import os, sys
        from tests.forking import c_fork
        import pgctx
        pool = pgctx.ThreadedConnectionPool(2, 2, sys.argv[1], application_name=sys.argv[2])
        pid = c_fork()
        if pid == 0:
            sys.exit(0)  # a normal exit: atexit, module teardown, garbage collection
        os.waitpid(pid, 0)
        for _ in range(2):
            conn = pool.getconn()
            with conn.cursor() as cur:
                cur.execute("SELECT 1")
            conn.rollback()
        pool.closeall()
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script, dsn, app],
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert wait_backends(pg_admin, app, 0) == 0


@pytest.mark.parametrize("how", FORKS)
def test_threads_racing_to_the_childs_first_call(
    pool: ThreadedConnectionPool, app: str, pg_admin: Any, how: str
) -> None:
    """Eight threads of the child make their first call at once: the pool is taken over
    for the child once, and none of them gets one of the parent's connections."""
    parents = {backend_pid(c) for c in (pool.getconn(), pool.getconn())}
    for conn in list(pool._used.values()):
        conn.rollback()
        pool.putconn(conn)

    def child() -> list[int]:
        barrier = threading.Barrier(8)
        pids: list[int] = []
        errors: list[str] = []

        def first_call() -> None:
            try:
                barrier.wait(GENEROUS)
                with pool.connection() as conn:
                    pids.append(backend_pid(conn))
                    barrier.wait(GENEROUS)  # all eight hold a connection at once
            except BaseException:
                errors.append(traceback.format_exc())

        threads = [threading.Thread(target=first_call) for _ in range(8)]
        pool.maxconn = 8
        for t in threads:
            t.start()
        for t in threads:
            t.join(GENEROUS)
        assert not errors, errors[0]
        pool.closeall()
        return pids

    pids = in_child(child, how)
    assert len(set(pids)) == 8 and not set(pids) & parents
    assert wait_backends(pg_admin, app, 2) == 2
    for _ in range(2):  # the parent's idle connections still work
        conn = pool.getconn()
        assert backend_pid(conn) in parents
    for conn in list(pool._used.values()):
        conn.rollback()
        pool.putconn(conn)


class _Psycopg2StyleLocking(ThreadedConnectionPool):
    """Holds the pool's lock around the unlocked implementations, as psycopg2's
    ThreadedConnectionPool does and as subclasses in the wild copy."""

    def getconn(self, key: Any = None, **kwargs: Any) -> Any:
        self._lock.acquire()
        try:
            return self._getconn(key)
        finally:
            self._lock.release()

    def putconn(self, conn: Any = None, key: Any = None, close: bool = False) -> None:
        self._lock.acquire()
        try:
            self._putconn(conn, key, close)
        finally:
            self._lock.release()


@pytest.mark.parametrize("how", FORKS)
def test_a_subclass_holding_the_lock_around_the_first_call(dsn: str, app: str, how: str) -> None:
    """The first call in a process replaces the pool's lock only if its caller does not
    hold it: a subclass releases the lock it acquired."""
    pool = _Psycopg2StyleLocking(1, 2, dsn, application_name=app, max_lifetime=60)
    try:
        parent = pool.getconn()  # the first call in the parent, under the lock
        parent_pid = backend_pid(parent)
        parent.rollback()
        pool.putconn(parent)

        def child() -> int:
            conn = pool.getconn()  # the first call in the child, under the inherited lock
            pid = backend_pid(conn)
            pool.putconn(conn)
            conn = pool.getconn()
            pool.putconn(conn)
            pool.closeall()
            return pid

        assert in_child(child, how) != parent_pid
        conn = pool.getconn()
        assert backend_pid(conn) == parent_pid
        pool.putconn(conn)
    finally:
        pool.closeall()


def test_a_persistent_pools_thread_end_in_a_c_forked_child(
    dsn: str, app: str, pg_admin: Any
) -> None:
    """A persistent pool takes a dead thread's connection back from a finalizer, not
    through a checkout: in a child that has not called the pool yet, closing that
    connection must not end the parent's session."""
    pool = pgctx.PersistentConnectionPool(1, 2, dsn, application_name=app)
    try:
        conn = pool.getconn()
        pid = backend_pid(conn)
        with conn.cursor() as cur:  # left open: the reclaim would close, not reuse, it
            cur.execute("CREATE TEMP TABLE fork_p (x int); INSERT INTO fork_p VALUES (3)")

        def child() -> None:
            pool._reclaim(pool._thread_key())  # what the thread's finalizer runs

        in_child(child, "c")
        with conn.cursor() as cur:
            cur.execute("SELECT x, pg_backend_pid() FROM fork_p")
            assert cur.fetchone() == (3, pid)
        conn.rollback()
        pool.putconn(conn)
    finally:
        pool.closeall()
    assert wait_backends(pg_admin, app, 0) == 0


def test_a_child_forked_inside_a_block_never_sees_the_parents_binding(
    pool: ThreadedConnectionPool, pg_admin: Any, table: str
) -> None:
    """The forking thread's context still held the parent's block: the child must not
    join it (its connection belongs to the parent), and the inherited block's exit in the
    child (a clean one, which would commit) must end nothing of the parent's unit."""
    r, w = os.pipe()
    pid = -1
    with pool.connection() as conn:
        with conn.cursor() as cur:
            cur.execute(f"INSERT INTO {table} VALUES (1)")
        parent_pid = backend_pid(conn)
        pid = os.fork()
        if pid == 0:  # the child: report what it saw, then leave the inherited block
            try:
                pgctx.current_connection(pool)
                report = "current_connection saw the parent's binding"
            except pgctx.NoActiveConnection:
                with pool.connection() as own:
                    same = backend_pid(own) == parent_pid
                report = "joined the parent's connection" if same else "ok"
            except BaseException as exc:
                report = repr(exc)
        else:
            _, status = os.waitpid(pid, 0)  # the child has left the block meanwhile
            with conn.cursor() as cur:  # the parent's session and unit are intact
                cur.execute(f"INSERT INTO {table} VALUES (2)")
    if pid == 0:
        try:
            os.write(w, report.encode()[:500])
        finally:
            os._exit(0)
    os.close(w)
    seen = os.read(r, 1000).decode()
    os.close(r)
    assert seen == "ok", seen
    assert os.waitstatus_to_exitcode(status) == 0
    with pg_admin.cursor() as cur:
        cur.execute(f"SELECT x FROM {table} ORDER BY x")
        assert [row[0] for row in cur.fetchall()] == [1, 2]
