"""(d) Client memory per pooled connection.

Python heap (``tracemalloc``): a pool of ``SMALL`` and one of ``LARGE`` connections
are built (every connection opened, checked out and returned once, so lazily
built per-connection state exists), and the difference of the traced memory over
``LARGE - SMALL`` is the cost of one more pooled connection: the pool's fixed
cost cancels out. The same is done for bare connections kept in a list (psycopg2,
and psycopg 3 for psycopg_pool); "above bare" subtracts the bare figure of the
pool's driver. Threads a pool starts (psycopg_pool's workers) are a fixed cost.

What the C side allocates is not counted: libpq's per-connection state and its
two 16 KiB I/O buffers are the same under every psycopg2-based pool (and RSS is
too coarse to split per connection: the allocator keeps freed memory, and
untouched buffer pages are not resident).
"""

from __future__ import annotations

import gc
import tracemalloc
from collections.abc import Callable
from typing import Any

from bench.common import connect2, connect3, median, progress, rotated
from bench.peers import NAMES, Spec, build, warm

SMALL, LARGE = 4, 20


def _bare(dsn: str, connect: Callable[[str], Any]) -> Callable[[int], Callable[[], None]]:
    def make(n: int) -> Callable[[], None]:
        conns = [connect(dsn) for _ in range(n)]

        def close() -> None:
            for conn in conns:
                conn.close()

        return close

    return make


def _pooled(dsn: str, name: str) -> Callable[[int], Callable[[], None]]:
    def make(n: int) -> Callable[[], None]:
        peer = build(name, Spec(dsn, minconn=n, maxconn=n))
        warm(peer, n)
        return peer.close

    return make


def _makers(dsn: str) -> dict[str, Callable[[int], Callable[[], None]]]:
    makers = {"bare-psycopg2": _bare(dsn, connect2), "bare-psycopg": _bare(dsn, connect3)}
    for name in NAMES:
        makers[name] = _pooled(dsn, name)
    return makers


def _traced(make: Callable[[int], Callable[[], None]], n: int) -> float:
    gc.collect()
    before = tracemalloc.get_traced_memory()[0]
    close = make(n)
    gc.collect()
    after = tracemalloc.get_traced_memory()[0]
    close()
    del close
    gc.collect()
    return float(after - before)


def run(dsn: str, rounds: int) -> dict[str, Any]:
    makers = _makers(dsn)
    for make in makers.values():  # warm up: imports, caches, first-use allocations
        make(SMALL)()
    heap: dict[str, list[float]] = {}
    for r in range(rounds):
        progress(f"(d) memory, round {r + 1}/{rounds}")
        tracemalloc.start()
        try:
            for name, make in rotated(list(makers.items()), r):
                small, large = _traced(make, SMALL), _traced(make, LARGE)
                heap.setdefault(name, []).append((large - small) / (LARGE - SMALL))
        finally:
            tracemalloc.stop()
    heap_med = {name: median(values) for name, values in heap.items()}
    above = {}
    for name in NAMES:
        driver = "bare-psycopg" if name == "psycopg_pool" else "bare-psycopg2"
        above[name] = heap_med[name] - heap_med[driver]
    return {
        "heap_bytes": heap_med,
        "heap_above_bare_bytes": above,
        "small": SMALL,
        "large": LARGE,
        "rounds": rounds,
    }
