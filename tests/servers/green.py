"""Greenlets on one pgctx pool under gevent and psycogreen; run by test_gevent.py.

    python -m tests.servers.green ORDER DSN APPLICATION_NAME

ORDER says when pgctx is imported and the pool built, relative to ``patch_all()``:
``after`` (gevent's advice), ``import-before`` (pgctx imported first, as in gunicorn
``--preload -k gevent``, where the app is imported by the master) or ``pool-before``
(the pool built before patching, too). Prints a JSON summary; any error exits non-zero.
"""

from __future__ import annotations

import json
import sys

ORDER, DSN, APP = sys.argv[1:4]

if ORDER in ("import-before", "pool-before"):
    import pgctx
    import pgctx.pool

    if ORDER == "pool-before":
        early = pgctx.ThreadedConnectionPool(
            1, 4, DSN, application_name=APP, timeout=10, check=pgctx.check_connection
        )

from gevent import monkey  # noqa: E402

monkey.patch_all()

import gevent  # noqa: E402
from psycogreen.gevent import patch_psycopg  # noqa: E402

patch_psycopg()

import pgctx  # noqa: E402

GREENLETS, ROUNDS, MAXCONN = 20, 5, 4


class Expected(Exception):
    pass


def main() -> None:
    if ORDER == "pool-before":
        pool = early
    else:
        pool = pgctx.ThreadedConnectionPool(
            1, MAXCONN, DSN, application_name=APP, timeout=10, check=pgctx.check_connection
        )
    resetting = pgctx.ThreadedConnectionPool(
        0, MAXCONN, DSN, application_name=APP, timeout=10, reset=pgctx.reset_session
    )
    busiest = 0

    def query(conn: object, sleep: float = 0.01) -> None:
        nonlocal busiest
        busiest = max(busiest, pool.get_stats()["checked_out"])
        with conn.cursor() as cur:  # type: ignore[attr-defined]
            cur.execute("SELECT pg_sleep(%s)", (sleep,))

    def work() -> None:
        for _ in range(ROUNDS):
            with pool.connection() as conn:  # check on checkout (watchdog), commit
                query(conn)
                assert pgctx.current_connection(pool) is conn
            conn = pool.getconn()  # a return that needs a rollback (watchdog)
            query(conn)
            pool.putconn(conn)
            try:
                with pool.connection() as conn:  # rolled back on the way out
                    query(conn)
                    raise Expected
            except Expected:
                pass
            with resetting.connection() as conn:  # DISCARD ALL on return (watchdog)
                query(conn)

    greenlets = [gevent.spawn(work) for _ in range(GREENLETS)]
    gevent.joinall(greenlets, timeout=60, raise_error=True)
    unfinished = sum(not g.successful() for g in greenlets)
    stats = pool.get_stats()
    pool.closeall()
    resetting.closeall()
    print(json.dumps({"unfinished": unfinished, "busiest": busiest, "stats": stats}))
    assert unfinished == 0


main()
