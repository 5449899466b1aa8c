"""Adapters giving each pool the same shape, so the scenarios can treat them alike.

Every peer is configured as its users would configure it for the same job: a pool
of ``minconn``..``maxconn`` autocommit connections whose callers wait (up to
``timeout``) for a connection rather than fail. psycopg2's own pools cannot wait:
they raise ``PoolError`` at once, so where a scenario needs waiting, the bench
wraps them in a retry loop (``RETRY_PAUSE`` between attempts), as their users must.

A :class:`Peer` offers:

- ``get()`` / ``put(conn)``: the raw checkout and return, where the pool has them;
- ``block()``: the pool's own with-block (``None`` for psycopg2.pool, which has
  none); ``raw(x)`` turns what the block yields into a DB-API connection (only
  SQLAlchemy needs it: its ``Connection`` has no ``cursor()``);
- ``decorate(fn)``: ``@pgctx.with_connection(pool)`` (pgctx only);
- ``wait_block()``: a with-block that waits for a connection (psycopg2.pool: the
  retry loop), used by the contention and spike scenarios.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import psycopg2
import psycopg2.pool

from bench.common import AutocommitConnection

NAMES = ["pgctx", "psycopg2", "psycopg_pool", "sqlalchemy", "dbutils"]
LABELS = {
    "pgctx": "pgctx",
    "psycopg2": "psycopg2.pool",
    "psycopg_pool": "psycopg_pool",
    "sqlalchemy": "SQLAlchemy QueuePool",
    "dbutils": "DBUtils PooledDB",
}
DRIVER = {"psycopg_pool": "psycopg"}  # the others run on psycopg2
RETRY_PAUSE = 0.001  # seconds between attempts of the psycopg2.pool retry loop


def _identity(conn: Any) -> Any:
    return conn


@dataclass
class Spec:
    """How to build a pool: the same for every peer of one scenario."""

    dsn: str
    minconn: int = 4
    maxconn: int = 4
    timeout: float = 30.0
    check: bool = False  # check each connection on checkout (see check_cost.py)
    check_after_idle: float | None = None  # pgctx only
    factory2: type = AutocommitConnection  # psycopg2 connection_factory
    class3: Any = None  # psycopg connection class (default psycopg.Connection)


@dataclass
class Peer:
    name: str
    pool: Any
    get: Callable[[], Any] | None
    put: Callable[[Any], None] | None
    block: Callable[[], Any] | None
    wait_block: Callable[[], Any]
    close: Callable[[], None]
    raw: Callable[[Any], Any] = _identity
    decorate: Callable[[Callable[..., Any]], Callable[..., Any]] | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def label(self) -> str:
        return LABELS.get(self.name, self.name)

    @property
    def driver(self) -> str:
        return DRIVER.get(self.name, "psycopg2")


def build(name: str, spec: Spec) -> Peer:
    return _BUILDERS[name](spec)


def warm(peer: Peer, count: int) -> None:
    """Check ``count`` connections out at once and return them: opened and used once."""
    held = [peer.wait_block() for _ in range(count)]
    for cm in held:
        cm.__enter__()
    for cm in reversed(held):
        cm.__exit__(None, None, None)


# -- pgctx ---------------------------------------------------------------------------------


def _pgctx(spec: Spec) -> Peer:
    import pgctx.pool
    from pgctx.decorators import with_connection

    options: dict[str, Any] = {}
    if spec.check:
        from pgctx.health import check_connection

        options["check"] = check_connection
        if spec.check_after_idle is not None:
            options["check_after_idle"] = spec.check_after_idle
    pool = pgctx.pool.ThreadedConnectionPool(
        spec.minconn,
        spec.maxconn,
        spec.dsn,
        timeout=spec.timeout,
        connection_factory=spec.factory2,
        **options,
    )
    block = getattr(pool, "connection", None)
    if block is None:  # before ThreadedConnectionPool has connection(): the same object
        from pgctx.scope import ConnectionScope

        def block() -> Any:
            return ConnectionScope(pool)

    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        return with_connection(pool)(fn)  # type: ignore[no-any-return]

    return Peer(
        "pgctx",
        pool,
        get=pool.getconn,
        put=pool.putconn,
        block=block,
        wait_block=block,
        close=pool.closeall,
        decorate=decorate,
    )


# -- psycopg2.pool -------------------------------------------------------------------------


def _psycopg2(spec: Spec) -> Peer:
    pool = psycopg2.pool.ThreadedConnectionPool(
        spec.minconn, spec.maxconn, spec.dsn, connection_factory=spec.factory2
    )
    getconn, putconn = pool.getconn, pool.putconn

    @contextlib.contextmanager
    def retrying() -> Iterator[Any]:
        while True:
            try:
                conn = getconn()
                break
            except psycopg2.pool.PoolError:
                time.sleep(RETRY_PAUSE)
        try:
            yield conn
        finally:
            putconn(conn)

    return Peer(
        "psycopg2",
        pool,
        get=getconn,
        put=putconn,
        block=None,
        wait_block=retrying,
        close=pool.closeall,
        notes=[f"no waiting: a retry loop with {RETRY_PAUSE * 1000:g} ms pauses"],
    )


# -- psycopg_pool --------------------------------------------------------------------------


def _psycopg_pool(spec: Spec) -> Peer:
    import psycopg
    import psycopg_pool

    options: dict[str, Any] = {}
    if spec.check:
        options["check"] = psycopg_pool.ConnectionPool.check_connection
    pool = psycopg_pool.ConnectionPool(
        spec.dsn,
        min_size=spec.minconn,
        max_size=spec.maxconn,
        kwargs={"autocommit": True},
        timeout=spec.timeout,
        connection_class=spec.class3 or psycopg.Connection,
        open=True,
        **options,
    )
    pool.wait(timeout=60)
    return Peer(
        "psycopg_pool",
        pool,
        get=pool.getconn,
        put=pool.putconn,
        block=pool.connection,
        wait_block=pool.connection,
        close=pool.close,
    )


# -- SQLAlchemy ----------------------------------------------------------------------------


def _sqlalchemy(spec: Spec) -> Peer:
    import sqlalchemy

    dsn, factory = spec.dsn, spec.factory2
    engine = sqlalchemy.create_engine(
        "postgresql+psycopg2://",
        creator=lambda: psycopg2.connect(dsn, connection_factory=factory),
        poolclass=sqlalchemy.pool.QueuePool,
        pool_size=spec.minconn,
        max_overflow=spec.maxconn - spec.minconn,
        pool_timeout=spec.timeout,
        pool_pre_ping=spec.check,
        isolation_level="AUTOCOMMIT",
    )

    def put(conn: Any) -> None:
        conn.close()

    peer = Peer(
        "sqlalchemy",
        engine,
        get=engine.raw_connection,
        put=put,
        block=engine.connect,
        wait_block=engine.connect,
        close=engine.dispose,
        raw=_sqlalchemy_raw,
        notes=["with-block: `with engine.connect()`; queries through its DB-API connection"],
    )
    warm(peer, spec.minconn)  # QueuePool opens connections lazily
    return peer


def _sqlalchemy_raw(conn: Any) -> Any:
    return conn.connection


# -- DBUtils -------------------------------------------------------------------------------


def _dbutils(spec: Spec) -> Peer:
    from dbutils.pooled_db import PooledDB

    options: dict[str, Any] = {"ping": "SELECT 1"} if spec.check else {}
    pool = PooledDB(
        psycopg2,
        mincached=spec.minconn,
        maxcached=spec.maxconn,
        maxconnections=spec.maxconn,
        blocking=True,
        dsn=spec.dsn,
        connection_factory=spec.factory2,
        **options,
    )

    def put(conn: Any) -> None:
        conn.close()

    return Peer(
        "dbutils",
        pool,
        get=pool.connection,
        put=put,
        block=pool.connection,
        wait_block=pool.connection,
        close=pool.close,
        notes=["waits without a timeout (blocking=True)"],
    )


_BUILDERS: dict[str, Callable[[Spec], Peer]] = {
    "pgctx": _pgctx,
    "psycopg2": _psycopg2,
    "psycopg_pool": _psycopg_pool,
    "sqlalchemy": _sqlalchemy,
    "dbutils": _dbutils,
}


def build_all(spec: Spec, names: list[str] | None = None) -> list[Peer]:
    peers: list[Peer] = []
    try:
        for name in names or NAMES:
            peers.append(build(name, spec))
    except BaseException:
        close_all(peers)
        raise
    return peers


def close_all(peers: list[Peer]) -> None:
    for peer in peers:
        with contextlib.suppress(Exception):
            peer.close()
