"""(a) The cost of a checkout and return alone: no query, a warm pool of 4 connections.

Each variant runs ``n`` times in a tight loop on one thread (the pool never has to
wait or connect), with the cyclic GC off during the loop; the time per iteration
is the loop's time over ``n``. Variants are interleaved in rounds whose order
rotates, and the median over rounds is reported.

Variants: ``getconn`` (getconn + putconn, or the pool's equivalent pair),
``block`` (the pool's own with-block; psycopg2.pool has none) and, for pgctx,
``decorated`` (a call of a ``@with_connection(pool)`` function with an empty body).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from bench.common import median, no_gc, progress, rotated
from bench.peers import Peer, Spec, build_all, close_all

VARIANTS = ("getconn", "block", "decorated")


def _loop_getconn(peer: Peer, n: int) -> float:
    get, put = peer.get, peer.put
    assert get is not None and put is not None
    clock = time.perf_counter_ns
    with no_gc():
        start = clock()
        for _ in range(n):
            put(get())
        return (clock() - start) / n / 1000


def _loop_block(peer: Peer, n: int) -> float:
    block = peer.block
    assert block is not None
    clock = time.perf_counter_ns
    with no_gc():
        start = clock()
        for _ in range(n):
            with block():
                pass
        return (clock() - start) / n / 1000


def _noop(conn: Any) -> None:
    return None


def _loop_decorated(peer: Peer, n: int) -> float:
    assert peer.decorate is not None
    call = peer.decorate(_noop)
    clock = time.perf_counter_ns
    with no_gc():
        start = clock()
        for _ in range(n):
            call()
        return (clock() - start) / n / 1000


LOOPS: dict[str, Callable[[Peer, int], float]] = {
    "getconn": _loop_getconn,
    "block": _loop_block,
    "decorated": _loop_decorated,
}


def cases(peers: list[Peer]) -> list[tuple[Peer, str]]:
    out = []
    for peer in peers:
        for variant in VARIANTS:
            if variant == "getconn" and peer.get is None:
                continue
            if variant == "block" and peer.block is None:
                continue
            if variant == "decorated" and peer.decorate is None:
                continue
            out.append((peer, variant))
    return out


def run(dsn: str, rounds: int, n: int) -> dict[str, Any]:
    peers = build_all(Spec(dsn))
    try:
        todo = cases(peers)
        for peer, variant in todo:  # warm up: caches, lazily built structures, branch history
            LOOPS[variant](peer, max(100, n // 10))
        samples: dict[str, dict[str, list[float]]] = {}
        for r in range(rounds):
            progress(f"(a) tight loop, round {r + 1}/{rounds}")
            for peer, variant in rotated(todo, r):
                us = LOOPS[variant](peer, n)
                samples.setdefault(peer.name, {}).setdefault(variant, []).append(us)
    finally:
        close_all(peers)
    result = {
        name: {variant: median(values) for variant, values in by_variant.items()}
        for name, by_variant in samples.items()
    }
    return {"us": result, "samples": samples, "rounds": rounds, "n": n}
