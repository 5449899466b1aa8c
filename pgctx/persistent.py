"""PersistentConnectionPool: one connection per thread, with psycopg2 2.7's API.

psycopg2 keyed this pool by ``thread.get_ident()``, which the interpreter
reuses after a thread ends, so a new thread could inherit a dead thread's
connection mid-transaction. Here each thread gets a key of its own, held in a
``threading.local``; when the thread ends, that key's finaliser gives the
connection back (or closes it if a transaction was left open), and no later
thread can ever see it.
"""

from __future__ import annotations

import threading
import time
import weakref
from types import MappingProxyType
from typing import Any

from pgctx._driver import extensions
from pgctx.basepool import AbstractConnectionPool
from pgctx.errors import PoolError
from pgctx.hooks import route
from pgctx.waiting import Connection


class ThreadKey:
    """The pool key of one thread; never equal to another thread's, even with the same ident."""

    __slots__ = ("__weakref__", "ident")

    def __init__(self, ident: int) -> None:
        self.ident = ident

    def __repr__(self) -> str:
        return f"<thread key {self.ident:#x}>"


class _Holder:
    """Lives in the thread-local; its death (the thread's end) releases the thread's key."""

    __slots__ = ("__weakref__", "key")

    def __init__(self, key: ThreadKey) -> None:
        self.key = key


_NOT_THIS_THREADS = (
    "trying to put a connection this thread does not hold: each thread "
    "must put back only the connection its own getconn() returned"
)
_HOLDS_NONE = "this thread holds no connection from the pool: call getconn() first"


def _release_dead_thread(pool_ref: weakref.ref[PersistentConnectionPool], key: ThreadKey) -> None:
    pool = pool_ref()
    if pool is not None:
        pool._reclaim(key)


@route
def _putconn_through_hook(
    self: PersistentConnectionPool, conn: Connection | None = None, close: bool = False
) -> None:
    """putconn of a subclass overriding ``_putconn``: called under the lock, as in psycopg2 2.7."""
    key = self._thread_key()
    with self._lock:
        held = self._used.get(key)  # the checks of PersistentConnectionPool.putconn
        if not self.closed and conn is not None and held is not conn:
            raise PoolError(_NOT_THIS_THREADS)
        if not self.closed and held is None:
            raise PoolError(_HOLDS_NONE)
        self._putconn(held, key, close)  # type: ignore[arg-type]


class PersistentConnectionPool(AbstractConnectionPool):
    """A pool that gives each thread its own connection, until the thread puts it away.

    ``getconn()`` takes no key: a thread gets the same connection on every call.
    """

    def __init__(self, minconn: Any, maxconn: Any, *args: Any, **kwargs: Any) -> None:
        super().__init__(minconn, maxconn, *args, **kwargs)
        self._local = threading.local()

    def _thread_key(self) -> ThreadKey:
        holder: _Holder | None = getattr(self._local, "holder", None)
        if holder is None:
            holder = _Holder(ThreadKey(threading.get_ident()))
            self._local.holder = holder
            # Runs when the thread ends and its thread-local data is released.
            finalizer = weakref.finalize(
                holder, _release_dead_thread, weakref.ref(self), holder.key
            )
            finalizer.atexit = False
        return holder.key

    def getconn(self) -> Connection:  # type: ignore[override]
        """Get the calling thread's connection, opening or taking one if it has none."""
        return self._checkout(self._thread_key(), self.timeout)

    def putconn(self, conn: Connection | None = None, close: bool = False) -> None:  # type: ignore[override]
        """Put away the calling thread's connection (``conn`` defaults to it)."""
        key = self._thread_key()
        with self._lock:
            held = self._used.get(key)
            if not self.closed and conn is not None and held is not conn:
                raise PoolError(_NOT_THIS_THREADS)
            if not self.closed and held is None:
                raise PoolError(_HOLDS_NONE)
        super().putconn(held, key, close)

    def _reclaim(self, key: ThreadKey) -> None:
        """Take back the connection of a thread that has ended."""
        with self._lock:
            conn = self._used.get(key)
            if conn is None or self.closed:
                return
            self._forget(key, conn)
            if self._life is not None:
                self._life.returned(conn, time.monotonic())
            reusable = (
                not conn.closed
                and conn.get_transaction_status() == extensions.TRANSACTION_STATUS_IDLE
            )
            # A transaction left open by a dead thread is closed, never rolled
            # back and reused: nobody can tell whether it was meant to commit.
            if reusable and self._give_back(conn):
                return
            self._serve_waiter(None)
        self._close(conn)

    _HOOK_ROUTES = MappingProxyType(
        {**AbstractConnectionPool._HOOK_ROUTES, "_putconn": ("putconn", _putconn_through_hook)}
    )


__all__ = ["PersistentConnectionPool"]
