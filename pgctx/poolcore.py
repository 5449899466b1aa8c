"""The state and return path of psycopg2's key-based pool, without its defects.

``PoolCore`` holds what every pgctx pool has: the psycopg2 attributes
(``_pool``, ``_used``, ``_rused``, ``_keys``, ``minconn``, ``maxconn``,
``closed``), opening and closing connections, ``putconn`` with hand-off to
waiters, ``closeall``, statistics and fork handling. ``basepool`` adds the
checkout path on top of it. Compared with psycopg2: keys are checked before
anything changes, no connect or rollback runs under the lock, a failed
rollback still frees the slot, and a failing constructor closes what it opened.
"""

from __future__ import annotations

import logging
import os
import time
from contextlib import nullcontext
from typing import Any, ClassVar

from pgctx import forksafe
from pgctx._driver import extensions, psycopg2
from pgctx._dsn import describe_target, scrubbed, secrets_of
from pgctx.connecting import ConnectParams, check_connect_arguments
from pgctx.errors import PoolError
from pgctx.hooks import open_through_connect
from pgctx.lifecycle import Lifecycle
from pgctx.maintenance import Maintenance
from pgctx.stats import PoolStats
from pgctx.waiting import Connection, WaitQueue, validate_max_waiting, validate_timeout
from pgctx.watchdog import WATCHDOG

_log = logging.getLogger("pgctx")

_UNSET: Any = object()  # "use the pool's timeout" for getconn(timeout=...)
_IDLE = extensions.TRANSACTION_STATUS_IDLE
_UNKNOWN = extensions.TRANSACTION_STATUS_UNKNOWN
_LIFECYCLE_OPTIONS = (
    "check", "check_after_idle", "max_lifetime", "max_idle", "reset", "configure", "leak_timeout",
)  # fmt: skip


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


