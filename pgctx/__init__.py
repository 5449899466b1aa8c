"""pgctx: psycopg2 connection pools, contextvar-scoped connections, with-blocks and decorators."""

from __future__ import annotations

from pgctx.decorators import with_connection
from pgctx.errors import (
    ConcurrentUseError,
    JoinedCommitWarning,
    NoActiveConnection,
    NoDefaultPool,
    PgctxError,
    PoolError,
    PoolTimeout,
    ScopeError,
    TooManyWaiters,
    TransactionAborted,
)
from pgctx.health import check_connection, is_broken, is_disconnect, reset_session
from pgctx.pool import (
    AbstractConnectionPool,
    PersistentConnectionPool,
    SimpleConnectionPool,
    ThreadedConnectionPool,
)
from pgctx.registry import current_connection, get_default_pool, in_scope, set_default_pool
from pgctx.requestscope import RequestScope
from pgctx.savepoint import Savepoint, savepoint
from pgctx.scope import ConnectionScope, ConnectionScopesMixin

__version__ = "0.1.0.dev0"

__all__ = [
    "AbstractConnectionPool",
    "ConcurrentUseError",
    "ConnectionScope",
    "ConnectionScopesMixin",
    "JoinedCommitWarning",
    "NoActiveConnection",
    "NoDefaultPool",
    "PersistentConnectionPool",
    "PgctxError",
    "PoolError",
    "PoolTimeout",
    "RequestScope",
    "Savepoint",
    "ScopeError",
    "SimpleConnectionPool",
    "ThreadedConnectionPool",
    "TooManyWaiters",
    "TransactionAborted",
    "check_connection",
    "current_connection",
    "get_default_pool",
    "in_scope",
    "is_broken",
    "is_disconnect",
    "reset_session",
    "savepoint",
    "set_default_pool",
    "with_connection",
]
