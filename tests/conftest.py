"""Fixtures shared by the test modules (the server fixtures come from pgctx's plugin)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest


@pytest.fixture
def table(pg_admin: Any) -> Iterator[str]:
    """A fresh table ``(x int PRIMARY KEY)`` with a unique name, dropped afterwards."""
    name = f"t_{uuid.uuid4().hex[:12]}"
    with pg_admin.cursor() as cur:
        cur.execute(f"CREATE TABLE {name} (x int PRIMARY KEY)")
    yield name
    with pg_admin.cursor() as cur:
        cur.execute(f"DROP TABLE IF EXISTS {name}")
