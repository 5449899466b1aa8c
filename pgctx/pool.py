"""Connection pooling for psycopg2: a drop-in for the ``psycopg2.pool`` module.

``import pgctx.pool as pool`` replaces ``import psycopg2.pool as pool``. The
classes here add ``connection()`` and ``scope()`` (``pgctx.scope``) to the pool
machinery of ``pgctx.basepool`` and ``pgctx.persistent``; this module sits on
top of the scope layer so that those stay independent of it.
"""

from __future__ import annotations

from types import MappingProxyType
from typing import Any

from pgctx import basepool, persistent
from pgctx._driver import psycopg2  # noqa: F401  (psycopg2.pool exposes it too; tests patch it)
from pgctx.errors import PoolError, PoolTimeout, TooManyWaiters
from pgctx.poolcore import _UNSET
from pgctx.scope import ConnectionScopesMixin
from pgctx.waiting import Connection, validate_timeout


class AbstractConnectionPool(ConnectionScopesMixin, basepool.AbstractConnectionPool):
    __doc__ = basepool.AbstractConnectionPool.__doc__


class SimpleConnectionPool(AbstractConnectionPool):
    """A connection pool that can't be shared across different threads."""

    # psycopg2 binds SimpleConnectionPool.getconn/putconn/closeall to the base class's
    # _getconn/_putconn/_closeall: overriding those changes nothing here, there as here
    # (overridden _connect and _getkey are honoured).
    _HOOK_ROUTES = MappingProxyType({})

    def __init__(self, minconn: Any, maxconn: Any, *args: Any, **kwargs: Any) -> None:
        if "timeout" in kwargs or "max_waiting" in kwargs:
            raise TypeError(
                "SimpleConnectionPool cannot wait for a connection (no other thread can "
                "return one): use ThreadedConnectionPool(..., timeout=seconds)"
            )
        super().__init__(minconn, maxconn, *args, **kwargs)

    def putconn(self, conn: Connection, key: Any = None, close: bool = False) -> None:  # type: ignore[override]
        """Put away a connection."""
        super().putconn(conn, key, close)


class ThreadedConnectionPool(AbstractConnectionPool):
    """A connection pool that works with the threading module.

    With ``timeout=seconds`` a caller waits (first come, first served) for a
    returned connection instead of getting "connection pool exhausted" at once.
    """

    def getconn(self, key: Any = None, *, timeout: float | None = _UNSET) -> Connection:
        """Get a free connection, waiting up to ``timeout`` seconds if the pool allows it."""
        if timeout is _UNSET:
            return self._checkout(key, self.timeout)
        return self._checkout(key, validate_timeout(timeout))


class PersistentConnectionPool(persistent.PersistentConnectionPool, AbstractConnectionPool):
    __doc__ = persistent.PersistentConnectionPool.__doc__


__all__ = [
    "AbstractConnectionPool",
    "PersistentConnectionPool",
    "PoolError",
    "PoolTimeout",
    "SimpleConnectionPool",
    "ThreadedConnectionPool",
    "TooManyWaiters",
]
