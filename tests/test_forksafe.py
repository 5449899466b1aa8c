"""forksafe: telling a new process from the one a pool was set up in, and letting go of a
parent's connections in a child without ending the parent's sessions."""

from __future__ import annotations

import mmap
import os
import sys
import threading
from typing import Any

import psycopg2
import pytest

from pgctx import forksafe
from tests.forking import FORKS, GENEROUS, in_child, needs_fork


def _pid(conn: Any) -> int:
    with conn.cursor() as cur:
        cur.execute("SELECT pg_backend_pid()")
        (pid,) = cur.fetchone()
    conn.rollback()
    return int(pid)


@needs_fork
def test_a_child_closing_a_disowned_connection_leaves_the_parents_session(dsn: str) -> None:
    conn = psycopg2.connect(dsn)
    try:
        pid = _pid(conn)
        child = os.fork()
        if child == 0:  # the child: disown, then close and exit as careless code would
            forksafe.disown(conn)
            try:
                conn.close()
            finally:
                os._exit(0)
        _, status = os.waitpid(child, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert _pid(conn) == pid  # the parent's session survived the child's close
    finally:
        conn.close()


@needs_fork
def test_without_disown_a_childs_close_ends_the_parents_session(dsn: str) -> None:
    """Why disown exists: libpq's Terminate message goes to the shared socket."""
    conn = psycopg2.connect(dsn)
    try:
        _pid(conn)
        child = os.fork()
        if child == 0:
            try:
                conn.close()
            finally:
                os._exit(0)
        os.waitpid(child, 0)
        with pytest.raises(psycopg2.OperationalError):
            _pid(conn)
    finally:
        conn.close()


FLAGS = {"platform": forksafe.process_flag, "portable": forksafe.PidFlag}


@needs_fork
@pytest.mark.parametrize("how", FORKS)
@pytest.mark.parametrize("make", FLAGS.values(), ids=FLAGS)
def test_a_process_flag_reads_false_in_every_child(how: str, make: Any) -> None:
    """However the child was forked: os.fork() or a C fork that runs no Python hook."""
    flag = make()
    assert not flag[0]
    flag[0] = 1
    assert flag[0]

    def child() -> list[bool]:
        seen = [bool(flag[0])]
        flag[0] = 1  # the child's own process now
        seen.append(bool(flag[0]))

        def grandchild() -> bool:
            return bool(flag[0])

        seen.append(in_child(grandchild, how))
        return seen

    assert in_child(child, how) == [False, True, False]
    assert flag[0]  # the parent's is untouched


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux's MADV_WIPEONFORK")
def test_on_linux_the_flag_is_a_page_the_kernel_wipes_in_children() -> None:
    """Reading it costs no system call, unlike os.getpid() (glibc stopped caching it)."""
    assert isinstance(forksafe.process_flag(), mmap.mmap)


@needs_fork
@pytest.mark.parametrize("how", FORKS)
def test_lock_for_this_process_is_one_per_process(how: str) -> None:
    locks: dict[int, Any] = {}
    barrier = threading.Barrier(8)
    got: list[Any] = []

    def take() -> None:
        barrier.wait()
        got.append(forksafe.lock_for_this_process(locks))

    threads = [threading.Thread(target=take) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(GENEROUS)
    assert len(got) == 8 and all(lock is got[0] for lock in got)
    parents = got[0]
    held, release = threading.Event(), threading.Event()

    def hold() -> None:
        with parents:
            held.set()
            release.wait(GENEROUS)

    holder = threading.Thread(target=hold)
    holder.start()
    assert held.wait(GENEROUS)
    try:

        def child() -> bool:
            lock = forksafe.lock_for_this_process(locks)
            with lock:  # not the parent's, which a thread held at the fork
                pass
            return lock is not parents and list(locks) == [os.getpid()]

        assert in_child(child, how) is True
    finally:
        release.set()
        holder.join(GENEROUS)
    assert forksafe.lock_for_this_process(locks) is parents
