"""Finalizers that run inside the cyclic garbage collector, handed to a janitor thread.

The collector finalizes an abandoned generator (or coroutine) at an arbitrary point
of the thread that triggered it: maybe inside ``ContextVar.set`` on that thread's
context (on Python 3.10/3.11 a second ``set`` from the finalizer frees the variable
map the interrupted one is still using: a crash), maybe while that thread holds a
lock the block's exit needs (on 3.12+ the collector runs between any two bytecodes:
a deadlock). So a block's exit that finds itself inside the collector does not run
there: :func:`defer` queues it for a janitor thread, which runs it in a context of
its own. Everything else (``for x in gen(): break``: the generator is finalized when
its last reference goes) runs inline, as before.

``gc.callbacks`` tells which thread is collecting (there is one collection at a time).
The janitor is started at first use, per process; it is looked up through
``threading`` at that time, so under gevent it is a greenlet; the queue is a
``queue.SimpleQueue``, whose ``put`` may be called from a finalizer without locks.
"""

from __future__ import annotations

import contextvars
import gc
import logging
import os
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

__all__ = ["defer", "in_collector", "janitor_idle"]

_log = logging.getLogger("pgctx")

# [ident of the thread running the cyclic collector, or 0]: a list, so that the
# hot path reads it with one global load and one subscript
COLLECTING = [0]

_jobs: Any = None  # the janitor's queue.SimpleQueue, made at first use
_pid = 0  # the process that made it
# Jobs queued and jobs finished. Each has one writer at a time: defer() runs only in
# the collector (one collection at a time), the count of finished ones in the janitor.
_queued = [0]
_finished = [0]


def _on_gc(phase: str, info: dict[str, int]) -> None:
    COLLECTING[0] = threading.get_ident() if phase == "start" else 0


gc.callbacks.append(_on_gc)


def in_collector() -> bool:
    """True in a finalizer run by the cyclic garbage collector in this thread."""
    collecting = COLLECTING[0]
    return bool(collecting) and collecting == threading.get_ident()


def defer(fn: Callable[..., Any], *args: Any) -> None:
    """Run ``fn(*args)`` soon in the janitor thread, in a fresh context of its own."""
    global _jobs, _pid
    jobs = _jobs
    if jobs is None or _pid != os.getpid():
        jobs = queue.SimpleQueue()
        _jobs, _pid = jobs, os.getpid()
        _finished[0] = _queued[0]
        threading.Thread(target=_work, args=(jobs,), name="pgctx-janitor", daemon=True).start()
    _queued[0] += 1
    jobs.put((fn, args))


def janitor_idle() -> bool:
    """True when no deferred finalizer is waiting or running (for tests and shutdown)."""
    return _finished[0] >= _queued[0]


def _work(jobs: Any) -> None:
    sleep = time.sleep
    while True:
        fn, args = jobs.get()
        while COLLECTING[0]:  # let the collection that queued it finish its finalizers first
            sleep(0.001)
        try:
            contextvars.Context().run(fn, *args)
        except BaseException:  # a finalizer's error has nowhere else to go
            _log.warning(
                "error in a deferred finalizer (a block's exit after garbage collection)",
                exc_info=True,
                extra={"pgctx_event": "finalizer_failed"},
            )
        finally:
            _finished[0] += 1
        del fn, args


def _after_fork_in_child() -> None:
    global _jobs
    COLLECTING[0] = 0
    _jobs = None  # the parent's janitor did not survive the fork


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
