"""Fixtures for the tests behind a real PgBouncer in transaction mode.

PgBouncer sits in front of a throwaway server of this package's own (started even when
``PGCTX_TEST_DSN`` is set): the tests create roles, count and kill PgBouncer's server
connections, and trust authentication must hold end to end.  Clients log in as ``app``;
PgBouncer's server connections are therefore the server's ``app`` sessions.

Without a pgbouncer binary the tests are skipped, except when ``CI`` is set: there a
missing pgbouncer fails them, so that a green CI run proves they ran.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from pgctx.testing import ThrowawayServer
from pgctx.testing.pgbouncer import PgBouncer, PgBouncerNotFound, find_pgbouncer

USERS = ("app", "tuned")  # client (and server) roles; "tuned" has role-level settings


def _require_pgbouncer() -> None:
    try:
        find_pgbouncer()
    except PgBouncerNotFound as exc:
        if os.environ.get("CI"):
            pytest.fail(f"CI is set, so the PgBouncer tests must run: {exc}", pytrace=False)
        pytest.skip(str(exc))


@pytest.fixture(scope="package")
def bouncer_server() -> Iterator[ThrowawayServer]:
    """The server behind every PgBouncer of these tests, with roles ``app`` and ``tuned``."""
    _require_pgbouncer()
    try:
        server = ThrowawayServer()
    except ImportError as exc:
        pytest.skip(str(exc))
    with server:
        admin = server.connect()
        try:
            with admin.cursor() as cur:
                for role in USERS:
                    cur.execute(f"CREATE ROLE {role} LOGIN")
                    cur.execute(f"GRANT CREATE ON SCHEMA public TO {role}")
                cur.execute("ALTER ROLE tuned SET statement_timeout = '4321ms'")
        finally:
            admin.close()
        yield server


@pytest.fixture
def make_pgbouncer(bouncer_server: ThrowawayServer) -> Iterator[Callable[..., PgBouncer]]:
    """Build PgBouncers (transaction mode) in front of ``bouncer_server`` or ``server=``."""
    made: list[PgBouncer] = []

    def build(server: Any = bouncer_server, **options: Any) -> PgBouncer:
        bouncer = PgBouncer(server.host, server.port, users=USERS, **options)
        made.append(bouncer)
        return bouncer

    yield build
    for bouncer in made:
        bouncer.close()


@pytest.fixture
def pgbouncer(make_pgbouncer: Callable[..., PgBouncer]) -> PgBouncer:
    """A fresh PgBouncer: transaction mode, ``default_pool_size=2``, clients as ``app``."""
    return make_pgbouncer(default_pool_size=2)


@pytest.fixture
def server_admin(bouncer_server: ThrowawayServer) -> Iterator[Any]:
    """An autocommit superuser connection straight to the server (not through PgBouncer)."""
    conn = bouncer_server.connect(application_name="pgctx-bouncer-admin")
    try:
        yield conn
    finally:
        conn.close()
