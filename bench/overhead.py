"""(b) What a pool adds to a real request: checkout + ``SELECT 1`` + return.

The baseline is the same ``SELECT 1`` (cursor, execute, fetchone, close) on a
connection held outside any pool, with the same driver (psycopg2, or psycopg 3
for psycopg_pool). Pooled requests and baseline requests alternate one by one,
each timed on its own, so both see the same machine; the overhead of a round is
the difference of their medians, and the median over rounds is reported.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from bench.common import connect2, connect3, median, no_gc, progress, rotated, select_1
from bench.peers import Peer, Spec, build_all, close_all
from bench.tight import cases


def _request(peer: Peer, variant: str) -> Callable[[], None]:
    if variant == "getconn":
        get, put = peer.get, peer.put
        assert get is not None and put is not None

        def request() -> None:
            conn = get()
            select_1(conn)
            put(conn)

        return request
    if variant == "block":
        block, raw = peer.block, peer.raw
        assert block is not None

        def request() -> None:
            with block() as conn:
                select_1(raw(conn))

        return request
    assert peer.decorate is not None
    return peer.decorate(select_1)  # type: ignore[no-any-return]


def _alternate(base_conn: Any, request: Callable[[], None], n: int) -> tuple[float, float]:
    """Median µs of a baseline request and of a pooled one, alternating."""
    clock = time.perf_counter_ns
    base: list[int] = []
    pooled: list[int] = []
    with no_gc():
        for _ in range(n):
            t0 = clock()
            select_1(base_conn)
            t1 = clock()
            request()
            t2 = clock()
            base.append(t1 - t0)
            pooled.append(t2 - t1)
    return median(base) / 1000, median(pooled) / 1000


def run(dsn: str, rounds: int, n: int) -> dict[str, Any]:
    held = {"psycopg2": connect2(dsn), "psycopg": connect3(dsn)}
    peers = build_all(Spec(dsn))
    try:
        todo = [(peer, variant, _request(peer, variant)) for peer, variant in cases(peers)]
        for peer, _variant, request in todo:  # warm up
            _alternate(held[peer.driver], request, max(20, n // 10))
        over: dict[str, dict[str, list[float]]] = {}
        query: dict[str, dict[str, list[float]]] = {}
        baseline: dict[str, list[float]] = {}
        for r in range(rounds):
            progress(f"(b) per-request overhead, round {r + 1}/{rounds}")
            for peer, variant, request in rotated(todo, r):
                base_us, pooled_us = _alternate(held[peer.driver], request, n)
                over.setdefault(peer.name, {}).setdefault(variant, []).append(pooled_us - base_us)
                query.setdefault(peer.name, {}).setdefault(variant, []).append(pooled_us)
                baseline.setdefault(peer.driver, []).append(base_us)
    finally:
        close_all(peers)
        for conn in held.values():
            conn.close()
    return {
        "overhead_us": {p: {v: median(x) for v, x in d.items()} for p, d in over.items()},
        "request_us": {p: {v: median(x) for v, x in d.items()} for p, d in query.items()},
        "baseline_us": {driver: median(x) for driver, x in baseline.items()},
        "samples": over,
        "rounds": rounds,
        "n": n,
    }
