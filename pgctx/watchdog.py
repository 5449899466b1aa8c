"""Client-side deadlines for queries the pool itself sends (check, rollback, reset).

libpq blocks in ``poll()`` until the server answers. When the peer's kernel
still acknowledges packets (a hung server or pooler, a proxy that stopped
relaying) neither TCP keepalives nor ``tcp_user_timeout`` ever fire, so a
``SELECT 1`` check could hold a borrower forever. One daemon thread per
process watches the deadlines of such operations and, when one passes, shuts
the connection's socket down: the blocked call then fails at once with a
disconnect error and the pool discards the connection.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import os
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

_COMPACT_AT = 256  # rebuild the heap when it holds this many entries, mostly finished


class _Guard:
    __slots__ = ("conn", "done", "fired")

    def __init__(self, conn: Any) -> None:
        self.conn = conn
        self.done = False
        self.fired = False


def _shut_down(conn: Any) -> None:
    """Break the connection's socket under libpq's feet (no Terminate message sent)."""
    with contextlib.suppress(Exception):
        fd = os.dup(conn.fileno())
        sock = socket.socket(fileno=fd)  # a duplicate: shutdown() acts on the shared socket
        try:
            sock.shutdown(socket.SHUT_RDWR)
        finally:
            sock.close()


class _ProcessState:
    """The watchdog of one process: its lock, its deadlines and its thread."""

    __slots__ = ("cond", "counter", "heap", "pending", "thread")

    def __init__(self) -> None:
        # threading is looked up now: after gevent's patch_all() when that came first
        self.cond = threading.Condition(threading.Lock())
        self.heap: list[tuple[float, int, _Guard]] = []  # finished guards are dropped lazily
        self.pending = 0  # guards not finished yet
        self.counter = itertools.count()
        self.thread: threading.Thread | None = None


class Watchdog:
    """Fires ``_shut_down`` on connections whose guarded operation outlives its deadline.

    Nothing is built at import: each process makes its own lock and thread at its
    first deadline, so a forked child never waits on a lock its parent's thread held,
    and a gevent worker that patched ``threading`` after importing pgctx gets gevent's.
    """

    def __init__(self) -> None:
        self._states: dict[int, _ProcessState] = {}  # pid -> state; only ours is used

    def _current(self) -> _ProcessState:
        pid = os.getpid()
        state = self._states.get(pid)
        if state is None:
            state = self._states.setdefault(pid, _ProcessState())  # atomic: one per process
            for other in [p for p in self._states if p != pid]:  # a parent's, inherited
                self._states.pop(other, None)
        return state

    @contextlib.contextmanager
    def deadline(self, conn: Any, seconds: float) -> Iterator[_Guard]:
        """Within the block, ``conn`` is shut down if ``seconds`` pass first."""
        guard = _Guard(conn)
        when = time.monotonic() + seconds
        state = self._current()
        with state.cond:
            if state.thread is None:
                thread = threading.Thread(
                    target=_run, args=(state,), name="pgctx-watchdog", daemon=True
                )
                thread.start()
                state.thread = thread
            heap = state.heap
            if len(heap) > _COMPACT_AT and len(heap) > 2 * state.pending:
                heap[:] = [entry for entry in heap if not entry[2].done]
                heapq.heapify(heap)
            # Wake the thread only when this deadline comes first: waking it for
            # every guarded check would cost more than the check itself.
            earliest = not heap or when < heap[0][0]
            heapq.heappush(heap, (when, next(state.counter), guard))
            state.pending += 1
            if earliest:
                state.cond.notify()
        try:
            yield guard
        finally:
            with state.cond:
                guard.done = True
                guard.conn = None  # hold no reference once the operation is over
                state.pending -= 1


def _run(state: _ProcessState) -> None:
    heap = state.heap
    with state.cond:
        while True:
            while heap and heap[0][2].done:
                heapq.heappop(heap)
            if not heap:
                state.cond.wait()
                continue
            when, _, guard = heap[0]
            left = when - time.monotonic()
            if left > 0:
                state.cond.wait(left)
                continue
            heapq.heappop(heap)
            guard.fired = True
            _shut_down(guard.conn)


WATCHDOG = Watchdog()
