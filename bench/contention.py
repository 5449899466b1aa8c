"""(c) Many threads on 4 connections: throughput, waits, starvation and fairness.

``T`` threads (8, 32, 128) share a pool of 4 connections; each loops on "check
a connection out with the pool's own waiting with-block, ``SELECT 1``, return it"
for ``duration`` seconds, all starting together at a barrier. psycopg2.pool
cannot wait, so its threads retry (see peers.RETRY_PAUSE).

Reported per pool and ``T`` (medians over rounds):

- ops/s: requests finished inside the window, over the window;
- wait p50/p99/max: time from asking for a connection to holding it, per request
  (a thread still waiting when the window closes counts with its wait so far);
- starved: threads that finished less than 10% of the mean work per thread;
- fairness: min/max requests per thread (1.0 = perfectly even).

The reference "dedicated" rows run 4 threads on 4 connections held outside any
pool (psycopg2, and psycopg 3): the throughput ceiling of 4 connections.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from bench.common import (
    connect2,
    connect3,
    median,
    percentile,
    progress,
    rotated,
    select_1,
)
from bench.peers import Peer, Spec, build_all, close_all

THREADS = (8, 32, 128)
STARVED_SHARE = 0.1


def _measure(make_worker: Any, threads: int, duration: float) -> dict[str, float]:
    """Run ``threads`` workers for ``duration`` s; each returns (ops, waits, pending)."""
    window: dict[str, float] = {}

    def open_window() -> None:
        window["start"] = time.perf_counter()
        window["end"] = window["start"] + duration

    barrier = threading.Barrier(threads, action=open_window)
    results: list[Any] = [None] * threads

    def body(i: int) -> None:
        work = make_worker(i)
        barrier.wait()
        results[i] = work(window["end"])

    pool = [threading.Thread(target=body, args=(i,), daemon=True) for i in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join(duration + 120)
    if any(t.is_alive() for t in pool) or any(r is None for r in results):
        raise RuntimeError(f"contention run with {threads} threads did not finish")
    ops = [r[0] for r in results]
    waits = sorted(w for r in results for w in r[1])
    total = sum(ops)
    mean = total / threads
    return {
        "ops_s": total / duration,
        "wait_p50_ms": percentile(waits, 50) * 1000,
        "wait_p99_ms": percentile(waits, 99) * 1000,
        "wait_max_ms": (waits[-1] if waits else float("nan")) * 1000,
        "starved": sum(1 for n in ops if n < STARVED_SHARE * mean),
        "fairness": (min(ops) / max(ops)) if max(ops) else 0.0,
        "min_ops": min(ops),
        "max_ops": max(ops),
    }


def _pool_worker(peer: Peer) -> Any:
    wait_block, raw = peer.wait_block, peer.raw
    clock = time.perf_counter

    def make(_i: int) -> Any:
        def work(end: float) -> tuple[int, list[float], None]:
            ops = 0
            waits: list[float] = []
            while True:
                t0 = clock()
                if t0 >= end:
                    break
                with wait_block() as conn:
                    t1 = clock()
                    select_1(raw(conn))
                if t1 > end:  # got it only after the window closed: count its wait
                    waits.append(end - t0)
                    break
                waits.append(t1 - t0)
                if clock() <= end:
                    ops += 1
            return ops, waits, None

        return work

    return make


def _dedicated_worker(conns: list[Any]) -> Any:
    clock = time.perf_counter

    def make(i: int) -> Any:
        conn = conns[i]

        def work(end: float) -> tuple[int, list[float], None]:
            ops = 0
            while clock() < end:
                select_1(conn)
                ops += 1
            return ops, [0.0], None

        return work

    return make


def run(dsn: str, rounds: int, duration: float, threads: tuple[int, ...] = THREADS) -> dict:
    peers = build_all(Spec(dsn))
    dedicated = {"psycopg2": [connect2(dsn) for _ in range(4)]}
    dedicated["psycopg"] = [connect3(dsn) for _ in range(4)]
    samples: dict[str, dict[str, list[dict[str, float]]]] = {}
    try:
        cases: list[tuple[str, int, Any]] = []
        for driver, conns in dedicated.items():
            cases.append((f"dedicated-{driver}", 4, _dedicated_worker(conns)))
        for t in threads:
            cases += [(peer.name, t, _pool_worker(peer)) for peer in peers]
        for _name, t, make in cases:  # warm up: every code path, every thread count
            _measure(make, t, min(0.2, duration / 4))
        for r in range(rounds):
            progress(f"(c) contention, round {r + 1}/{rounds}")
            for name, t, make in rotated(cases, r):
                stats = _measure(make, t, duration)
                samples.setdefault(name, {}).setdefault(str(t), []).append(stats)
    finally:
        close_all(peers)
        for conns in dedicated.values():
            for conn in conns:
                conn.close()
    summary = {
        name: {t: _median_stats(runs) for t, runs in by_t.items()} for name, by_t in samples.items()
    }
    return {"stats": summary, "samples": samples, "rounds": rounds, "duration": duration}


def _median_stats(runs: list[dict[str, float]]) -> dict[str, float]:
    """Per-metric medians; the worst starvation and longest wait seen over rounds too."""
    out = {key: median([run[key] for run in runs]) for key in runs[0]}
    out["starved_worst"] = max(run["starved"] for run in runs)
    out["wait_max_worst_ms"] = max(run["wait_max_ms"] for run in runs)
    return out
