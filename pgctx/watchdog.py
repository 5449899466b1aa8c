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


class Watchdog:
    """Fires ``_shut_down`` on connections whose guarded operation outlives its deadline."""

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._heap: list[tuple[float, int, _Guard]] = []  # finished guards are dropped lazily
        self._pending = 0  # guards not finished yet
        self._counter = itertools.count()
        self._thread: threading.Thread | None = None
        self._pid = 0

    @contextlib.contextmanager
    def deadline(self, conn: Any, seconds: float) -> Iterator[_Guard]:
        """Within the block, ``conn`` is shut down if ``seconds`` pass first."""
        guard = _Guard(conn)
        when = time.monotonic() + seconds
        with self._cond:
            self._ensure_thread()
            heap = self._heap
            if len(heap) > _COMPACT_AT and len(heap) > 2 * self._pending:
                heap[:] = [entry for entry in heap if not entry[2].done]
                heapq.heapify(heap)
            # Wake the thread only when this deadline comes first: waking it for
            # every guarded check would cost more than the check itself.
            earliest = not heap or when < heap[0][0]
            heapq.heappush(heap, (when, next(self._counter), guard))
            self._pending += 1
            if earliest:
                self._cond.notify()
        try:
            yield guard
        finally:
            with self._cond:
                guard.done = True
                guard.conn = None  # hold no reference once the operation is over
                self._pending -= 1

    def _ensure_thread(self) -> None:
        # (re)start lazily, also in a forked child, where the thread did not survive
        if self._thread is None or self._pid != os.getpid():
            self._heap.clear()
            self._pending = 0
            self._pid = os.getpid()
            self._thread = threading.Thread(target=self._run, name="pgctx-watchdog", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        with self._cond:
            while True:
                while self._heap and self._heap[0][2].done:
                    heapq.heappop(self._heap)
                if not self._heap:
                    self._cond.wait()
                    continue
                when, _, guard = self._heap[0]
                left = when - time.monotonic()
                if left > 0:
                    self._cond.wait(left)
                    continue
                heapq.heappop(self._heap)
                guard.fired = True
                _shut_down(guard.conn)


WATCHDOG = Watchdog()
