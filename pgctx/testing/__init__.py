"""Throwaway PostgreSQL servers and pytest fixtures for pgctx tests and examples.

Starting a server needs the ``testing`` extra (``pip install 'pgctx[testing]'``);
importing this package does not.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

from pgctx.testing._common import ExistingServer, PgServer, ServerError, mask_dsn
from pgctx.testing.server import ThrowawayServer

__all__ = [
    "ExistingServer",
    "PgServer",
    "ServerError",
    "ThrowawayServer",
    "dsn_from_env",
    "mask_dsn",
    "throwaway_or_env",
]

_ENV_VARS = ("PGCTX_TEST_DSN", "PGCTX_DSN", "DATABASE_URL")


def dsn_from_env() -> str | None:
    """Return ``PGCTX_TEST_DSN``, else ``PGCTX_DSN``, else ``DATABASE_URL``, else None."""
    for name in _ENV_VARS:
        value = os.environ.get(name)
        if value:
            return value
    return None


@contextlib.contextmanager
def throwaway_or_env() -> Iterator[str]:
    """Yield a DSN: the one from the environment (see dsn_from_env), else a throwaway server's.

    The throwaway server is stopped and deleted when the block exits.
    """
    dsn = dsn_from_env()
    if dsn is not None:
        yield dsn
        return
    with ThrowawayServer() as server:
        yield server.dsn
