"""(e) A spike: 50 clients arrive at once at a pool of 5 (max 10) with slow connects.

As in psycopg_pool's ``spiketest``: each new connection takes ``CONNECT_DELAY``
(150 ms, a sleep before the real connect, standing for a remote server or TLS),
each client does ``WORK`` (2 ms, a sleep while holding the connection) once. The
pool is warm (5 idle connections, opened before the delay is switched on) and new
for every round. Reported: connections opened because of the spike (including connects still
under way ``SETTLE`` after the last client), client wait
(asking to holding) p50 and max, and the time until the last client is done.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import psycopg

from bench.common import AutocommitConnection, median, percentile, progress, rotated
from bench.peers import NAMES, Peer, Spec, build, warm

CLIENTS = 50
MINCONN, MAXCONN = 5, 10
CONNECT_DELAY = 0.150
WORK = 0.002
SETTLE = 0.3  # after the last client, connects still under way are counted too


class _Slow:
    """The switchable delay and the count of connections opened while it is on."""

    delay = 0.0
    opened = 0
    lock = threading.Lock()

    @classmethod
    def before_connect(cls) -> None:
        if cls.delay:
            with cls.lock:
                cls.opened += 1
            time.sleep(cls.delay)


class SlowConnection(AutocommitConnection):
    """psycopg2 connection_factory: sleeps before connecting while the spike is on."""

    __slots__ = ()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        _Slow.before_connect()
        super().__init__(*args, **kwargs)


class SlowConnection3(psycopg.Connection):  # type: ignore[type-arg]
    """psycopg 3 connection_class for psycopg_pool, likewise."""

    @classmethod
    def connect(cls, *args: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        _Slow.before_connect()
        return super().connect(*args, **kwargs)


def _spike(peer: Peer) -> dict[str, float]:
    wait_block = peer.wait_block
    waits: list[float] = [0.0] * CLIENTS
    done: list[float] = [0.0] * CLIENTS
    start: list[float] = []
    barrier = threading.Barrier(CLIENTS, action=lambda: start.append(time.perf_counter()))

    def client(i: int) -> None:
        barrier.wait()
        t0 = time.perf_counter()
        with wait_block():
            waits[i] = time.perf_counter() - t0
            time.sleep(WORK)
        done[i] = time.perf_counter()

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(CLIENTS)]
    with _Slow.lock:
        _Slow.opened = 0
    _Slow.delay = CONNECT_DELAY
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        time.sleep(SETTLE)
    finally:
        _Slow.delay = 0.0
    if any(t.is_alive() for t in threads):
        raise RuntimeError(f"{peer.name}: spike clients did not finish")
    ordered = sorted(waits)
    return {
        "opened": _Slow.opened,
        "wait_p50_ms": percentile(ordered, 50) * 1000,
        "wait_max_ms": ordered[-1] * 1000,
        "all_done_ms": (max(done) - start[0]) * 1000,
    }


def run(dsn: str, rounds: int) -> dict[str, Any]:
    spec = Spec(
        dsn,
        minconn=MINCONN,
        maxconn=MAXCONN,
        factory2=SlowConnection,
        class3=SlowConnection3,
    )
    samples: dict[str, list[dict[str, float]]] = {}
    for r in range(rounds):
        progress(f"(e) spike, round {r + 1}/{rounds}")
        for name in rotated(list(NAMES), r):
            peer = build(name, spec)
            try:
                warm(peer, MINCONN)
                samples.setdefault(name, []).append(_spike(peer))
            finally:
                peer.close()
    stats = {
        name: {key: median([run[key] for run in runs]) for key in runs[0]}
        for name, runs in samples.items()
    }
    return {
        "stats": stats,
        "samples": samples,
        "rounds": rounds,
        "clients": CLIENTS,
        "minconn": MINCONN,
        "maxconn": MAXCONN,
        "connect_ms": CONNECT_DELAY * 1000,
        "work_ms": WORK * 1000,
    }
