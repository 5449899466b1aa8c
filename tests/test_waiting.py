"""Validation of the waiting options and the hand-off primitive on its own."""

from __future__ import annotations

import math
import threading
from decimal import Decimal

import pytest

from pgctx.errors import PoolError
from pgctx.waiting import Waiter, WaitQueue, validate_max_waiting, validate_timeout


@pytest.mark.parametrize(("value", "expected"), [(None, None), (0, 0.0), (2, 2.0), (0.25, 0.25)])
def test_valid_timeouts(value: object, expected: float | None) -> None:
    assert validate_timeout(value) == expected


@pytest.mark.parametrize(
    ("value", "error"),
    [
        ("1", TypeError),
        (True, TypeError),
        (Decimal("1"), TypeError),
        (-0.5, ValueError),
        (math.nan, ValueError),
        (math.inf, ValueError),
    ],
)
def test_invalid_timeouts_name_the_value(value: object, error: type[Exception]) -> None:
    with pytest.raises(error, match="timeout must be"):
        validate_timeout(value)


def test_max_waiting_needs_a_timeout() -> None:
    assert validate_max_waiting(0, None) == 0
    assert validate_max_waiting(3, 1.0) == 3
    with pytest.raises(ValueError, match="without a timeout"):
        validate_max_waiting(3, None)
    with pytest.raises(TypeError):
        validate_max_waiting(False, 1.0)


def test_a_waiter_blocks_until_woken_and_queue_is_fifo() -> None:
    queue = WaitQueue()
    first, second = Waiter("a"), Waiter("b")
    queue.append(first)
    queue.append(second)
    assert len(queue) == 2 and queue.popleft() is first
    first.wait(0.01)
    assert not first.served  # timed out, nobody served it
    done = threading.Event()

    def wait_for_it() -> None:
        second.wait(30)
        done.set()

    thread = threading.Thread(target=wait_for_it)
    thread.start()
    second.may_connect = True
    second.wake()
    assert done.wait(30) and second.served
    thread.join(30)


def test_fail_all_wakes_everyone_with_the_error() -> None:
    queue = WaitQueue()
    waiters = [Waiter(n) for n in range(3)]
    for waiter in waiters:
        queue.append(waiter)
    queue.discard(waiters[1])
    queue.discard(waiters[1])  # discarding twice is harmless
    error = PoolError("connection pool is closed")
    queue.fail_all(error)
    assert not queue and waiters[0].error is error and waiters[2].error is error
    assert waiters[1].error is None
