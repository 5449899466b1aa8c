"""Run as ``python -m tests.scope_gc_probe DSN``: collect abandoned generators mid-block-entry.

A decorated generator left suspended in a reference cycle is finalised by the cyclic
collector, at whatever allocation comes next, in whatever thread. Here the collection
is steered (one gen-0 threshold after the other) to land inside a hand-off's block
entry, where pgctx holds its binding lock. The finaliser must neither wait for that
lock nor touch the interrupted context; the process exits 0 when every round ends,
and faulthandler reports a hang (exit 1) or a crash otherwise.
"""

from __future__ import annotations

import contextvars
import faulthandler
import gc
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import pgctx

BOUND = 20.0  # seconds for the whole probe; it needs a few when nothing hangs


def main(dsn: str) -> int:
    faulthandler.enable()
    faulthandler.dump_traceback_later(BOUND, exit=True)
    pool = pgctx.ThreadedConnectionPool(2, 10, dsn, timeout=10)

    @pgctx.with_connection(pool, separate=True)
    def abandoned(conn: Any = None) -> Iterator[int]:
        yield 1
        yield 2

    def hand_off() -> None:
        with pool.connection():  # joins the caller's block: an owner is pushed under the lock
            pass

    thresholds = gc.get_threshold()
    try:
        with pool.connection():
            for _ in range(3):
                for threshold in range(2, 300):
                    gen = abandoned()
                    next(gen)
                    ctx = contextvars.copy_context()
                    thread = threading.Thread(target=ctx.run, args=(hand_off,))
                    gc.collect()
                    gc.set_threshold(threshold)
                    cycle: list[Any] = [gen]
                    cycle.append(cycle)
                    del gen, cycle  # now only the collector can free it
                    thread.start()
                    thread.join()
                    gc.set_threshold(*thresholds)
    finally:
        gc.set_threshold(*thresholds)
    gc.collect()
    # exits of generators collected by the cyclic GC run in pgctx's janitor thread: give
    # it a generous bound to put their connections back (no time matters when it works)
    deadline = time.monotonic() + BOUND
    while pool._used and time.monotonic() < deadline:
        time.sleep(0.01)
    used = len(pool._used)
    pool.closeall()
    print(f"ok, {used} connections left checked out")
    return 0 if used == 0 else 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
