"""Fork safety: a child process never uses or closes its parent's connections.

A forked child shares the parent's sockets. If the child used one, both
processes would talk on one session; if it closed one, libpq would send the
server a Terminate message and end the *parent's* session. So a pool in a child
points its inherited connections' file descriptors at /dev/null (the parent's
sockets stay untouched) and starts afresh.

Two ways tell a pool it runs in a new process:

- ``os.register_at_fork``, right after ``os.fork()`` (gunicorn, Celery's
  billiard, ``multiprocessing``): the pool drops the inherited connections at once;
- a :func:`process_flag` read on every checkout and return, for forks that run
  no Python hook: uWSGI's master forks its workers in C.

A pool (through :class:`PerProcess`) takes its lock and starts its thread at its
first call in each process, not when it is built: a pre-forking master that built
a pool forks single-threaded, and a gevent worker that patches ``threading`` after
the fork gets gevent's primitives.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import sys
import threading
import weakref
from typing import Any, Protocol

from pgctx.maintenance import Maintenance
from pgctx.waiting import WaitQueue

__all__ = [
    "PerProcess",
    "PidFlag",
    "ProcessFlag",
    "disown",
    "lock_for_this_process",
    "process_flag",
    "track",
]

_MADV_WIPEONFORK = 18  # Linux 4.14+; Python's mmap module does not name it


class ForkAware(Protocol):
    def _after_fork(self) -> None: ...


class ProcessFlag(Protocol):
    """``flag[0]``: true once set in this process, false in every process forked after."""

    def __getitem__(self, index: int, /) -> int: ...

    def __setitem__(self, index: int, value: int, /) -> None: ...


class PidFlag:
    """The portable :class:`ProcessFlag`: remembers the pid that set it (a system call per read)."""

    __slots__ = ("_pid",)

    def __init__(self) -> None:
        self._pid = 0

    def __getitem__(self, index: int) -> int:
        return 1 if self._pid == os.getpid() else 0

    def __setitem__(self, index: int, value: int) -> None:
        self._pid = os.getpid() if value else 0


def process_flag() -> ProcessFlag:
    """A new :class:`ProcessFlag`, unset.

    On Linux it is a private page marked ``MADV_WIPEONFORK``: the kernel gives every
    child zeros there, however it forked, and reading it is a plain memory read.
    ``os.getpid()``, the alternative, is a system call on every call (glibc stopped
    caching it in 2.25) and costs about five times as much on the checkout path.
    """
    if sys.platform.startswith("linux"):
        page = None
        try:
            page = mmap.mmap(-1, mmap.PAGESIZE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
            page.madvise(_MADV_WIPEONFORK)
            return page
        except (OSError, ValueError, AttributeError):  # an old kernel, a sandbox
            if page is not None:
                page.close()
    return PidFlag()


def lock_for_this_process(locks: dict[int, Any]) -> Any:
    """The reentrant lock in ``locks`` for this process, made on first call.

    Every thread of a process gets the same lock (``dict.setdefault`` is atomic),
    and a child never gets its parent's, which another thread of the parent may have
    held at the fork. ``threading.RLock`` is looked up now, so that a process that
    gevent patched after importing pgctx gets gevent's.
    """
    pid = os.getpid()
    lock = locks.get(pid)
    if lock is None:
        lock = locks.setdefault(pid, threading.RLock())
        for other in [p for p in locks if p != pid]:  # inherited from a parent
            locks.pop(other, None)
    return lock


class PerProcess:
    """What a pool keeps per process: its connections, its lock and its thread.

    A mixin of ``PoolCore``, which sets these attributes in its constructor and calls
    ``_enter_process()`` whenever a call finds ``_ready`` unset.
    """

    closed: bool
    _pool: list[Any]
    _used: dict[Any, Any]
    _rused: dict[int, Any]
    _connecting: int
    _waiters: WaitQueue
    _life: Any
    _lock: Any
    _process_locks: dict[int, Any]  # pid -> the pool's lock in that process
    _lock_pid: int  # the process the current _lock was made for
    _owner_pid: int  # the process whose connections _pool and _used hold
    _ready: ProcessFlag  # set by the first checkout or return in this process
    _maintenance: Maintenance | None
    _maintenance_interval: float | None

    def _enter_process(self, first_use: bool = True) -> None:
        """Set the pool up for this process: a call found ``_ready`` unset.

        In a child that no fork hook reached (uWSGI's master forks in C), the
        inherited connections are dropped first. In any child, the lock (which a
        thread of the parent may have held at the fork) is replaced by one made
        now, after gevent's patching if that came after the fork. On first use (a
        checkout or a return) the maintenance thread starts and ``_ready`` is set;
        ``get_stats()`` and ``closeall()`` start nothing.
        """
        lock = lock_for_this_process(self._process_locks)
        with lock:
            if self._ready[0]:
                return  # another thread of this process came first
            pid = os.getpid()
            if self._owner_pid != pid:
                self._drop_inherited()
            if self._lock_pid != pid:
                if not _held_by_this_thread(self._lock):  # else a subclass holds it around us
                    self._lock = lock
                self._lock_pid = pid
            if not first_use:
                return
            if self._maintenance is None and self._maintenance_interval and not self.closed:
                # Set before start(): a gevent thread start yields to other greenlets.
                self._maintenance = Maintenance(self, self._maintenance_interval)
                try:
                    self._maintenance.start()
                except BaseException:
                    self._maintenance = None
                    raise
            self._ready[0] = 1

    def _after_fork(self) -> None:
        """Right after ``os.fork()``, in the child (the hook below)."""
        self._drop_inherited()
        # For what takes the lock before _enter_process (a persistent pool's putconn);
        # the first use replaces it with a lock made after any patching of threading.
        self._lock = threading.RLock()

    def _drop_inherited(self) -> None:
        """In a new process: drop the parent's connections, unused and untouched."""
        for conn in self._pool + list(self._used.values()):
            disown(conn)
        self._pool, self._used, self._rused = [], {}, {}
        self._connecting = 0
        self._waiters = WaitQueue()
        if self._life is not None:
            self._life.info.clear()
        self._maintenance = None  # the parent's thread is not in this process
        self._owner_pid = os.getpid()

    def _maintain(self) -> None:
        """Periodic upkeep, run by the maintenance thread."""


def _held_by_this_thread(lock: Any) -> bool:
    is_owned = getattr(lock, "_is_owned", None)  # RLock's; a plain Lock can only say locked()
    return bool(is_owned() if is_owned is not None else lock.locked())


_pools: weakref.WeakSet[Any] = weakref.WeakSet()


def track(pool: ForkAware) -> None:
    """Have ``pool._after_fork()`` called in every child of ``os.fork()`` from now on."""
    _pools.add(pool)


def disown(conn: Any) -> None:
    """Detach this process from ``conn``'s socket without telling the server anything."""
    with contextlib.suppress(Exception):
        fd = conn.fileno()
        devnull = os.open(os.devnull, os.O_RDWR)
        try:
            os.dup2(devnull, fd)  # later writes (even libpq's Terminate) go nowhere
        finally:
            os.close(devnull)


def _reset_pools_in_child() -> None:
    for pool in list(_pools):
        pool._after_fork()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_pools_in_child)
