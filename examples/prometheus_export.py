"""Export a pool's statistics to Prometheus (needs ``pip install 'pgctx[prometheus]'``).

Run:  python examples/prometheus_export.py          (prints one scrape and exits)
      python examples/prometheus_export.py --serve  (serves /metrics on port 8000)
Uses PGCTX_DSN or DATABASE_URL when set, else starts a throwaway server.
"""

from __future__ import annotations

import sys
import threading
import time

from prometheus_client import REGISTRY, generate_latest, start_http_server

import pgctx
from pgctx.contrib.prometheus import PoolCollector
from pgctx.testing import throwaway_or_env


def work(pool: pgctx.ThreadedConnectionPool) -> None:
    with pool.connection() as conn, conn.cursor() as cur:
        cur.execute("SELECT pg_sleep(0.05)")


def main(dsn: str, serve: bool) -> None:
    pool = pgctx.ThreadedConnectionPool(1, 2, dsn, application_name="pgctx-metrics", timeout=5)
    collector = PoolCollector({"main": pool})
    REGISTRY.register(collector)  # every scrape calls pool.get_stats()
    try:
        threads = [threading.Thread(target=work, args=(pool,)) for _ in range(6)]
        for thread in threads:  # 6 callers, 2 connections: some wait their turn
            thread.start()
        for thread in threads:
            thread.join()
        if serve:
            start_http_server(8000)
            print("serving http://127.0.0.1:8000/metrics; Ctrl-C to stop")
            while True:
                work(pool)
                time.sleep(1)
        for line in generate_latest(REGISTRY).decode().splitlines():
            if line.startswith("pgctx_"):
                print(line)
    finally:
        REGISTRY.unregister(collector)
        pool.closeall()


if __name__ == "__main__":
    with throwaway_or_env() as dsn:
        main(dsn, "--serve" in sys.argv)
