"""The psycopg2-compatible pool core: AbstractConnectionPool and its two classic subclasses.

Behaviour follows psycopg2's ``lib/pool.py`` (keys, LIFO reuse, the exact
``PoolError`` texts, keeping at most ``minconn`` idle connections, rollback of
unfinished transactions on return), minus its defects: keys are checked before
anything changes, automatic keys never collide with user keys, no connect or
rollback runs under the lock, a failed rollback still frees the slot, closed
idle connections are never handed out, and a failing constructor closes what
it opened. Waiting for a connection (``timeout=``) is opt-in.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from pgctx._driver import extensions, psycopg2
from pgctx._dsn import describe_target
from pgctx.errors import PoolError, PoolTimeout, TooManyWaiters
from pgctx.waiting import Connection, Waiter, WaitQueue, validate_max_waiting, validate_timeout

_log = logging.getLogger("pgctx")

_IDLE = extensions.TRANSACTION_STATUS_IDLE
_UNKNOWN = extensions.TRANSACTION_STATUS_UNKNOWN
_UNSET: Any = object()  # "use the pool's timeout" for getconn(timeout=...)


class _AutoKeyMark:
    __slots__ = ()

    def __repr__(self) -> str:
        return "auto"


AUTO = _AutoKeyMark()
"""Automatic keys are ``(AUTO, n)``: private, so never equal to a user key.

