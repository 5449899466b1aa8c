"""AbstractConnectionPool: psycopg2's key-based pool, without its defects.

Behaviour follows psycopg2's ``lib/pool.py`` (keys, LIFO reuse, the exact
``PoolError`` texts, keeping at most ``minconn`` idle connections, rollback of
unfinished transactions on return). This module adds the checkout path to
``PoolCore``: automatic keys that never collide with user keys, closed idle
connections never handed out, connects outside the lock, and the opt-in
waiting (``timeout=``) and checkout policies (``check``, ``max_lifetime``).
Without options the checkout is a few list and dict operations.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any, ClassVar

from pgctx import hooks
from pgctx._driver import psycopg2
from pgctx.connecting import Backoff
from pgctx.errors import PoolError, PoolTimeout, TooManyWaiters
from pgctx.hooks import released
from pgctx.poolcore import AUTO, PoolCore, _check_hashable
from pgctx.waiting import Connection, Waiter

_log = logging.getLogger("pgctx")


_NO_TIMEOUT: Any = object()


@hooks.route
def _checkout_through_getconn(self: Any, key: Any, timeout: float | None) -> Connection:
    """getconn of a class overriding ``_getconn``: ``self._getconn(key)`` under the lock."""
    with self._lock:
        timeouts = self._getconn_timeouts
        if timeout is self.timeout and not timeouts:  # the pool's own: _getconn knows it
            return self._getconn(key)  # type: ignore[no-any-return]
        # a per-call timeout, for pgctx's own _getconn (the override does not pass it)
        if timeouts is None:
            timeouts = self._getconn_timeouts = {}
        ident = threading.get_ident()
        outer = timeouts.get(ident, _NO_TIMEOUT)
        timeouts[ident] = timeout
        try:
            return self._getconn(key)  # type: ignore[no-any-return]
        finally:
            if outer is _NO_TIMEOUT:
                del timeouts[ident]
            else:
                timeouts[ident] = outer


@hooks.route
def _checkout_with_getkey(self: Any, key: Any, timeout: float | None) -> Connection:
    """Check out under an automatic key from ``self._getkey()``, as psycopg2's _getconn."""
    if key is None:
        with self._lock:
            if self.closed:
                raise PoolError("connection pool is closed")
            key = self._getkey()
    return AbstractConnectionPool._checkout(self, key, timeout)


@hooks.route
def _putconn_through_hook(
    self: Any, conn: Connection | None = None, key: Any = None, close: bool = False
) -> None:
    """putconn of a class overriding ``_putconn``: ``self._putconn(...)`` under the lock."""
    with self._lock:
        self._putconn(conn, key, close)


@hooks.route
def _closeall_through_hook(self: Any) -> None:
    """closeall of a class overriding ``_closeall``: ``self._closeall()`` under the lock."""
    with self._lock:
        self._closeall()


