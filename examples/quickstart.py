"""pgctx quickstart: a psycopg2-compatible pool that waits instead of failing.

Run it with ``python examples/quickstart.py``. It uses the server named by
``PGCTX_DSN`` or ``DATABASE_URL``, or else starts a throwaway PostgreSQL
(needs ``pip install 'pgctx[binary,testing]'``) and removes it at the end.
"""

from __future__ import annotations

import threading

import pgctx.pool as pool  # was: import psycopg2.pool as pool
from pgctx.testing import throwaway_or_env


def main(dsn: str) -> None:
    # The same constructor as psycopg2.pool; timeout= is pgctx's opt-in: wait
    # up to 5 s for a returned connection instead of "connection pool exhausted".
    db = pool.ThreadedConnectionPool(1, 4, dsn, application_name="pgctx-quickstart", timeout=5)
    try:
        results: list[str] = []

        def worker(number: int) -> None:
            conn = db.getconn()  # 8 threads share 4 connections: the rest wait their turn
            try:
                with conn.cursor() as cur:
                    cur.execute(
                        "SELECT %s || ' says hello from backend ' || pg_backend_pid()",
                        (f"worker {number}",),
                    )
                    (line,) = cur.fetchone()
                conn.commit()
                results.append(line)
            finally:
                db.putconn(conn)

        threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        for line in sorted(results):
            print(line)
        print(db)
    finally:
        db.closeall()


if __name__ == "__main__":
    with throwaway_or_env() as dsn:
        main(dsn)