psycopg2 uses the plain ints 1, 2, 3 ..., so ``getconn(key=1)`` could receive
the connection another caller got from ``getconn()``. (A tuple is the cheapest
private key to build and hash on the checkout path.)
"""


def is_auto_key(key: object) -> bool:
    return type(key) is tuple and len(key) == 2 and key[0] is AUTO


def _close_quietly(conn: Connection) -> None:
    try:
        conn.close()
    except Exception:  # closing a broken connection may raise; it is gone either way
        _log.debug("error closing a connection", exc_info=True)


def _check_hashable(key: object) -> None:
    try:
        hash(key)
    except TypeError:
        raise TypeError(
            f"pool keys must be hashable, got {key!r} ({type(key).__name__}): "
            "use a str, int or tuple"
        ) from None


class AbstractConnectionPool:
    """Generic key-based pooling code, as in psycopg2 (whose docs describe this class).

    Arguments after ``minconn`` and ``maxconn`` go to ``psycopg2.connect()``;
    pgctx's own options are keyword-only names libpq does not know.
    """

    def __init__(
        self,
        minconn: Any,
        maxconn: Any,
        *args: Any,
        timeout: float | None = None,
        max_waiting: int = 0,
        **kwargs: Any,
    ) -> None:
        self.minconn = int(minconn)
        self.maxconn = int(maxconn)
        if self.minconn < 0:
            raise ValueError(f"minconn must be >= 0, got {minconn!r}")
        if self.maxconn < 0:
            raise ValueError(f"maxconn must be >= 0, got {maxconn!r}")
        if self.minconn > self.maxconn:
            raise ValueError(
                f"minconn ({self.minconn}) must not exceed maxconn ({self.maxconn}); "
                "psycopg2.pool would silently make such a pool unbounded"
            )
        self.timeout = validate_timeout(timeout)
        self.max_waiting = validate_max_waiting(max_waiting, self.timeout)
        self.closed = False

        self._args = args
        self._kwargs = kwargs
        self._pool: list[Connection] = []  # idle connections; the last returned is reused first
        self._used: dict[Any, Connection] = {}  # key -> checked-out connection
        self._rused: dict[int, Any] = {}  # id(conn) -> key
        self._keys = 0  # last automatic key number
        self._lock = threading.RLock()  # reentrant: subclasses may call _getconn under it
        self._connecting = 0  # slots reserved by connects running outside the lock
        self._waiters = WaitQueue()

        try:
            for _ in range(self.minconn):
                self._pool.append(self._open())
        except BaseException:
            for conn in self._pool:
                _close_quietly(conn)
            self._pool.clear()
            raise

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"idle={len(self._pool)} used={len(self._used)}"
        return (
            f"<{type(self).__name__} minconn={self.minconn} maxconn={self.maxconn} {state} "
            f"target={describe_target(self._args, self._kwargs)!r}>"
        )

    # -- connecting ---------------------------------------------------------------

    def _open(self) -> Connection:
        """Open a new connection with the pool's connect arguments (never under the lock)."""
        conn: Connection = psycopg2.connect(*self._args, **self._kwargs)
        return conn

    def _connect(self, key: Any = None) -> Connection:
        """Open a connection and register it under ``key`` (or make it idle), as psycopg2 does."""
        conn = self._open()
        with self._lock:
            if key is not None:
                self._used[key] = conn
                self._rused[id(conn)] = key
            else:
                self._pool.append(conn)
        return conn

    def _getkey(self) -> tuple[_AutoKeyMark, int]:
        self._keys += 1
        return (AUTO, self._keys)

    # -- checkout -----------------------------------------------------------------

    def getconn(self, key: Any = None) -> Connection:
        """Get a free connection, assigning it to ``key`` if given.

        The same key gives the same connection until it is put back.
        """
        return self._checkout(key, self.timeout)

    def _checkout(self, key: Any, timeout: float | None) -> Connection:
        with self._lock:
            if self.closed:
                raise PoolError("connection pool is closed")
            if key is None:
                self._keys += 1
                key = (AUTO, self._keys)
            else:
                _check_hashable(key)
                conn = self._used.get(key)
                if conn is not None:
                    return conn
            idle = self._pool
            while idle:
                conn = idle.pop()
                if conn.closed:  # closed while idle: psycopg2 would hand it out
                    continue
                self._used[key] = conn
                self._rused[id(conn)] = key
                return conn
            if len(self._used) + self._connecting < self.maxconn:
                self._connecting += 1
                waiter = None
            else:
                waiter = self._enqueue(key, timeout)
        if waiter is not None:
            return self._await_turn(waiter, timeout)
        return self._connect_reserved(key)

    def _enqueue(self, key: Any, timeout: float | None) -> Waiter:
        """Queue a caller for a connection, or refuse it (lock held)."""
        if timeout is None:
            raise PoolError("connection pool exhausted")
        if self.max_waiting and len(self._waiters) >= self.max_waiting:
            raise TooManyWaiters(
                f"connection pool exhausted: {len(self._waiters)} callers are already "
                f"waiting (max_waiting={self.max_waiting})"
            )
        waiter = Waiter(key)
        self._waiters.append(waiter)
        return waiter

    def _await_turn(self, waiter: Waiter, timeout: float | None) -> Connection:
        assert timeout is not None
        started = time.monotonic()
        waiter.wait(timeout)
        with self._lock:
            if not waiter.served:  # timed out; served-just-in-time waiters keep what they got
                self._waiters.discard(waiter)
                waited = time.monotonic() - started
                raise PoolTimeout(
                    f"connection pool exhausted: no connection became free within "
                    f"{waited:.3g} s (timeout={timeout:g}, maxconn={self.maxconn})"
                )
        if waiter.error is not None:
            raise waiter.error
        if waiter.conn is not None:
            return waiter.conn
        return self._connect_reserved(waiter.key)

    def _connect_reserved(self, key: Any) -> Connection:
        """Open a connection for a slot reserved under the lock, and register it."""
        try:
            conn = self._open()
        except BaseException:
            with self._lock:
                self._connecting -= 1
                self._serve_waiter(None)
            raise
        with self._lock:
            self._connecting -= 1
            closed = self.closed
            existing = None if closed else self._used.get(key)
            if existing is None and not closed:
                self._used[key] = conn
                self._rused[id(conn)] = key
                return conn
            # another caller opened one for this key meanwhile: keep ours for later
            if existing is not None and (self._serve_waiter(conn) or self._keep_idle(conn)):
                return existing
        _close_quietly(conn)
        if closed:
            raise PoolError("connection pool is closed")
        assert existing is not None
        return existing

    # -- return -------------------------------------------------------------------

    def putconn(self, conn: Connection | None = None, key: Any = None, close: bool = False) -> None:
        """Put a connection back; close it instead if ``close`` is true.

        An unfinished transaction is rolled back first. Connections beyond
        ``minconn`` idle ones are closed, as in psycopg2.
        """
        with self._lock:
            if self.closed:
                raise PoolError("connection pool is closed")
            if key is None:  # the common case, inlined: find the key by identity
                key = self._rused.get(id(conn))
                if key is None or self._used.get(key) is not conn:
                    raise PoolError("trying to put unkeyed connection")
            else:
                conn, key = self._checked_out(conn, key)
            assert conn is not None
            if close or conn.closed:
                self._forget(key, conn)
                self._serve_waiter(None)
                if conn.closed:  # psycopg2 drops closed connections silently
                    return
            else:
                status = conn.get_transaction_status()  # conn.info costs an allocation
                if status == _IDLE:
                    del self._used[key]
                    del self._rused[id(conn)]
                    if self._waiters and self._serve_waiter(conn):
                        return
                    if len(self._pool) < self.minconn:
                        self._pool.append(conn)
                        return
                elif status == _UNKNOWN or not (
                    self._waiters or len(self._pool) < self.minconn
                ):  # it would be closed anyway: psycopg2 skips the rollback too
                    self._forget(key, conn)
                    self._serve_waiter(None)
                else:
                    return self._rollback_and_return(conn, key)
        _close_quietly(conn)

    def _checked_out(self, conn: Connection | None, key: Any) -> tuple[Connection, Any]:
        """Check that ``conn`` is out under the explicit ``key`` (lock held)."""
        _check_hashable(key)
        held = self._used.get(key)
        if held is None:
            raise PoolError(
                f"no connection is checked out under key {key!r}: pass the key given to "
                "getconn(), or no key at all"
            )
        if conn is None:
            return held, key
        if held is not conn:
            raise PoolError(
                f"the connection put back is not the one checked out under key {key!r}: "
                "pass the key given to getconn() for this connection, or no key at all"
            )
        return conn, key

    def _rollback_and_return(self, conn: Connection, key: Any) -> None:
        """Roll back outside the lock (the slot stays taken), then return or discard."""
        try:
            conn.rollback()
            usable = conn.get_transaction_status() == _IDLE
        except Exception:
            _log.warning("rollback failed on return; discarding the connection", exc_info=True)
            usable = False
        with self._lock:
            if self.closed or self._used.get(key) is not conn:
                # closeall() ran meanwhile, or a concurrent second putconn won
                usable = False
            else:
                self._forget(key, conn)
                if usable and (self._serve_waiter(conn) or self._keep_idle(conn)):
                    return
                self._serve_waiter(None)
        _close_quietly(conn)

    def _forget(self, key: Any, conn: Connection) -> None:
        del self._used[key]
        del self._rused[id(conn)]

    def _keep_idle(self, conn: Connection) -> bool:
        """Keep ``conn`` as idle if the pool holds fewer than ``minconn`` (lock held)."""
        if len(self._pool) < self.minconn:
            self._pool.append(conn)
            return True
        return False

    def _serve_waiter(self, conn: Connection | None) -> bool:
        """Give ``conn`` (or, if None, a free slot) to the oldest waiter (lock held).

        Returns whether a waiter took it.
        """
        waiters = self._waiters
        while waiters:
            waiter = waiters.popleft()
            existing = self._used.get(waiter.key)
            if existing is not None:  # its key was checked out meanwhile: same key, same conn
                waiter.conn = existing
                waiter.wake()
                continue
            if conn is None:
                self._connecting += 1
                waiter.may_connect = True
            else:
                self._used[waiter.key] = conn
                self._rused[id(conn)] = waiter.key
                waiter.conn = conn
            waiter.wake()
            return True
        return False

    # -- closing ------------------------------------------------------------------

    def closeall(self) -> None:
        """Close every connection, including those checked out; the pool is then closed."""
        with self._lock:
            if self.closed:
                raise PoolError("connection pool is closed")
            conns = self._pool + list(self._used.values())
            self.closed = True
            self._waiters.fail_all(PoolError("connection pool is closed"))
        for conn in conns:
            _close_quietly(conn)

    # psycopg2's unlocked implementations, which subclasses in the wild call or override.
    _getconn = getconn
    _putconn = putconn
    _closeall = closeall


