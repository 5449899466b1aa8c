"""First-come-first-served hand-off of connections to waiting callers.

Each waiter blocks on a lock of its own, which the pool releases after it has
put a connection (or the right to open one) into the waiter. A connection
returned while callers wait therefore goes straight to the oldest of them and
cannot be taken by a caller that arrives later (no barging), and waking one
waiter costs one lock release, not a broadcast.
"""

from __future__ import annotations

import contextlib
import math
import numbers
import threading
from collections import deque
from typing import Any

from pgctx._driver import extensions

Connection = extensions.connection


class Waiter:
    """A caller blocked in ``getconn`` until the pool serves it or it gives up."""

    __slots__ = ("_gate", "conn", "error", "joined", "key", "may_connect", "must_check")

    def __init__(self, key: Any) -> None:
        self.key = key
        self.conn: Connection | None = None
        self.joined = False  # served with the connection another caller holds for its key
        self.may_connect = False  # served with a free slot: open a connection itself
        self.error: BaseException | None = None  # served with an error (pool closed)
        self.must_check = False  # the connection handed over needs the pool's check
        self._gate = threading.Lock()
        self._gate.acquire()

    @property
    def served(self) -> bool:
        return self.conn is not None or self.may_connect or self.error is not None

    def wait(self, timeout: float) -> None:
        """Block until served or until ``timeout`` seconds have passed."""
        self._gate.acquire(timeout=timeout)

    def wake(self) -> None:
        self._gate.release()


class WaitQueue(deque[Waiter]):
    """The waiters of one pool, oldest first. Only used under the pool's lock.

    A deque subclass so that the pool's hot path tests emptiness at C speed.
    """

    def discard(self, waiter: Waiter) -> None:
        with contextlib.suppress(ValueError):
            self.remove(waiter)

    def fail_all(self, error: BaseException) -> None:
        """Wake every waiter with ``error`` (the pool is closing)."""
        while self:
            waiter = self.popleft()
            waiter.error = error
            waiter.wake()


MAX_SECONDS = threading.TIMEOUT_MAX / 2
"""The longest duration option: half of the longest wait a lock accepts (about 146 years
on Linux), so that waits derived from a deadline never exceed ``threading.TIMEOUT_MAX``
(beyond it a wait raises OverflowError) whatever the rounding of monotonic times."""


def _shown(value: object) -> str:
    """``repr(value)`` for an error message, cut short (and safe for any object)."""
    try:
        text = repr(value)
    except Exception:  # e.g. an int with more digits than Python will convert to str
        text = f"<{type(value).__name__}>"
    return text if len(text) <= 40 else f"{text[:37]}..."


def validate_timeout(value: object, name: str = "timeout") -> float | None:
    """Check a duration option: None, or a number of seconds from 0 to ``MAX_SECONDS``."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(
            f"{name} must be a number of seconds or None, got {_shown(value)} "
            f"({type(value).__name__})"
        )
    try:
        seconds = float(value)
    except OverflowError:  # an int beyond a float's range
        seconds = -1.0 if isinstance(value, int) and value < 0 else MAX_SECONDS * 2
    if not (0 <= seconds < math.inf):
        raise ValueError(f"{name} must be a finite number of seconds >= 0, got {_shown(value)}")
    if seconds > MAX_SECONDS:
        raise ValueError(
            f"{name} must be at most {MAX_SECONDS:.0f} s (half of threading.TIMEOUT_MAX, the "
            f"longest wait this platform supports), got {_shown(value)}"
        )
    return seconds


def validate_max_waiting(value: object, timeout: float | None) -> int:
    """Check ``max_waiting``: an int >= 0 (0: no limit), meaningful only with a timeout."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"max_waiting must be an int >= 0, got {value!r} ({type(value).__name__})")
    if value < 0:
        raise ValueError(f"max_waiting must be >= 0 (0 means no limit), got {value!r}")
    if value and timeout is None:
        raise ValueError(
            f"max_waiting={value} has no effect without a timeout: pass timeout=<seconds> "
            "so that callers wait for a connection instead of failing at once"
        )
    return value
