"""os.fork() after the pool was created (scenario 39 of the fault catalogue).

A forked child shares its parent's sockets. If the child used one, two processes would
talk on one session; if it closed one (``closeall()``, ``conn.close()``), libpq would
send the server a Terminate message and end the *parent's* session. The pool must give
the child fresh connections of its own and leave the parent's sessions, borrowed or
idle, working after the child has used the pool, closed it, collected it and exited.
"""

from __future__ import annotations

import gc
import json
import os
import select
import signal
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from pgctx.pool import ThreadedConnectionPool
from tests.helpers import backend_pid, backends, unique_app, wait_backends

GENEROUS = 20.0


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


class Child:
    """``fn`` running in a forked child; ``result()`` returns its JSON-able result or fails.

    The child never returns into pytest: it always leaves through ``os._exit``.
    """

    def __init__(self, fn: Callable[[], Any]) -> None:
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child; coverage cannot see it
            status = 0
            try:
                os.close(r)
                payload = {"ok": True, "result": fn()}
            except BaseException:
                payload = {"ok": False, "error": traceback.format_exc()}
                status = 1
            try:
                os.write(w, json.dumps(payload).encode())
                os.close(w)
            finally:
                os._exit(status)
        os.close(w)
        self.pid, self._r = pid, r

    def result(self, timeout: float = GENEROUS) -> Any:
        chunks = []
        deadline = time.monotonic() + timeout
        try:
            while True:
                left = max(0.0, deadline - time.monotonic())
                if not select.select([self._r], [], [], left)[0]:
                    os.kill(self.pid, signal.SIGKILL)
                    pytest.fail(f"the forked child did not finish within {timeout} s")
                chunk = os.read(self._r, 65536)
                if not chunk:
                    break
                chunks.append(chunk)
        finally:
            os.close(self._r)
            os.waitpid(self.pid, 0)
        outcome = json.loads(b"".join(chunks) or b'{"ok": false, "error": "no output"}')
        if not outcome["ok"]:
            pytest.fail(f"in the forked child:\n{outcome['error']}")
        return outcome["result"]


def in_child(fn: Callable[[], Any]) -> Any:
    return Child(fn).result()


@pytest.mark.parametrize("child_ends_with", ["closeall", "close_inherited_handles", "gc"])
def test_child_gets_its_own_connections_and_the_parents_keep_working(
    pool: ThreadedConnectionPool, app: str, pg_admin: Any, child_ends_with: str
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
    forked = Child(child)
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


def test_fork_while_a_parent_thread_is_mid_query(
    pool: ThreadedConnectionPool, app: str, pg_admin: Any
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

    child_pid = in_child(child)
    thread.join(GENEROUS)
    assert outcome == [borrowed_pid] and child_pid != borrowed_pid
    assert backend_pid(borrowed) == borrowed_pid
    borrowed.rollback()
    pool.putconn(borrowed)
    assert wait_backends(pg_admin, app, 2) == 2


def test_fork_while_another_thread_holds_the_pool_lock(
    pool: ThreadedConnectionPool,
) -> None:
    """A thread of the parent in the middle of a pool call must not deadlock the child."""
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

        assert in_child(child) > 0
    finally:
        release.set()
        holder.join(GENEROUS)
    conn = pool.getconn()  # the parent's pool is fine too
    assert backend_pid(conn) > 0
    conn.rollback()
    pool.putconn(conn)


def test_maintenance_runs_in_the_child(dsn: str, app: str, pg_admin: Any) -> None:
    pool = ThreadedConnectionPool(1, 2, dsn, application_name=app, max_lifetime=0.3)
    try:

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

        assert in_child(child) >= 1
        conn = pool.getconn()
        assert backend_pid(conn) > 0
        conn.rollback()
        pool.putconn(conn)
    finally:
        pool.closeall()
    assert wait_backends(pg_admin, app, 0) == 0
