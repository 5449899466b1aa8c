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
import time
from typing import Any

from pgctx._driver import psycopg2
from pgctx.connecting import Backoff
from pgctx.errors import PoolError, PoolTimeout, TooManyWaiters
from pgctx.poolcore import AUTO, PoolCore, _check_hashable
from pgctx.waiting import Connection, Waiter

_log = logging.getLogger("pgctx")


class AbstractConnectionPool(PoolCore):
    """Generic key-based pooling code, as in psycopg2 (whose docs describe this class).

    Arguments after ``minconn`` and ``maxconn`` go to ``psycopg2.connect()``;
    pgctx's own options are keyword-only names libpq does not know.
    """

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
            if not must_check:
                return conn
            assert life is not None
            try:
                passed = life.passes_check(conn, deadline)
            except Exception:  # a bug in the check callable: the connection is fine
                PoolCore.putconn(self, conn, key)
                raise
            except BaseException:  # interrupted in the middle of the check: state unknown
                self._drop_taken(key, conn)
                raise
            if passed:
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

    def _enqueue(self, key: Any, deadline: float | None) -> Waiter:
        """Queue a caller for a connection, or refuse it (lock held)."""
        if deadline is None:
            raise PoolError("connection pool exhausted")
        if self.max_waiting and len(self._waiters) >= self.max_waiting:
            self._stats.requests_errors += 1
            raise TooManyWaiters(
                f"connection pool exhausted: {len(self._waiters)} callers are already "
                f"waiting (max_waiting={self.max_waiting})"
            )
        self._stats.requests_queued += 1
        waiter = Waiter(key)
        self._waiters.append(waiter)
        return waiter

    def _await_turn(
        self, waiter: Waiter, timeout: float | None, deadline: float | None
    ) -> Connection | None:
        """Wait to be served: a connection, or None for a slot to connect in."""
        assert deadline is not None
        started = time.monotonic()
        try:
            waiter.wait(max(0.0, deadline - started))  # the deadline may be past (a slow check)
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
        close = None
        with self._lock:
            self._waiters.discard(waiter)  # never served: nothing else to undo
            conn, slot, joined = waiter.conn, waiter.may_connect, waiter.joined
            waiter.conn, waiter.may_connect = None, False  # undone once only
            if slot:
                self._connecting -= 1
                self._serve_waiter(None)
            elif conn is not None and not joined and self._used.get(waiter.key) is conn:
                self._forget(waiter.key, conn)
                if self.closed or not self._give_back(conn):
                    close = conn
        if close is not None:
            self._close(close)

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
                conn = self._open(deadline)
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
                conn = self._open()
            except BaseException as exc:
                for _ in range(missing - done):  # the slots reserved above, this one included
                    self._release_slot()
                if not isinstance(exc, Exception):
                    raise  # the maintenance thread logs it and goes on
                bug = not isinstance(exc, psycopg2.Error)  # e.g. from the configure callable
                _log.log(
                    logging.ERROR if bug else logging.INFO,
                    "could not refill the pool to minconn; will retry",
                    exc_info=True,
                    extra=self._log_fields("refill_failed"),
                )
                return
            with self._lock:
                self._connecting -= 1
                kept = not self.closed and self._give_back(conn)
            if not kept:
                self._close(conn)

    # psycopg2's unlocked implementations, which subclasses in the wild call or override.
    _getconn = getconn
    _putconn = PoolCore.putconn
    _closeall = PoolCore.closeall
