"""pgctx: psycopg2 connection pools, contextvar-scoped connections, with-blocks and decorators."""

from __future__ import annotations

from pgctx.errors import (
    ConcurrentUseError,
    NoActiveConnection,
    PgctxError,
    PoolError,
    PoolTimeout,
    TooManyWaiters,
    TransactionAborted,
)
from pgctx.pool import (
    AbstractConnectionPool,
    PersistentConnectionPool,
    SimpleConnectionPool,
    ThreadedConnectionPool,
)

__version__ = "0.1.0.dev0"

__all__ = [
    "AbstractConnectionPool",
    "ConcurrentUseError",
    "NoActiveConnection",
    "PersistentConnectionPool",
    "PgctxError",
    "PoolError",
    "PoolTimeout",
    "SimpleConnectionPool",
    "ThreadedConnectionPool",
    "TooManyWaiters",
    "TransactionAborted",
]
