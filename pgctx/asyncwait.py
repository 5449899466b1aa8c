"""Checking a connection out from a coroutine without holding up the event loop.

``async with pool.connection()`` must not block the loop while it waits (the
connections it waits for are held by tasks of the same loop), and must not wait in
the loop's default executor either: that is where the holders' own
``asyncio.to_thread`` calls run, so with more waiters than executor threads nothing
would be returned until timeouts fire. So:

- a pgctx pool is asked on the loop for an idle connection (no I/O); when it must
  wait, the task takes its place in the pool's queue (first come, first served) with
  a waiter that wakes the loop: no thread per waiter. Only what does I/O (connecting,
  a ``check``) runs in a thread, in pgctx's own small executor;
- psycopg2's own pools never wait, and a ``PersistentConnectionPool`` keys its
  connections by thread: they are called on the loop;
- any other pool (or a pgctx pool subclass that overrides the checkout methods) runs
  ``getconn`` in pgctx's own executor.

A task cancelled at any point takes no connection with it: whatever the pool hands
over after the cancellation is put back.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import psycopg2.pool

from pgctx import basepool, persistent, poolcore
from pgctx.waiting import Waiter

__all__ = ["getconn_async"]

_DIRECT, _NOWAIT, _THREAD = "direct", "nowait", "thread"
_kinds: dict[type, str] = {}
_executor: ThreadPoolExecutor | None = None
_executor_pid = 0

_Base = basepool.AbstractConnectionPool
_OWN_CHECKOUT = {  # the methods psycopg2 routes getconn through (subclasses override them)
    "_getconn": _Base._getconn,
    "_connect": poolcore.PoolCore._connect,
    "_getkey": poolcore.PoolCore._getkey,
    "_checkout": _Base._checkout,
    "_acquire": _Base._acquire,
}


def _kind(cls: type) -> str:
    kind = _kinds.get(cls)
    if kind is None:
        if issubclass(cls, persistent.PersistentConnectionPool):
            kind = _DIRECT  # one connection per thread: it must be asked from the loop's own
        elif issubclass(cls, _Base):
            getconn = cls.getconn
            own = getattr(getconn, "__module__", None) in ("pgctx.basepool", "pgctx.pool")
            same = all(getattr(cls, n, None) is f for n, f in _OWN_CHECKOUT.items())
            kind = _NOWAIT if own and same else _THREAD
        elif issubclass(cls, psycopg2.pool.AbstractConnectionPool):
            kind = _DIRECT
        else:
            kind = _THREAD
        _kinds[cls] = kind
    return kind


def _own_executor() -> ThreadPoolExecutor:
    """pgctx's executor for blocking checkout steps: made at first use, per process."""
    global _executor, _executor_pid
    if _executor is None or _executor_pid != os.getpid():
        _executor = ThreadPoolExecutor(
            max_workers=min(32, (os.cpu_count() or 1) + 4), thread_name_prefix="pgctx-checkout"
        )
        _executor_pid = os.getpid()
    return _executor


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


class _LoopWaiter(Waiter):
    """A place in the pool's queue that wakes an event loop instead of a thread."""

    __slots__ = ("future", "loop")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(None)
        self.loop = loop
        self.future: asyncio.Future[None] = loop.create_future()

    def wake(self) -> None:  # called under the pool's lock, from any thread
        super().wake()
        with contextlib.suppress(RuntimeError):  # a closed loop: its tasks were cancelled
            self.loop.call_soon_threadsafe(_resolve, self.future)


def _return_unclaimed(pool: Any) -> Callable[[Any], None]:
    """A done-callback putting back a connection whose waiter was cancelled."""

    def give_back(future: Any) -> None:
        if not future.cancelled() and future.exception() is None:
            pool.putconn(future.result())

    return give_back


async def _in_thread(pool: Any, fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)`` in pgctx's executor; if the caller is cancelled, the connection it
    returns is put back by the worker thread (not the loop, which may be closing)."""
    future = _own_executor().submit(fn, *args)
    try:
        return await asyncio.shield(asyncio.wrap_future(future))
    except BaseException:
        future.add_done_callback(_return_unclaimed(pool))
        raise


async def getconn_async(pool: Any) -> Any:
    """``pool.getconn()`` for a coroutine (see the module docstring)."""
    kind = _kind(type(pool))
    if kind is _DIRECT:
        return pool.getconn()
    if kind is _THREAD:
        return await _in_thread(pool, pool.getconn)
    loop = asyncio.get_running_loop()
    timeout = pool.timeout
    deadline = None if timeout is None else time.monotonic() + timeout
    waiter = _LoopWaiter(loop)
    got = pool._checkout_nowait(waiter, deadline)
    if got is None:
        return await _in_thread(pool, pool._acquire, waiter.key, timeout)
    if got is not waiter:
        return got
    if not waiter.may_connect:  # queued: wait on the loop for a connection or a slot
        assert deadline is not None
        timer = loop.call_later(max(0.0, deadline - time.monotonic()), _resolve, waiter.future)
        try:
            await waiter.future
        except BaseException:  # cancelled: give back whatever the pool hands it
            cleanup = _own_executor().submit(pool._checkout_queued, waiter, time.monotonic())
            cleanup.add_done_callback(_return_unclaimed(pool))
            raise
        finally:
            timer.cancel()
        if waiter.conn is not None and pool._life is None:  # handed over: no I/O left
            return pool._checkout_queued(waiter, deadline)
    return await _in_thread(pool, pool._checkout_queued, waiter, deadline)
