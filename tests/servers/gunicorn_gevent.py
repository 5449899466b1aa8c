"""gunicorn settings for the gevent worker (``-c python:tests.servers.gunicorn_gevent``).

psycopg2 blocks the whole process in libpq unless psycogreen installs a wait callback
that yields to gevent's hub; each worker installs it after the fork, before gunicorn's
gevent worker runs ``monkey.patch_all()``. The app (and pgctx) was imported earlier, in
the master (``--preload``).
"""

from __future__ import annotations

from typing import Any


def post_fork(server: Any, worker: Any) -> None:
    from psycogreen.gevent import patch_psycopg

    patch_psycopg()
