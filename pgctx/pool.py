"""Connection pooling for psycopg2: a drop-in for the ``psycopg2.pool`` module.

``import pgctx.pool as pool`` replaces ``import psycopg2.pool as pool``.
"""

from __future__ import annotations

from pgctx import basepool, persistent
from pgctx.errors import PoolError, PoolTimeout, TooManyWaiters


class AbstractConnectionPool(basepool.AbstractConnectionPool):
    __doc__ = basepool.AbstractConnectionPool.__doc__


class SimpleConnectionPool(basepool.SimpleConnectionPool):
    __doc__ = basepool.SimpleConnectionPool.__doc__


class ThreadedConnectionPool(basepool.ThreadedConnectionPool):
    __doc__ = basepool.ThreadedConnectionPool.__doc__


class PersistentConnectionPool(persistent.PersistentConnectionPool):
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
