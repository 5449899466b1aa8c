"""(f) The cost of checking connections on checkout.

getconn + putconn in a tight loop (as in (a)), each pool with and without its
check: pgctx ``check=pgctx.health.check_connection`` (a ``SELECT 1`` round trip on
every checkout), pgctx with ``check_after_idle=1.0`` as well (a connection idle
for less than a second is not checked: what remains is the bookkeeping),
psycopg_pool ``check=ConnectionPool.check_connection``, SQLAlchemy
``pool_pre_ping=True`` and DBUtils ``ping="SELECT 1"``. The added cost is the
difference of the medians; for scale, the same ``SELECT 1`` on a held connection.
"""

from __future__ import annotations

from typing import Any

from bench.common import connect2, median, progress, rotated
from bench.overhead import _alternate
from bench.peers import Spec, build, close_all
from bench.tight import _loop_getconn

#: (row name, peer name, check, check_after_idle)
CASES = [
    ("pgctx", "pgctx", False, None),
    ("pgctx+check", "pgctx", True, None),
    ("pgctx+check+after_idle", "pgctx", True, 1.0),
    ("psycopg_pool", "psycopg_pool", False, None),
    ("psycopg_pool+check", "psycopg_pool", True, None),
    ("sqlalchemy", "sqlalchemy", False, None),
    ("sqlalchemy+pre_ping", "sqlalchemy", True, None),
    ("dbutils", "dbutils", False, None),
    ("dbutils+ping", "dbutils", True, None),
]


def run(dsn: str, rounds: int, n: int) -> dict[str, Any]:
    peers = []
    try:
        for row, name, check, after_idle in CASES:
            peer = build(name, Spec(dsn, check=check, check_after_idle=after_idle))
            peers.append((row, peer))
        held = connect2(dsn)
        for _row, peer in peers:  # warm up
            _loop_getconn(peer, max(50, n // 10))
        samples: dict[str, list[float]] = {}
        query: list[float] = []
        for r in range(rounds):
            progress(f"(f) cost of check, round {r + 1}/{rounds}")
            for row, peer in rotated(peers, r):
                samples.setdefault(row, []).append(_loop_getconn(peer, n))
            query.append(_alternate(held, lambda: None, n)[0])
        held.close()
    finally:
        close_all([peer for _row, peer in peers])
    us = {row: median(values) for row, values in samples.items()}
    added = {}
    for row, _name, check, _after in CASES:
        if check:
            added[row] = us[row] - us[row.split("+")[0]]
    return {
        "us": us,
        "added_us": added,
        "select_1_us": median(query),
        "samples": samples,
        "rounds": rounds,
        "n": n,
    }
