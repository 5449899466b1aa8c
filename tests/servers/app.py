"""A small WSGI app on pgctx, served by real gunicorn and uWSGI in the server tests.

Like an app in production, it builds its pool at import time, so a pre-forking server
that loads the app in its master (gunicorn ``--preload``, uWSGI without ``lazy-apps``)
forks with the pool's connections open. Each request reports the worker process and the
server session (backend pid and start time) that served it.

Set by the tests through the environment: ``PGCTX_APP_DSN``, ``PGCTX_APP_NAME`` (the
pool's application_name) and ``PGCTX_APP_OPTIONS`` (JSON pool options; ``"check"`` and
``"reset"`` set to true mean pgctx's own ones).
"""

from __future__ import annotations

import json
import os
import threading
import time
import traceback
from collections.abc import Callable, Iterable
from typing import Any
from urllib.parse import parse_qs

import pgctx

_options: dict[str, Any] = json.loads(os.environ.get("PGCTX_APP_OPTIONS") or "{}")
if _options.pop("check", False):
    _options["check"] = pgctx.check_connection
if _options.pop("reset", False):
    _options["reset"] = pgctx.reset_session

pool = pgctx.ThreadedConnectionPool(
    2, 8, os.environ["PGCTX_APP_DSN"], application_name=os.environ["PGCTX_APP_NAME"], **_options
)
# What the master process held when it loaded the app (reported by /threads).
THREADS_AT_IMPORT = sorted(t.name for t in threading.enumerate())


class Expected(Exception):
    """Raised by /failing inside a block: the block must roll back and return."""


def _identity(conn: Any, sleep: float) -> dict[str, Any]:
    with conn.cursor() as cur:
        cur.execute(
            "SELECT pid, backend_start::text, pg_sleep(%s)::text "
            "FROM pg_stat_activity WHERE pid = pg_backend_pid()",
            (sleep,),
        )
        pid, started, _ = cur.fetchone()
    return {"worker": os.getpid(), "backend": f"{pid}@{started}"}


def block(sleep: float) -> dict[str, Any]:
    with pool.connection() as conn:
        return _identity(conn, sleep)


@pgctx.with_connection(pool)
def decorated(sleep: float, conn: Any = None) -> dict[str, Any]:
    return _identity(conn, sleep)


def rollback(sleep: float) -> dict[str, Any]:
    """Raw getconn/putconn with the transaction left open: the pool rolls it back."""
    conn = pool.getconn()
    try:
        return _identity(conn, sleep)
    finally:
        pool.putconn(conn)


def failing(sleep: float) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    try:
        with pool.connection() as conn:
            seen = _identity(conn, sleep)
            raise Expected
    except Expected:
        return seen


ROUTES: dict[str, Callable[[float], dict[str, Any]]] = {
    "/block": block,
    "/decorated": decorated,
    "/rollback": rollback,
    "/failing": failing,
}


def application(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    path = environ.get("PATH_INFO", "/")
    query = parse_qs(environ.get("QUERY_STRING", ""))
    sleep = float(query.get("sleep", ["0"])[0])
    try:
        if path == "/ping":
            time.sleep(sleep)
            result: Any = {"worker": os.getpid()}
        elif path == "/threads":
            result = {"worker": os.getpid(), "at_import": THREADS_AT_IMPORT}
        else:
            result = ROUTES[path](sleep)
        status, body = "200 OK", json.dumps(result).encode()
    except Exception:
        status, body = "500 Internal Server Error", traceback.format_exc().encode()
    start_response(status, [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]