class AbstractConnectionPool(PoolCore):
    """Generic key-based pooling code, as in psycopg2 (whose docs describe this class).

    Arguments after ``minconn`` and ``maxconn`` go to ``psycopg2.connect()``;
    pgctx's own options are keyword-only names libpq does not know.
    """

    # Which method goes through which overridden hook, as in psycopg2's
    # ThreadedConnectionPool (see pgctx.hooks; SimpleConnectionPool has none).
    _HOOK_ROUTES: ClassVar[Mapping[str, tuple[str, Callable[..., Any]]]] = MappingProxyType(
        {
            "_getconn": ("_checkout", _checkout_through_getconn),
            "_putconn": ("putconn", _putconn_through_hook),
            "_closeall": ("closeall", _closeall_through_hook),
        }
    )
    _GETKEY_ROUTE: ClassVar[Callable[..., Any]] = _checkout_with_getkey
    _getconn_timeouts: dict[int, float | None] | None = None  # thread -> getconn(timeout=)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        hooks.install_routes(cls, AbstractConnectionPool)

    # -- checkout -----------------------------------------------------------------

    def getconn(self, key: Any = None) -> Connection:
        """Get a free connection, assigning it to ``key`` if given.

        The same key gives the same connection until it is put back.
        """
        return self._checkout(key, self.timeout)

    def _checkout(self, key: Any, timeout: float | None) -> Connection:
        if not self._ready[0]:  # the first checkout in this process (see _enter_process)
            self._enter_process()
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
                    self._stats.requests_num += 1
                    return conn
            self._stats.requests_num += 1
            if self._life is None:  # the psycopg2-compatible fast path
                idle = self._pool
                while idle:
                    conn = idle.pop()
                    if not conn.closed:  # closed while idle: psycopg2 would hand it out
                        self._used[key] = conn
                        self._rused[id(conn)] = key
                        return conn
                    self._stats.connections_lost += 1
        return self._acquire(key, timeout)

    def _acquire(self, key: Any, timeout: float | None) -> Connection:
        """Take an idle connection under the policies, open one, or wait for one."""
        deadline = None if timeout is None else time.monotonic() + timeout
        life = self._life
        while True:
            stale: list[Connection] = []
            waiter = None
            must_check = False
            with self._lock:
                if self.closed:
                    raise PoolError("connection pool is closed")
                conn = self._used.get(key)  # a caller with the same key got there first
                if conn is not None:
                    return conn
                conn = self._pop_idle(stale)
                if conn is not None:
                    self._used[key] = conn
                    self._rused[id(conn)] = key
                    must_check = life is not None and life.taken(conn, time.monotonic())
                elif len(self._used) + self._connecting < self.maxconn:
                    self._connecting += 1
                else:
                    waiter = self._enqueue(key, deadline)
            for old in stale:
                self._close(old)
            if waiter is not None:
                conn = self._await_turn(waiter, timeout, deadline)
                if conn is None:
                    return self._connect_reserved(key, timeout, deadline)
                must_check = waiter.must_check
            elif conn is None:
                return self._connect_reserved(key, timeout, deadline)
            if not must_check or (life is not None and life.passes_check(conn, deadline)):
                return conn
            self._drop_taken(key, conn)  # failed its check: try another within the deadline

    def _pop_idle(self, stale: list[Connection]) -> Connection | None:
        """Pop the most recently returned usable idle connection (lock held)."""
        idle, life = self._pool, self._life
        now = time.monotonic() if life is not None else 0.0
        while idle:
            conn = idle.pop()
            if conn.closed:
                self._stats.connections_lost += 1
            elif life is not None and life.expired(conn, now):
                self._stats.connections_recycled += 1
                stale.append(conn)
            else:
                return conn
        return None

    def _drop_taken(self, key: Any, conn: Connection) -> None:
        """Discard a checked-out connection found broken, freeing its slot."""
        with self._lock:
            if self._used.get(key) is conn:
                self._forget(key, conn)
                self._serve_waiter(None)
            self._stats.connections_lost += 1
        self._close(conn)

    def _enqueue(self, key: Any, deadline: float | None, waiter: Waiter | None = None) -> Waiter:
        """Queue a caller (``waiter``, or a new one) for a connection, or refuse it (lock held)."""
        if deadline is None:
            raise PoolError("connection pool exhausted")
        if self.max_waiting and len(self._waiters) >= self.max_waiting:
            self._stats.requests_errors += 1
            raise TooManyWaiters(
                f"connection pool exhausted: {len(self._waiters)} callers are already "
                f"waiting (max_waiting={self.max_waiting})"
            )
        self._stats.requests_queued += 1
        if waiter is None:
            waiter = Waiter(key)
        self._waiters.append(waiter)
        return waiter

    def _await_turn(
        self,
        waiter: Waiter,
        timeout: float | None,
        deadline: float | None,
        started: float | None = None,
    ) -> Connection | None:
        """Wait to be served: a connection, or None for a slot to connect in."""
        assert deadline is not None
        now = time.monotonic()
        if started is None:  # else: queued earlier without blocking (_checkout_nowait)
            started = now
        waiter.wait(max(0.0, deadline - now))  # the deadline may be past (a slow check)
        with self._lock:
            waited = time.monotonic() - started
            self._stats.requests_wait_ms += waited * 1000
            if not waiter.served:  # timed out; served-just-in-time waiters keep what they got
                self._waiters.discard(waiter)
                self._stats.requests_timeouts += 1
                raise PoolTimeout(
                    f"connection pool exhausted: no connection became free within "
                    f"{waited:.3g} s (timeout={timeout:g}, maxconn={self.maxconn})"
                )
            if waiter.conn is not None and self._life is not None:
                waiter.must_check = self._life.taken(waiter.conn, time.monotonic())
        if waiter.error is not None:
            raise waiter.error
        return waiter.conn

    def _connect_reserved(
        self, key: Any, timeout: float | None, deadline: float | None
    ) -> Connection:
        """Open a connection for a slot reserved under the lock, and register it.

        Without a deadline a failed connect raises at once, as in psycopg2; with
        one, it is retried with jittered exponential backoff until the deadline.
        """
        backoff = None
        while True:
            try:
                conn = self._new_connection(key, deadline)
                break
            except psycopg2.OperationalError as exc:
                if deadline is not None and not self.closed:
                    backoff = backoff or Backoff()
                    if backoff.pause(deadline):
                        continue
                self._release_slot()
                if deadline is None or self.closed:
                    raise
                with self._lock:
                    self._stats.requests_timeouts += 1
                first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else "?"
                raise PoolTimeout(
                    f"connection pool exhausted: could not connect within {timeout:g} s "
                    f"(last error: {first_line})"
                ) from exc
            except BaseException:
                self._release_slot()
                raise
        with self._lock:
            self._connecting -= 1
            closed = self.closed
            existing = None if closed else self._used.get(key)
            if existing is None and not closed:
                self._used[key] = conn
                self._rused[id(conn)] = key
                if self._life is not None:
                    self._life.taken_new(conn, time.monotonic())
                return conn
            # another caller opened one for this key meanwhile: keep ours for later
            if existing is not None and self._give_back(conn):
                return existing
        self._close(conn)
        if closed:
            raise PoolError("connection pool is closed")
        assert existing is not None
        return existing

    # -- checkout for callers that must not block (pgctx.scope's async blocks) --------

    def _checkout_nowait(
        self, waiter: Waiter, deadline: float | None
    ) -> Connection | Waiter | None:
        """Start a checkout without blocking, under an automatic key set on ``waiter``.

        Returns an idle connection when one needs no check; ``waiter`` when it was
        queued (first come, first served; ``waiter.wake()`` is called once it is
        served) or served at once with a free slot (``may_connect``); then
        ``_checkout_queued`` finishes the checkout. Returns None when the ordinary
        ``_acquire`` must run (a lifecycle policy decides about idle connections).
        Raises what getconn raises at once (closed, exhausted, too many waiters).
        """
        with self._lock:
            if self.closed:
                raise PoolError("connection pool is closed")
            self._keys += 1
            key = waiter.key = (AUTO, self._keys)
            self._stats.requests_num += 1
            if self._life is not None and self._pool:
                return None
            idle = self._pool
            while idle:
                conn = idle.pop()
                if not conn.closed:
                    self._used[key] = conn
                    self._rused[id(conn)] = key
                    return conn
                self._stats.connections_lost += 1
            if len(self._used) + self._connecting < self.maxconn:
                self._connecting += 1
                waiter.may_connect = True
                waiter.wake()
                return waiter
            return self._enqueue(key, deadline, waiter)

    def _checkout_queued(self, waiter: Waiter, deadline: float | None) -> Connection:
        """Finish a checkout that ``_checkout_nowait`` returned ``waiter`` for, once it was
        woken or ``deadline`` has passed: the connection handed over (checked if the
        policy says so) or one opened in the slot handed over. May block: connects and
        checks run here."""
        key, timeout = waiter.key, self.timeout
        if deadline is None:  # never queued without one: served at once with a slot
            conn = None
        else:  # woken, or past the deadline: returns at once
            conn = self._await_turn(waiter, timeout, deadline, deadline - (timeout or 0.0))
        if conn is None:
            return self._connect_reserved(key, timeout, deadline)
        life = self._life
        if not waiter.must_check or (life is not None and life.passes_check(conn, deadline)):
            return conn
        self._drop_taken(key, conn)
        assert deadline is not None
        return self._acquire(key, max(0.0, deadline - time.monotonic()))

    def _maintain(self) -> None:
        """Recycle stale idle connections, report leaks, refill to ``minconn``."""
        now = time.monotonic()
        stale: list[Connection] = []
        reports: list[tuple[float, str]] = []
        with self._lock:
            if self.closed:
                return
            if self._life is not None:
                stale = self._life.stale_idle(self._pool, self.minconn, now)
                reports = self._life.overdue(self._used, now)
                self._stats.connections_recycled += len(stale)
                self._stats.leaks_reported += len(reports)
            missing = self.minconn - len(self._pool) - len(self._used) - self._connecting
            missing = max(0, missing)
            self._connecting += missing
        for conn in stale:
            self._close(conn)
        for age, stack in reports:
            _log.warning(
                "connection checked out %.1f s ago and not returned yet (leak_timeout); "
                "it was taken at:\n%s",
                age,
                stack,
                extra=self._log_fields("leak", pgctx_age=age),
            )
        for done in range(missing):
            try:
                conn = self._new_connection()
            except Exception:
                _log.info(
                    "could not refill the pool to minconn; will retry",
                    exc_info=True,
                    extra=self._log_fields("refill_failed"),
                )
                for _ in range(missing - done):
                    self._release_slot()
                return
            with self._lock:
                self._connecting -= 1
                kept = not self.closed and self._give_back(conn)
            if not kept:
                self._close(conn)

    # -- psycopg2's hooks ------------------------------------------------------------
    # Subclasses in the wild call or override these. The pool itself uses them only
    # when a subclass overrides them (see pgctx.hooks). Called with the lock held, as
    # psycopg2's ThreadedConnectionPool calls them, they keep it all along as
    # psycopg2's do, so that an override's code around super() sees no other thread's
    # work in between; but a _getconn that may wait (a pool with a timeout) lets go
    # of it meanwhile, like Condition.wait, or no connection could come back.

    def _getconn(self, key: Any = None) -> Connection:
        """Get a free connection and assign it to ``key`` (or a new automatic key)."""
        timeouts = self._getconn_timeouts
        timeout = timeouts.get(threading.get_ident(), self.timeout) if timeouts else self.timeout
        checkout = (
            _checkout_with_getkey
            if "_getkey" in self._overridden_hooks
            else AbstractConnectionPool._checkout
        )
        if timeout is None:
            return checkout(self, key, timeout)
        with released(self._lock):
            return checkout(self, key, timeout)

    def _putconn(self, conn: Connection, key: Any = None, close: bool = False) -> None:
        """Put away a connection."""
        PoolCore.putconn(self, conn, key, close)

    def _closeall(self) -> None:
        """Close all connections, even those in use."""
        PoolCore.closeall(self)
