"""Opening connections for a pool that promises bounded waits.

With ``timeout`` set, a borrower must not wait much longer than it, even when
the network drops packets: connects need ``connect_timeout`` and established
connections need TCP keepalives and ``tcp_user_timeout``, which libpq leaves
off by default. These are added only where the user's DSN and keyword
arguments do not set their own.
"""

from __future__ import annotations

import math
import random
import time
from typing import Any

from pgctx._driver import extensions

BACKOFF_FIRST = 0.05  # seconds before the first retry of a failed connect
BACKOFF_MAX = 2.0  # longest pause between retries


def bounded_wait_defaults(
    args: tuple[Any, ...], kwargs: dict[str, Any], timeout: float
) -> dict[str, Any]:
    """Return ``kwargs`` plus libpq timeouts for those the DSN and kwargs leave unset."""
    given: set[str] = set(kwargs)
    dsn = args[0] if args else kwargs.get("dsn")
    if isinstance(dsn, str) and dsn:
        try:
            given.update(extensions.parse_dsn(dsn))
        except Exception:
            return kwargs  # let psycopg2 report the bad DSN itself
    defaults = {
        # libpq's minimum is 2 s; it applies to each host/attempt
        "connect_timeout": max(2, math.ceil(timeout)),
        "keepalives": 1,
        "keepalives_idle": 10,
        "keepalives_interval": 5,
        "keepalives_count": 3,
        # unacknowledged data fails the connection after this (ms); never below 5 s so
        # that a short pool timeout does not turn a brief network hiccup into errors
        "tcp_user_timeout": max(5000, math.ceil(timeout * 1000)),
    }
    return {**{k: v for k, v in defaults.items() if k not in given}, **kwargs}


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
