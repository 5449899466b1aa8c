"""The opt-in per-connection policies of a pool and the bookkeeping they need.

``check`` on checkout, ``configure`` on connect, ``reset`` on return,
``max_lifetime`` and ``max_idle`` for recycling, ``leak_timeout`` for leak
reports. A pool without any of them has no ``Lifecycle`` at all, so its hot
path pays nothing for them.
"""

from __future__ import annotations

import inspect
import logging
import os
import random
import time
import traceback
from collections.abc import Callable
from typing import Any

from pgctx._driver import psycopg2
from pgctx.errors import note_on
from pgctx.health import is_broken
from pgctx.waiting import Connection, validate_timeout
from pgctx.watchdog import WATCHDOG

_log = logging.getLogger("pgctx")
_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))

ConnectionHook = Callable[[Connection], object]
CHECK_GRACE = 0.1  # seconds a check may take even when the caller's deadline has passed
LIFETIME_JITTER = 0.1  # lifetimes are shortened by up to 10% so connections don't expire together


class ConnInfo:
    """What the pool remembers about one of its connections."""

    __slots__ = ("expires", "idle_since", "reported", "taken_at", "taken_from")

    def __init__(self, now: float, expires: float) -> None:
        self.expires = expires
        self.idle_since = now
        self.taken_at = 0.0
        self.taken_from: list[traceback.FrameSummary] | None = None  # strings, no frames
        self.reported = False


def _callers_stack() -> list[traceback.FrameSummary]:
    """The stack of the code taking a connection, without pgctx's own frames."""
    return [f for f in traceback.extract_stack() if not f.filename.startswith(_PACKAGE_DIR)]


def _hook(value: object, name: str) -> ConnectionHook | None:
    """Check a hook option: None, or a callable that accepts the connection positionally."""
    if value is None:
        return None
    if not callable(value):
        raise TypeError(
            f"{name} must be a callable taking the connection, got {value!r} "
            f"({type(value).__name__})"
        )
    try:
        signature = inspect.signature(value)
    except (TypeError, ValueError):  # some builtins and C callables cannot be inspected
        return value
    try:
        signature.bind(None)
    except TypeError:
        raise TypeError(
            f"{name} must accept the connection as its one positional argument, but "
            f"{value!r} has the signature {signature}: define it as {name}(conn)"
        ) from None
    return value


def _blame_hook(exc: BaseException, name: str, outcome: str) -> None:
    """Note on ``exc`` that the pool's ``name`` callable raised it (a bug in the callable).

    Python 3.11+ prints notes with the traceback; on 3.10 the note is kept in
    ``__notes__``, where ``add_note`` would put it.
    """
    text = (
        f"pgctx: raised by the pool's {name} callable, which is taken as a bug in it "
        f"(a connection fails its {name} when the callable raises a psycopg2.Error); "
        f"{outcome}"
    )
    note_on(exc, text)


def _is_connection_failure(conn: Connection) -> bool:
    """After a hook raised something else than a psycopg2.Error: is the connection at fault?"""
    try:
        return is_broken(conn)
    except Exception:  # not even its status can be read
        return True


def _seconds(value: object, name: str) -> float | None:
    seconds = validate_timeout(value, name)
    if seconds == 0:
        raise ValueError(f"{name} must be > 0 seconds (or None to disable it), got {value!r}")
    return seconds