class SimpleConnectionPool(AbstractConnectionPool):
    """A connection pool that can't be shared across different threads."""

    def __init__(self, minconn: Any, maxconn: Any, *args: Any, **kwargs: Any) -> None:
        if "timeout" in kwargs or "max_waiting" in kwargs:
            raise TypeError(
                "SimpleConnectionPool cannot wait for a connection (no other thread can "
                "return one): use ThreadedConnectionPool(..., timeout=seconds)"
            )
        super().__init__(minconn, maxconn, *args, **kwargs)

    def putconn(self, conn: Connection, key: Any = None, close: bool = False) -> None:  # type: ignore[override]
        """Put away a connection."""
        super().putconn(conn, key, close)


class ThreadedConnectionPool(AbstractConnectionPool):
    """A connection pool that works with the threading module.

    With ``timeout=seconds`` a caller waits (first come, first served) for a
    returned connection instead of getting "connection pool exhausted" at once.
    """

    def getconn(self, key: Any = None, *, timeout: float | None = _UNSET) -> Connection:
        """Get a free connection, waiting up to ``timeout`` seconds if the pool allows it."""
        if timeout is _UNSET:
            return self._checkout(key, self.timeout)
        return self._checkout(key, validate_timeout(timeout))


__all__ = [
    "AbstractConnectionPool",
    "PoolError",
    "SimpleConnectionPool",
    "ThreadedConnectionPool",
]
