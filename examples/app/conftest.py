"""Fixtures of the to-do app's tests, on top of pgctx's pytest plugin.

The plugin (installed with pgctx, entry point ``pgctx``) gives ``pgctx_pool`` and
``pgctx_transaction``; this file makes the pool the app's default pool and creates the
schema once per session (committed), so that each test only pays for its own rollback.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import todos

import pgctx


@pytest.fixture(scope="session", autouse=True)
def app_database(pgctx_pool: Any) -> Iterator[Any]:
    previous = pgctx.set_default_pool(pgctx_pool)
    todos.create_schema()  # outside any test transaction: committed
    try:
        yield pgctx_pool
    finally:
        with pgctx_pool.connection() as conn, conn.cursor() as cur:
            cur.execute("DROP TABLE todos")
        pgctx.set_default_pool(previous)


@pytest.fixture
def client(app_database: Any) -> Any:
    return todos.create_app(app_database).test_client()
