"""A background thread per pool for what must happen between calls.

Closing connections idle beyond ``max_idle`` or past ``max_lifetime``,
reporting leaks after ``leak_timeout`` and refilling to ``minconn`` after
losses cannot wait for the next ``getconn``: a quiet pool would hold stale
connections forever. The thread holds only a weak reference to its pool, so
an abandoned pool can still be garbage-collected, and it ends with the pool.

A pool starts it at its first call in each process, never in its constructor:
a pre-forking server that builds the pool in its master then forks a process
without threads, and each child starts a thread of its own.
"""

from __future__ import annotations

import logging
import threading
import weakref
from typing import Protocol

_log = logging.getLogger("pgctx")


class Maintained(Protocol):
    closed: bool

    def _maintain(self) -> None: ...


class Maintenance:
    """Calls ``pool._maintain()`` every ``interval`` seconds from ``start()`` until stopped."""

    __slots__ = ("_stop", "_thread", "interval")

    def __init__(self, pool: Maintained, interval: float) -> None:
        self.interval = interval
        # threading is looked up now, in the process and after the patching that runs us
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=_run,
            args=(weakref.ref(pool), interval, self._stop),
            name=f"pgctx-maintenance-{id(pool):x}",
            daemon=True,
        )

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()


def _run(pool_ref: weakref.ref[Maintained], interval: float, stop: threading.Event) -> None:
    while not stop.wait(interval):
        pool = pool_ref()
        if pool is None or pool.closed:
            return
        try:
            pool._maintain()
        except BaseException:  # never let the thread die: the pool depends on it
            # A BaseException here comes from a user hook (configure, a connect
            # wrapper) during the refill; the pool has freed its slots. Ending the
            # thread would silently stop refills and recycling for good, and nobody
            # is there to catch it: log it loudly and carry on.
            _log.exception("pool maintenance failed; will try again")
        del pool
