"""The watchdog: an operation running past its deadline fails instead of blocking.

Its thread and threading primitives are made at first use in each process: after a fork
(where another thread may have held its lock) and after gevent's ``patch_all()`` (a
``--preload`` app imports pgctx before the worker patches).
"""

from __future__ import annotations

import sys
import threading
import time
from typing import Any

import psycopg2
import pytest

from pgctx import watchdog
from pgctx.watchdog import WATCHDOG, Watchdog
from tests.forking import FORKS, GENEROUS, in_child, needs_fork


def _watchdog_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "pgctx-watchdog"]


def test_a_query_past_its_deadline_fails_fast(dsn: str) -> None:
    conn = psycopg2.connect(dsn)
    try:
        started = time.monotonic()
        with (
            pytest.raises(psycopg2.OperationalError),
            WATCHDOG.deadline(conn, 0.2) as guard,
            conn.cursor() as cur,
        ):
            cur.execute("SELECT pg_sleep(60)")
        assert guard.fired and conn.closed
        assert time.monotonic() - started < 30  # nowhere near the 60 s sleep
    finally:
        conn.close()


def test_an_operation_within_its_deadline_is_left_alone(dsn: str) -> None:
    conn: Any = psycopg2.connect(dsn)
    try:
        with WATCHDOG.deadline(conn, 0.2) as guard, conn.cursor() as cur:
            cur.execute("SELECT 1")
        time.sleep(0.4)  # let the deadline pass after the block: nothing may happen now
        assert not guard.fired and guard.conn is None
        with conn.cursor() as cur:
            cur.execute("SELECT 2")
            assert cur.fetchone() == (2,)
    finally:
        conn.close()


class _Inert:
    def fileno(self) -> int:
        raise AssertionError("a finished guard must never fire")


def test_finished_guards_do_not_pile_up() -> None:
    dog = Watchdog()
    for _ in range(2000):
        with dog.deadline(_Inert(), 3600):
            pass
    state = dog._current()
    assert state.pending == 0
    assert len(state.heap) <= 2 * 256 + 1


def test_threading_primitives_are_made_at_first_use(monkeypatch: pytest.MonkeyPatch) -> None:
    """What ``threading`` offers at the first deadline is used, not what it had at import
    (gevent's ``patch_all()`` replaces ``threading.Lock`` and the thread start)."""
    dog = Watchdog()  # built at import time, before a gevent worker patches threading
    made: list[str] = []

    def recording(name: str, real: Any) -> Any:
        def make(*args: Any, **kwargs: Any) -> Any:
            if sys._getframe(1).f_globals.get("__name__") == watchdog.__name__:
                made.append(name)  # only what the watchdog itself builds
            return real(*args, **kwargs)

        return make

    for name in ("Lock", "RLock", "Condition", "Thread"):
        monkeypatch.setattr(threading, name, recording(name, getattr(threading, name)))
    assert made == []
    with dog.deadline(_Inert(), 3600):
        pass
    assert "Thread" in made and ("Lock" in made or "RLock" in made), made


def test_many_threads_at_once_start_one_watchdog_thread() -> None:
    dog = Watchdog()
    barrier = threading.Barrier(8)

    def first_use() -> None:
        barrier.wait()
        with dog.deadline(_Inert(), 3600):
            pass

    users = [threading.Thread(target=first_use) for _ in range(8)]
    for t in users:
        t.start()
    for t in users:
        t.join(GENEROUS)
    threads = [dog._current().thread]
    assert threads[0] is not None and threads[0].is_alive()
    assert sum(t is threads[0] for t in _watchdog_threads()) == 1
    assert len(dog._states) == 1


class _Stuck:
    """A connection whose socket the watchdog cannot get at: it blocks in fileno()."""

    def __init__(self) -> None:
        self.entered, self.release = threading.Event(), threading.Event()

    def fileno(self) -> int:
        self.entered.set()
        self.release.wait(GENEROUS)
        raise OSError("no socket")


@needs_fork
@pytest.mark.parametrize("how", FORKS)
def test_a_child_forked_while_the_watchdog_thread_holds_its_lock(dsn: str, how: str) -> None:
    """The watchdog thread holds its lock while it shuts a connection down: a fork then
    must not leave the child's first guarded operation waiting for it forever."""
    stuck = _Stuck()

    def guarded_operation() -> None:
        # The deadline passes at once: the watchdog thread takes its lock, calls fileno().
        with WATCHDOG.deadline(stuck, 0):
            stuck.release.wait(GENEROUS)

    guarded = threading.Thread(target=guarded_operation)
    guarded.start()
    assert stuck.entered.wait(GENEROUS)
    try:

        def child() -> int:
            conn = psycopg2.connect(dsn)
            try:
                with WATCHDOG.deadline(conn, GENEROUS) as guard, conn.cursor() as cur:
                    cur.execute("SELECT 1")
                    (one,) = cur.fetchone()
                assert not guard.fired
                return int(one)
            finally:
                conn.close()

        assert in_child(child, how) == 1
    finally:
        stuck.release.set()
        guarded.join(GENEROUS)


def test_the_watchdog_module_builds_nothing_at_import() -> None:
    assert not Watchdog()._states
    assert isinstance(watchdog.WATCHDOG, Watchdog)
