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
        taken = None
        try:
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
                            self._rused[id(conn)] = key
                            self._used[key] = conn
                            taken = conn
                            return conn
                        self._stats.connections_lost += 1
        except BaseException:  # an interrupt as the lock was released: give it back
            if taken is not None:
                self._return_unused(key, taken)
            raise
        return self._acquire(key, timeout)

    def _acquire(self, key: Any, timeout: float | None) -> Connection:
        """Take an idle connection under the policies, open one, or wait for one.

        What the caller holds at each step (a connection taken for it, a reserved
        slot, a place in the queue) is kept in a local variable set right after the
        change, with no call in between where an interrupt could strike, so that
        an interrupt gives it back (``_unwind``).
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        life = self._life
        while True:
            stale: list[Connection] = []
            held = waiter = slot = None
            must_check = False
            try:
                with self._lock:
                    if self.closed:
                        raise PoolError("connection pool is closed")
                    conn = self._used.get(key)  # a caller with the same key got there first
                    if conn is not None:
                        return conn
                    conn = self._pop_idle(stale)
                    if conn is not None and stale:
                        self._pool.append(conn)  # close the stale ones first, holding nothing
                    elif conn is not None:
                        must_check = life is not None and life.taken(conn, time.monotonic())
                        self._rused[id(conn)] = key
                        self._used[key] = conn
                        held = conn
                    elif len(self._used) + self._connecting < self.maxconn:
                        self._connecting += 1
                        slot = [True]
                    else:
                        waiter = self._enqueue(key, deadline)
                if stale:
                    for old in stale:
                        self._close(old)
                    continue
                if waiter is not None:
                    conn = self._await_turn(waiter, timeout, deadline)
                    if conn is None:
                        waiter.may_connect = False
                        slot = [True]  # the waiter's slot, now held here
                        return self._connect_reserved(key, timeout, deadline, slot)
                    must_check = waiter.must_check
                elif conn is None:
                    return self._connect_reserved(key, timeout, deadline, slot)
                if not must_check:
                    return conn
                assert life is not None
                try:
                    passed = life.passes_check(conn, deadline)
                except Exception:  # a bug in the check callable: the connection is fine
                    PoolCore.putconn(self, conn, key)
                    held = waiter = None
                    raise
                except BaseException:  # interrupted in the middle of the check: state unknown
                    self._drop_taken(key, conn)
                    held = waiter = None
                    raise
                if passed:
                    return conn
                self._drop_taken(key, conn)  # failed its check: try another within the deadline
                held = waiter = None
            except BaseException:
                self._unwind(key, held, slot is not None and slot[0], waiter)
                raise

    def _unwind(
        self, key: Any, held: Connection | None, reserved: bool, waiter: Waiter | None
    ) -> None:
        """Give back what an interrupted checkout held: a connection, a slot, a place in line."""
        if waiter is not None:
            self._abandon(waiter)
        if reserved:
            self._release_slot()
        if held is not None:
            self._return_unused(key, held)

    def _return_unused(self, key: Any, conn: Connection) -> None:
        """Put back a connection taken for a caller that never got it (an interrupt)."""
        close = False
        with self._lock:
            if self._used.get(key) is conn:
                self._forget(key, conn)
                close = self.closed or not self._give_back(conn)
        if close:
            self._close(conn)

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
        # `+=`, not append(): an interrupt can strike right after a call returns, which
        # here would leave the waiter queued with nobody knowing it
        self._waiters += (waiter,)
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
        try:
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
        except BaseException:  # an interrupt (or a timeout): leave nothing behind
            self._abandon(waiter)
            raise
        if waiter.error is not None:
            raise waiter.error
        return waiter.conn

    def _abandon(self, waiter: Waiter) -> None:
        """Undo a wait ended by an exception: leave the queue, or give back what was served.

        A waiter served just as the interrupt came holds a connection (or a slot to
        connect in) that nobody would ever return: it goes to the next waiter or the
        idle list. A connection it joined belongs to the caller holding its key.
        """
        with self._lock:
            self._waiters.discard(waiter)  # never served: nothing else to undo
            conn, slot, joined = waiter.conn, waiter.may_connect, waiter.joined
            waiter.conn, waiter.may_connect = None, False  # undone once only
            if slot:
                self._connecting -= 1
                self._serve_waiter(None)
        if conn is not None and not joined:
            self._return_unused(waiter.key, conn)

    def _connect_reserved(
        self,
        key: Any,
        timeout: float | None,
        deadline: float | None,
        slot: list[bool] | None = None,
    ) -> Connection:
        """Open a connection for a slot reserved under the lock, and register it.

        Without a deadline a failed connect raises at once, as in psycopg2; with
        one, it is retried with jittered exponential backoff until the deadline.
        The slot is this method's from its first statement on (``slot[0] = False``
        tells the caller, who frees it if an interrupt comes before).
        """
        if slot is not None:
            slot[0] = False
        backoff = None
        try:  # the slot is freed whatever ends the attempts, also during a backoff pause
            while True:
                try:
                    conn = self._new_connection(key, deadline)
                    break
                except psycopg2.OperationalError as exc:
                    if deadline is None or self.closed:
                        raise
                    backoff = backoff or Backoff()
                    if backoff.pause(deadline):
                        continue
                    with self._lock:
                        self._stats.requests_timeouts += 1
                    text = str(exc).strip()
                    first_line = text.splitlines()[0] if text else "?"
                    raise PoolTimeout(
                        f"connection pool exhausted: could not connect within {timeout:g} s "
                        f"(last error: {first_line})"
                    ) from exc
        except BaseException:
            self._release_slot()
            raise
        ours = True  # the slot is still reserved and conn is ours to close
        try:
            with self._lock:
                closed = self.closed
                existing = None if closed else self._used.get(key)
                if existing is None and not closed:
                    if self._life is not None:
                        self._life.taken_new(conn, time.monotonic())
                    cid = id(conn)
                    # from here to `ours = False`, no call where an interrupt could strike
                    self._connecting -= 1
                    self._rused[cid] = key
                    self._used[key] = conn
                    ours = False
                    return conn
                self._connecting -= 1
                ours = False
                # another caller opened one for this key meanwhile: keep ours for later
                if existing is not None and self._give_back(conn):
                    return existing
        except BaseException:
            if ours:  # interrupted before the slot became the connection
                self._release_slot()
                self._close(conn)
            elif self._used.get(key) is conn:  # registered, but the caller never got it
                self._return_unused(key, conn)
            raise
        self._close(conn)
        if closed:
            raise PoolError("connection pool is closed")
        assert existing is not None
        return existing

    def _maintain(self) -> None:
        """Recycle stale idle connections, report leaks, refill to ``minconn``."""
        now = time.monotonic()
        stale: list[Connection] = []
        reports: list[tuple[float, str]] = []
        reserved = 0  # slots reserved for the refill and not used yet
        try:
            with self._lock:
                if self.closed:
                    return
                if self._life is not None:
                    stale = self._life.stale_idle(self._pool, self.minconn, now)
                    reports = self._life.overdue(self._used, now)
                    self._stats.connections_recycled += len(stale)
                    self._stats.leaks_reported += len(reports)
                used = len(self._pool) + len(self._used) + self._connecting
                missing = max(0, self.minconn - used)
                self._connecting += missing
                reserved = missing  # no call in between: an interrupt finds both or neither
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
            while reserved:
                try:
                    conn = self._new_connection()
                except Exception as exc:
                    bug = not isinstance(exc, psycopg2.Error)  # e.g. from the configure callable
                    _log.log(
                        logging.ERROR if bug else logging.INFO,
                        "could not refill the pool to minconn; will retry",
                        exc_info=True,
                        extra=self._log_fields("refill_failed"),
                    )
                    break
                with self._lock:
                    self._connecting -= 1
                    reserved -= 1
                    kept = not self.closed and self._give_back(conn)
                if not kept:
                    self._close(conn)
        finally:  # the slots not used: after a failed connect, or an interrupt
            for _ in range(reserved):
                self._release_slot()

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
        if not self._ready[0]:  # the first checkout in this process (see _enter_process)
            self._enter_process()
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
