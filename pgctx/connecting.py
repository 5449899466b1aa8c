"""Opening connections for a pool that promises bounded waits.

With ``timeout`` set, a borrower must not wait much longer than it, even when
the network drops packets: connects need ``connect_timeout`` (taken from the
time the caller has left) and established connections need TCP keepalives and
``tcp_user_timeout``, which libpq leaves off by default. These are added only
where the user's DSN and keyword arguments do not set their own.
"""

from __future__ import annotations

import math
import random
import time
from typing import Any

from pgctx._driver import extensions, psycopg2
from pgctx._dsn import MISREAD_URI, is_uri, misreads_password, redact, secrets_of

BACKOFF_FIRST = 0.05  # seconds before the first retry of a failed connect
BACKOFF_MAX = 2.0  # longest pause between retries
LIBPQ_MIN_CONNECT_TIMEOUT = 2  # libpq treats smaller values as 2 seconds
LIBPQ_INT_MAX = 2**31 - 1  # libpq reads integer options into a C int and rejects larger ones

# psycopg2.connect() arguments that are not libpq connection options
_DRIVER_ARGUMENTS = frozenset({"connection_factory", "cursor_factory", "async", "async_"})


def _given_options(args: tuple[Any, ...], kwargs: dict[str, Any]) -> set[str] | None:
    """The libpq options the DSN and keyword arguments set; None if the DSN is unparseable."""
    given = set(kwargs)
    dsn = args[0] if args else kwargs.get("dsn")
    if isinstance(dsn, str) and dsn:
        try:
            given.update(extensions.parse_dsn(dsn))
        except psycopg2.ProgrammingError:
            return None
    return given


def check_connect_arguments(args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    """Raise psycopg2's own error now for a DSN or option libpq would reject at connect.

    psycopg2.pool passes unknown keywords (a misspelt ``timout=``) to libpq and
    only fails at the first connect, which with ``minconn=0`` may be much later.
    """
    if len(args) > 1:
        return  # an unusual call: let psycopg2.connect() judge it
    dsn = args[0] if args else kwargs.get("dsn")
    options = {k: v for k, v in kwargs.items() if k not in _DRIVER_ARGUMENTS and k != "dsn"}
    for name, value in [("dsn", dsn), *options.items()]:
        if isinstance(value, str) and "\x00" in value:  # libpq takes C strings
            raise ValueError(
                f"the {name} argument contains a NUL character, which libpq cannot take "
                "(its value is not shown: it may be a password)"
            )
    try:
        extensions.make_dsn(dsn, **options)
    except psycopg2.ProgrammingError as exc:  # its message quotes the DSN: mask secrets
        problem = (
            f"{redact(str(exc).strip(), secrets_of(args, kwargs))} (the pool passes every "
            "argument it does not know to psycopg2.connect(); pgctx's own options are "
            "timeout, max_waiting, check, check_after_idle, max_lifetime, max_idle, reset, "
            "configure and leak_timeout)"
        )
    except UnicodeDecodeError:  # from psycopg2, about a decoded part of the DSN
        problem = "invalid dsn: a percent-encoded part of the URI is not valid UTF-8"
    else:
        if not (is_uri(dsn) and misreads_password(dsn, extensions.parse_dsn(dsn))):
            return
        problem = f"invalid dsn: {MISREAD_URI}"
    raise psycopg2.ProgrammingError(problem)  # outside the except: no context to show


class ConnectParams:
    """The keyword arguments of each connect a pool makes."""

    __slots__ = ("_deadline_sets_timeout", "args", "kwargs")

    def __init__(self, args: tuple[Any, ...], kwargs: dict[str, Any], timeout: float | None):
        self.args = args
        self.kwargs = kwargs
        given = _given_options(args, kwargs)
        # The caller's deadline decides connect_timeout unless the user chose one.
        self._deadline_sets_timeout = given is not None and "connect_timeout" not in given
        if timeout is not None and given is not None:
            defaults = {
                "keepalives": 1,
                "keepalives_idle": 10,
                "keepalives_interval": 5,
                "keepalives_count": 3,
                # unacknowledged data fails the connection after this (ms); never below
                # 5 s, so that a short pool timeout does not turn a hiccup into errors
                # (a C int of milliseconds: a timeout beyond ~24.8 days is clamped)
                "tcp_user_timeout": min(LIBPQ_INT_MAX, max(5000, math.ceil(timeout * 1000))),
            }
            self.kwargs = {**{k: v for k, v in defaults.items() if k not in given}, **kwargs}

    def for_deadline(self, deadline: float | None) -> dict[str, Any]:
        """The keyword arguments for a connect that must end by ``deadline``."""
        if deadline is None or not self._deadline_sets_timeout:
            return self.kwargs
        left = min(LIBPQ_INT_MAX, math.ceil(deadline - time.monotonic()))
        return {**self.kwargs, "connect_timeout": max(LIBPQ_MIN_CONNECT_TIMEOUT, left)}


class Backoff:
    """Jittered exponential pauses between connect attempts."""

    __slots__ = ("_next",)

    def __init__(self) -> None:
        self._next = BACKOFF_FIRST

    def pause(self, deadline: float) -> bool:
        """Sleep before the next attempt; False if ``deadline`` leaves no time for one."""
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        time.sleep(min(remaining, self._next * random.uniform(0.5, 1.5)))
        self._next = min(self._next * 2, BACKOFF_MAX)
        return time.monotonic() < deadline