class Lifecycle:
    """Runs a pool's connection hooks and tracks ages, idle times and borrowers."""

    def __init__(
        self,
        *,
        check: object = None,
        check_after_idle: object = None,
        max_lifetime: object = None,
        max_idle: object = None,
        reset: object = None,
        configure: object = None,
        leak_timeout: object = None,
    ) -> None:
        self.check = _hook(check, "check")
        self.reset = _hook(reset, "reset")
        self.configure = _hook(configure, "configure")
        self.check_after_idle = validate_timeout(check_after_idle, "check_after_idle")
        if self.check_after_idle is not None and self.check is None:
            raise ValueError(
                "check_after_idle has no effect without check: pass "
                "check=pgctx.check_connection (or your own callable)"
            )
        self.max_lifetime = _seconds(max_lifetime, "max_lifetime")
        self.max_idle = _seconds(max_idle, "max_idle")
        self.leak_timeout = _seconds(leak_timeout, "leak_timeout")
        self.info: dict[int, ConnInfo] = {}  # id(conn) -> info, for connections of the pool
        self.pool_label = "pool"  # set by the pool: names it in log records

    def log_fields(self, event: str, **more: object) -> dict[str, object]:
        """The structured fields of a log record: ``pgctx_event``, ``pgctx_pool``, more."""
        return {"pgctx_event": event, "pgctx_pool": self.pool_label, **more}

    @property
    def needs_maintenance(self) -> bool:
        """Whether something must happen while the pool is not being called."""
        return bool(self.max_idle or self.max_lifetime or self.leak_timeout)

    @property
    def maintenance_interval(self) -> float:
        periods = [p for p in (self.max_idle, self.max_lifetime, self.leak_timeout) if p]
        return min(5.0, max(0.05, min(periods) / 4)) if periods else 5.0

    # -- connect / close -----------------------------------------------------------

    def opened(self, conn: Connection) -> None:
        """Configure a new connection (raising if that fails) and start tracking it.

        A psycopg2.Error from ``configure`` is a failed connect; anything else is a
        bug in the callable and gets a note saying so (the pool closes the connection).
        """
        if self.configure is not None:
            try:
                self.configure(conn)
            except psycopg2.Error:
                raise
            except Exception as exc:
                if not _is_connection_failure(conn):
                    _blame_hook(exc, "configure", "the new connection was closed")
                raise
        now = time.monotonic()
        expires = float("inf")
        if self.max_lifetime is not None:
            expires = now + self.max_lifetime * (1 - random.uniform(0, LIFETIME_JITTER))
        self.info[id(conn)] = ConnInfo(now, expires)

    def forget(self, conn: Connection) -> None:
        """Stop tracking a connection that leaves the pool for good."""
        self.info.pop(id(conn), None)

    def expired(self, conn: Connection, now: float) -> bool:
        info = self.info.get(id(conn))
        return info is not None and now >= info.expires

    # -- checkout / return ---------------------------------------------------------

    def taken(self, conn: Connection, now: float) -> bool:
        """Note a checkout from the idle list; return whether ``check`` must run on it."""
        info = self.info.get(id(conn))
        if info is None:
            return self.check is not None
        if self.leak_timeout is not None:
            info.taken_at = now
            info.taken_from = _callers_stack()
            info.reported = False
        if self.check is None:
            return False
        after = self.check_after_idle
        return after is None or now - info.idle_since >= after

    def taken_new(self, conn: Connection, now: float) -> None:
        """Note the checkout of a connection opened for the caller (never checked)."""
        if self.leak_timeout is not None:
            info = self.info.get(id(conn))
            if info is not None:
                info.taken_at = now
                info.taken_from = _callers_stack()

    def passes_check(self, conn: Connection, deadline: float | None) -> bool:
        """Run ``check``: True if the connection passed, False if it failed.

        It failed when the callable raised a psycopg2.Error or left the connection
        broken; with a deadline, a check still running then fails. Anything else the
        callable raises is a bug in it: raised with a note (the connection is fine).
        """
        assert self.check is not None
        try:
            if deadline is None:
                self.check(conn)
            else:
                with WATCHDOG.deadline(conn, max(deadline - time.monotonic(), CHECK_GRACE)):
                    self.check(conn)
            return True
        except Exception as exc:
            if not isinstance(exc, psycopg2.Error) and not _is_connection_failure(conn):
                _blame_hook(exc, "check", "the connection was put back in the pool")
                raise
            _log.info(
                "connection failed its check on checkout; discarding it",
                exc_info=True,
                extra=self.log_fields("check_failed"),
            )
            return False

    def returned(self, conn: Connection, now: float) -> None:
        """Note a connection coming back idle; report the return of a reported leak."""
        info = self.info.get(id(conn))
        if info is None:
            return
        info.idle_since = now
        if info.reported:
            age = now - info.taken_at
            _log.warning(
                "connection reported as leaked came back after %.1f s",
                age,
                extra=self.log_fields("leak_returned", pgctx_age=age),
            )
            info.reported = False

    def cleans_up(self, conn: Connection) -> bool:
        """Run ``reset`` on a returned connection; False (logged) if it failed.

        It failed when the callable raised a psycopg2.Error or left the connection
        broken. Anything else is a bug in the callable: raised with a note (the pool
        closes the connection, whose session may not have been reset).
        """
        if self.reset is None:
            return True
        try:
            self.reset(conn)
            return True
        except Exception as exc:
            if not isinstance(exc, psycopg2.Error) and not _is_connection_failure(conn):
                _blame_hook(exc, "reset", "the connection was closed: its session may hold state")
                raise
            _log.warning(
                "reset failed on return; discarding the connection",
                exc_info=True,
                extra=self.log_fields("reset_failed"),
            )
            return False

    # -- maintenance ---------------------------------------------------------------

    def stale_idle(self, idle: list[Connection], keep: int, now: float) -> list[Connection]:
        """Remove from ``idle`` the connections past their lifetime or ``max_idle``.

        Idle-time closing never goes below ``keep`` connections; lifetime
        closing does (the pool refills to ``minconn`` with new ones).
        """
        stale = []
        for conn in list(idle):  # oldest first: the list is used LIFO from the end
            info = self.info.get(id(conn))
            if info is None:
                continue
            too_old = now >= info.expires
            too_idle = (
                self.max_idle is not None
                and now - info.idle_since >= self.max_idle
                and len(idle) > keep
            )
            if too_old or too_idle:
                idle.remove(conn)
                stale.append(conn)
        return stale

    def overdue(self, used: dict[Any, Connection], now: float) -> list[tuple[float, str]]:
        """Mark borrowed connections out longer than ``leak_timeout``; return new reports."""
        if self.leak_timeout is None:
            return []
        reports = []
        for conn in used.values():
            info = self.info.get(id(conn))
            if info is None or info.reported or not info.taken_at:
                continue
            if now - info.taken_at >= self.leak_timeout:
                info.reported = True
                stack = "".join(traceback.format_list(info.taken_from or []))
                reports.append((now - info.taken_at, stack))
        return reports
