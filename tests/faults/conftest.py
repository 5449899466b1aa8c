"""Fixtures for the fault tests: a FaultProxy in front of the session server."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from pgctx.testing import PgServer
from tests.faults.proxy import FaultProxy


@pytest.fixture
def proxy(pg_server: PgServer) -> Iterator[FaultProxy]:
    """A FaultProxy in relay mode in front of ``pg_server``; closed (FIN to all) after."""
    with FaultProxy(pg_server.dsn) as p:
        yield p
