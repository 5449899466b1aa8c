"""Where pgctx's checkout time goes: its hot path timed piece by piece, then cProfile.

    python bench/profile_hot.py [--n 100000] [--rounds 20] [--cprofile]

Not part of the comparison (run.py); a tool for tuning. The pieces run in
``--rounds`` interleaved rounds (``n / rounds`` calls each, in a tight loop with
the GC off); the table gives the median µs per call.
"""

from __future__ import annotations

import argparse
import contextvars
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.common import median, no_gc, rotated, server  # noqa: E402
from bench.peers import Spec, build  # noqa: E402


def _time(fn: Callable[[], Any], n: int) -> float:
    clock = time.perf_counter_ns
    with no_gc():
        start = clock()
        for _ in range(n):
            fn()
        return (clock() - start) / n / 1000


def _find(name: str, *modules: str) -> Any:
    """``name`` from the first of ``modules`` that has it (internals move), else None."""
    import importlib

    for module in modules:
        try:
            found = getattr(importlib.import_module(module), name, None)
        except ImportError:
            continue
        if found is not None:
            return found
    return None


def pieces(pool: Any, block: Callable[[], Any], decorate: Any) -> list[tuple[str, Callable]]:
    """(label, zero-argument callable) for the whole paths and the parts they are made of."""
    from pgctx import registry
    from pgctx.scope import ConnectionScope

    conn = pool.getconn()
    pool.putconn(conn)
    owner = registry.current_owner()
    var: contextvars.ContextVar[Any] = contextvars.ContextVar("x", default=None)
    mapping = registry.get_mapping()
    lock = threading.Lock()
    end_transaction = _find("end_transaction", "pgctx.transaction", "pgctx.health")
    is_broken = _find("is_broken", "pgctx.health", "pgctx.transaction")

    def get_put() -> None:
        pool.putconn(pool.getconn())

    def with_block() -> None:
        with block():
            pass

    def bind_unbind() -> None:  # what a block does to the contextvar mapping
        new = {**mapping, (id(pool), None): 1}
        registry.set_mapping(new)
        registry.restore_mapping(mapping, new)

    def binding_and_handle() -> None:
        b = registry.Binding(pool, None, conn, owner, False)
        registry.Handle(b, owner, None, None)

    def pool_lock() -> None:
        with pool._lock:
            pass

    def plain_lock() -> None:
        with lock:
            pass

    def noop(conn: Any) -> None:
        return None

    called = decorate(noop)
    out: list[tuple[str, Callable[[], Any] | None]] = [
        ("getconn + putconn", get_put),
        ("  conn.get_transaction_status()", conn.get_transaction_status),
        ("  conn.info.transaction_status", lambda: conn.info.transaction_status),
        ("  with pool._lock (taken twice per get + put)", pool_lock),
        ("with pool.connection(): pass", with_block),
        ("  ConnectionScope(pool)", lambda: ConnectionScope(pool)),
        ("  registry.current_owner()", registry.current_owner),
        ("  registry.hashable_key()", lambda: registry.hashable_key(pool, None)),
        ("  registry.generator_frame(1)", lambda: registry.generator_frame(1)),
        ("  ContextVar.get()", var.get),
        ("  mapping copy + set + restore", bind_unbind),
        ("  Binding() + Handle()", binding_and_handle),
        ("  with threading.Lock()", plain_lock),
        (
            "  end_transaction(conn, None)",
            end_transaction and (lambda: end_transaction(conn, None)),
        ),
        ("  is_broken(conn)", is_broken and (lambda: is_broken(conn))),
        ("@with_connection call, empty body", called),
        ("  plain call of the same function", lambda: noop(conn)),
    ]
    return [(label, fn) for label, fn in out if fn is not None]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=100_000, help="calls per piece in all")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--cprofile", action="store_true", help="also cProfile the with-block")
    args = parser.parse_args()
    with server() as setup:
        peer = build("pgctx", Spec(setup.dsn))
        assert peer.block is not None and peer.decorate is not None
        try:
            todo = pieces(peer.pool, peer.block, peer.decorate)
            for _label, fn in todo:  # warm up
                _time(fn, 1000)
            samples: dict[str, list[float]] = {label: [] for label, _fn in todo}
            for r in range(args.rounds):  # interleaved: a busy machine slows all pieces alike
                for label, fn in rotated(todo, r):
                    samples[label].append(_time(fn, args.n // args.rounds))
            for label, _fn in todo:
                print(f"{label:<48} {median(samples[label]):7.3f} µs")
            if args.cprofile:
                import cProfile
                import pstats

                block = peer.block

                def loop() -> None:
                    for _ in range(args.n):
                        with block():
                            pass

                prof = cProfile.Profile()
                prof.runcall(loop)
                pstats.Stats(prof).sort_stats("tottime").print_stats(20)
        finally:
            peer.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
