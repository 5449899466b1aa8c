"""Fixtures for the fault tests: a FaultProxy in front of the session server."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from pgctx.pool import ThreadedConnectionPool
from pgctx.testing import PgServer, ThrowawayServer
from tests.faults.proxy import FaultProxy


@pytest.fixture
def proxy(pg_server: PgServer) -> Iterator[FaultProxy]:
    """A FaultProxy in relay mode in front of ``pg_server``; closed (FIN to all) after."""
    with FaultProxy(pg_server.dsn) as p:
        yield p


@pytest.fixture(scope="module")
def module_server() -> Iterator[ThrowawayServer]:
    """A throwaway server of the test module's own, stopped and started by its tests.

    One per module rather than ``private_pg_server`` per test: initdb costs a second or
    two, a restart a tenth of that. ``server`` makes sure each test finds it running.
    """
    try:
        instance = ThrowawayServer(max_connections=40)
    except ImportError as exc:
        pytest.skip(str(exc))
    with instance:
        yield instance


@pytest.fixture
def server(module_server: ThrowawayServer, app: str) -> Iterator[ThrowawayServer]:
    """The module's server, running; started again after a test that left it stopped.

    Needs an ``app`` fixture (the application_name of the test's pools) in the module.
    """
    module_server.start()
    yield module_server
    module_server.start()
    module_server.terminate_backends(application_name=app)


@pytest.fixture
def make(app: str) -> Iterator[Callable[..., ThreadedConnectionPool]]:
    """``make(target, minconn, maxconn, **options)``: pools for ``app``, closed afterwards.

    Needs an ``app`` fixture in the module.
    """
    made: list[ThreadedConnectionPool] = []

    def build(target: str, minconn: int, maxconn: int, **options: Any) -> Any:
        pool = ThreadedConnectionPool(minconn, maxconn, target, application_name=app, **options)
        made.append(pool)
        return pool

    yield build
    for pool in made:
        if not pool.closed:
            pool.closeall()