class PoolCore(forksafe.PerProcess):
    """State, connecting, returning and closing; see ``AbstractConnectionPool``."""

    _overridden_hooks: ClassVar[frozenset[str]] = frozenset()  # set per class: pgctx.hooks

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
        options = {name: kwargs.pop(name) for name in _LIFECYCLE_OPTIONS if name in kwargs}
        self._life = Lifecycle(**options) if any(v is not None for v in options.values()) else None
        self.closed = False

        self._args = args
        self._kwargs = kwargs
        if "_connect" not in self._overridden_hooks:  # an override may take other keywords
            check_connect_arguments(args, kwargs)
        self._label = f"{type(self).__name__} {describe_target(args, kwargs)}"
        self._secrets = secrets_of(args, kwargs)  # masked in the errors of connects
        if self._life is not None:
            self._life.pool_label = self._label
        self._connect_params = ConnectParams(args, kwargs, self.timeout)
        self._pool: list[Connection] = []  # idle connections; the last returned is reused first
        self._used: dict[Any, Connection] = {}  # key -> checked-out connection
        self._rused: dict[int, Any] = {}  # id(conn) -> key
        self._keys = 0  # last automatic key number
        # Reentrant: subclasses may call _getconn under it. A child process gets its own.
        self._process_locks: dict[int, Any] = {}
        self._lock = forksafe.lock_for_this_process(self._process_locks)
        self._lock_pid = self._owner_pid = os.getpid()  # whose lock; whose connections
        self._ready = forksafe.process_flag()  # set by the first checkout or return here
        self._connecting = 0  # slots reserved by connects running outside the lock
        self._waiters = WaitQueue()
        self._stats = PoolStats()

        try:
            for _ in range(self.minconn):
                self._pool.append(self._new_connection())
        except BaseException:
            for conn in self._pool:
                self._close(conn)
            self._pool.clear()
            raise
        forksafe.track(self)
        self._maintenance: Maintenance | None = None  # started at first use, per process
        self._maintenance_interval: float | None = None
        if (self._life is not None and self._life.needs_maintenance) or (
            self.timeout is not None and self.minconn
        ):
            self._maintenance_interval = self._life.maintenance_interval if self._life else 5.0

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"idle={len(self._pool)} used={len(self._used)}"
        return (
            f"<{type(self).__name__} minconn={self.minconn} maxconn={self.maxconn} {state} "
            f"target={describe_target(self._args, self._kwargs)!r}>"
        )

    # -- connecting ---------------------------------------------------------------

    def _open(self, deadline: float | None = None) -> Connection:
        """Open and configure a new connection (never under the lock).

        With a ``deadline`` (a monotonic time), libpq's ``connect_timeout`` is
        what is left of it, unless the DSN sets its own.
        """
        started = time.monotonic()
        if deadline is None and self.timeout is not None:
            deadline = started + self.timeout
        try:
            kwargs = self._connect_params.for_deadline(deadline)
            conn: Connection = psycopg2.connect(*self._args, **kwargs)
            if self._life is not None:
                try:
                    self._life.opened(conn)
                except BaseException:
                    _close_quietly(conn)
                    raise
        except BaseException as exc:
            with self._lock:
                self._stats.connections_errors += 1
            # libpq quotes what it could not use, which may be part of a password
            clean = scrubbed(exc, self._secrets) if isinstance(exc, psycopg2.Error) else None
            if clean is None:
                raise
        else:
            clean = None
        if clean is not None:
            raise clean  # outside the except: the original is not kept as its context
        with self._lock:
            self._stats.connections_num += 1
            self._stats.connections_ms += (time.monotonic() - started) * 1000
        return conn

    def _new_connection(self, key: Any = None, deadline: float | None = None) -> Connection:
        """Open a connection for the pool, through the class's own ``_connect`` if it has one."""
        if "_connect" in self._overridden_hooks:
            return open_through_connect(self, key)
        return self._open(deadline)

    def _log_fields(self, event: str, **more: object) -> dict[str, object]:
        """Structured fields for pgctx's log records (no password: see describe_target)."""
        return {"pgctx_event": event, "pgctx_pool": self._label, **more}

    def _close(self, conn: Connection) -> None:
        """Close a connection that leaves the pool for good (never under the lock)."""
        if self._life is not None:
            self._life.forget(conn)
        if self._owner_pid != os.getpid():  # a path that skipped _enter_process in a child
            forksafe.disown(conn)
        _close_quietly(conn)

    def _connect(self, key: Any = None) -> Connection:
        """Open a connection and register it under ``key`` (or make it idle), as psycopg2 does."""
        conn = self._open()
        with self._lock:
            if key is not None:
                self._rused[id(conn)] = key
                self._used[key] = conn
            else:
                self._pool.append(conn)
        return conn

    def _getkey(self) -> tuple[_AutoKeyMark, int]:
        self._keys += 1
        return (AUTO, self._keys)

    def _release_slot(self) -> None:
        with self._lock:
            self._connecting -= 1
            self._serve_waiter(None)

    # -- return -------------------------------------------------------------------

    def putconn(self, conn: Connection | None = None, key: Any = None, close: bool = False) -> None:
        """Put a connection back; close it instead if ``close`` is true.

        An unfinished transaction is rolled back first. Connections beyond
        ``minconn`` idle ones are closed, as in psycopg2.
        """
        if not self._ready[0]:  # the first return in this process (see _enter_process)
            self._enter_process()
        life = self._life
        dirty = -1  # the status of a connection to roll back or reset outside the lock
        try:
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
                if life is not None:
                    life.returned(conn, time.monotonic())  # also reports a leak coming back
                if close or conn.closed:
                    self._forget(key, conn)
                    self._serve_waiter(None)
                    if conn.closed:  # psycopg2 drops closed connections silently
                        self._stats.returns_bad += 1
                        if life is not None:
                            life.forget(conn)
                        return
                    self._stats.connections_discarded += 1
                else:
                    status = conn.get_transaction_status()  # conn.info costs an allocation
                    if status == _IDLE and life is None:
                        del self._rused[id(conn)]
                        del self._used[key]
                        if self._waiters and self._serve_waiter(conn):
                            return
                        if len(self._pool) < self.minconn:
                            self._pool.append(conn)
                            return
                        self._stats.connections_discarded += 1
                    elif status == _UNKNOWN:
                        self._forget(key, conn)
                        self._serve_waiter(None)
                        self._stats.returns_bad += 1
                    elif not self._waiters and len(self._pool) >= self._idle_limit():
                        # it would be closed anyway: psycopg2 skips the rollback too
                        self._forget(key, conn)
                        self._stats.connections_discarded += 1
                    elif life is not None and life.expired(conn, time.monotonic()):
                        self._forget(key, conn)
                        self._serve_waiter(None)
                        self._stats.connections_recycled += 1
                    elif status == _IDLE and (life is None or life.reset is None):
                        self._forget(key, conn)
                        if self._give_back(conn):
                            return
                    else:
                        dirty = status
            if dirty >= 0:  # the slot stays taken while it runs: no lock held, no waiter served
                return self._clean_and_return(conn, key, dirty)
        except Exception:
            raise  # misuse (a wrong key, a foreign connection), or raised after cleaning up
        except BaseException:  # an interrupt: the caller gave the connection up
            self._discard_returned(conn, key)
            raise
        self._close(conn)

    def _discard_returned(self, conn: Connection | None, key: Any) -> None:
        """Close a connection whose return was cut short, unless it went back already."""
        with self._lock:
            if key is None:
                key = self._rused.get(id(conn))
            try:
                out = not self.closed and key is not None and self._used.get(key) is conn
            except TypeError:  # an unhashable key
                return
            if not out or conn is None:
                return
            self._forget(key, conn)
            self._serve_waiter(None)
            self._stats.returns_bad += 1
        self._close(conn)

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

    def _clean_and_return(self, conn: Connection, key: Any, status: int) -> None:
        """Roll back and reset outside the lock (the slot stays taken), then return or discard."""
        # With a timeout, a server that stopped answering must not hold putconn forever.
        bound = WATCHDOG.deadline(conn, max(self.timeout, 5.0)) if self.timeout else nullcontext()
        usable = True
        try:
            with bound:
                if status != _IDLE:
                    try:
                        conn.rollback()
                        usable = conn.get_transaction_status() == _IDLE
                    except Exception:
                        _log.warning(
                            "rollback failed on return; discarding the connection",
                            exc_info=True,
                            extra=self._log_fields("rollback_failed"),
                        )
                        usable = False
                if usable and self._life is not None:
                    usable = self._life.cleans_up(conn)
        except BaseException:  # interrupted, or a bug in the reset callable: discard it
            self._discard_returned(conn, key)
            raise
        with self._lock:
            if not usable:
                self._stats.returns_bad += 1
            if self.closed or self._used.get(key) is not conn:
                pass  # closeall() ran meanwhile, or a concurrent second putconn won
            else:
                self._forget(key, conn)
                if usable and self._give_back(conn):
                    return
                self._serve_waiter(None)
        self._close(conn)

    def _forget(self, key: Any, conn: Connection) -> None:
        # _rused first everywhere: an interrupt can only strike at a call (here id()),
        # so the two maps never disagree (also when they are filled)
        del self._rused[id(conn)]
        del self._used[key]

    def _idle_limit(self) -> int:
        """How many idle connections to keep: ``minconn``, or ``maxconn`` with ``max_idle``."""
        life = self._life
        return self.maxconn if life is not None and life.max_idle else self.minconn

    def _give_back(self, conn: Connection) -> bool:
        """Hand a clean connection to the oldest waiter or keep it idle (lock held).

        Returns False if the pool has no use for it (the caller closes it). The
        connection's idle clock is the caller's business: putconn starts it, and a
        new connection's starts when it is opened.
        """
        if self._waiters and self._serve_waiter(conn):
            return True
        if len(self._pool) < self._idle_limit():
            self._pool.append(conn)
            return True
        self._stats.connections_discarded += 1
        return False

    def _serve_waiter(self, conn: Connection | None) -> bool:
        """Give ``conn`` (None: a free slot) to the oldest waiter (lock held); True if taken."""
        waiters = self._waiters
        while waiters:
            waiter = waiters.popleft()
            existing = self._used.get(waiter.key)
            if existing is not None:  # its key was checked out meanwhile: same key, same conn
                waiter.conn = existing
                waiter.joined = True
                waiter.wake()
                continue
            if conn is None:
                self._connecting += 1
                waiter.may_connect = True
            else:
                self._rused[id(conn)] = waiter.key
                self._used[waiter.key] = conn
                waiter.conn = conn
            waiter.wake()
            return True
        return False

    # -- closing, statistics, maintenance, fork -------------------------------------

    def closeall(self) -> None:
        """Close every connection, including those checked out; the pool is then closed."""
        if not self._ready[0]:
            self._enter_process(first_use=False)  # never close a parent's connections
        with self._lock:
            if self.closed:
                raise PoolError("connection pool is closed")
            conns = self._pool + list(self._used.values())
            self.closed = True
            self._waiters.fail_all(PoolError("connection pool is closed"))
            if self._maintenance is not None:
                self._maintenance.stop()
        for conn in conns:
            self._close(conn)

    def get_stats(self) -> dict[str, float]:
        """Counters since the pool was created, and the pool's current sizes."""
        if not self._ready[0]:
            self._enter_process(first_use=False)  # a parent's connections are not ours
        with self._lock:
            # closeall() keeps psycopg2's maps filled, but nothing in them is open
            idle, used = (0, 0) if self.closed else (len(self._pool), len(self._used))
            return self._stats.snapshot(
                self.minconn, self.maxconn, idle, used, self._connecting, len(self._waiters)
            )

    def _maintain(self) -> None:
        """Periodic upkeep run by the maintenance thread (see AbstractConnectionPool)."""
