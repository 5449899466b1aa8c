"""A unit of work that is always rolled back: the per-test transaction of the plugin.

``with RolledBack(pool) as conn:`` checks a connection out of ``pool`` and binds it
as the current one for ``(pool, key)``, like the outermost ``with pool.connection()``
block, so every block and ``@with_connection`` function run inside joins it. Its exit
rolls back instead of committing, whatever happened inside.

Joined blocks never commit, but code could still end the transaction itself with
``conn.commit()`` or ``COMMIT``. So a *commit guard* is armed in the transaction: a
row in a temporary table with a deferred constraint trigger that raises. Any commit
then fails (and, as every failed commit does, rolls the transaction back), so nothing
written inside ever persists. A transaction ended some other way (``conn.rollback()``)
is detected at exit and reported with :class:`IsolationError`.
"""

from __future__ import annotations

import weakref
from types import TracebackType
from typing import Any

from pgctx._driver import extensions
from pgctx.registry import in_scope
from pgctx.scope import ConnectionScope
from pgctx.transaction import add_note

__all__ = ["IsolationError", "RolledBack"]

REFUSED = "pgctx: COMMIT refused, this test's transaction is rolled back at the end of the test"
_HINT = (
    "Inside the pgctx_transaction fixture (pgctx.testing.rollback.RolledBack) blocks and "
    "decorated functions join the test's transaction and commit nothing themselves; code "
    "that calls conn.commit() or runs COMMIT cannot be tested in it. Let the outermost "
    "with-block commit, or test such code with the pgctx_pool fixture and clean up yourself."
)


def _sql(text: str) -> str:
    return text.replace("'", "''")


# The guard's objects are temporary (per server session). They are created, committed,
# the first time a connection is used, and again inside the transaction if they are gone
# (a DISCARD, or a pooler handing out another server session); then each use arms the
# guard by inserting a row, whose deferred trigger fires only if the transaction commits.
_ENSURE = f"""
DO $guard$ BEGIN
IF to_regclass('pg_temp.pgctx_commit_guard') IS NULL THEN
    CREATE TEMP TABLE pgctx_commit_guard (armed int);
    CREATE OR REPLACE FUNCTION pg_temp.pgctx_refuse_commit() RETURNS trigger
    LANGUAGE plpgsql AS $pgctx$
    BEGIN
        RAISE EXCEPTION '{_sql(REFUSED)}' USING HINT = '{_sql(_HINT)}';
    END $pgctx$;
    CREATE CONSTRAINT TRIGGER pgctx_refuse_commit AFTER INSERT ON pg_temp.pgctx_commit_guard
    DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION pg_temp.pgctx_refuse_commit();
END IF;
END $guard$;
"""
_ARM = _ENSURE + "INSERT INTO pg_temp.pgctx_commit_guard VALUES (1); SELECT txid_current()"
_CURRENT = "SELECT txid_current_if_assigned()"
_IDLE = extensions.TRANSACTION_STATUS_IDLE
_INTRANS = extensions.TRANSACTION_STATUS_INTRANS


# Connections whose server session got the guard's objects committed once.
_installed: weakref.WeakSet[Any] = weakref.WeakSet()


class IsolationError(AssertionError):
    """The rolled-back transaction was ended inside the test (``conn.rollback()``...).

    What ran after that point was outside the test's transaction and may have been
    committed for real.
    """


class _Ended(Exception):
    """Passed to the block's exit so that it rolls back instead of committing."""


def _scalar(conn: Any, sql: str) -> Any:
    with conn.cursor() as cur:
        cur.execute(sql)
        row = cur.fetchone()
    return None if row is None else row[0]


class RolledBack:
    """``with RolledBack(pool, key=None) as conn:`` a block whose exit always rolls back.

    It must be the outermost block for ``pool`` and ``key`` in its context. Blocks,
    decorated functions and savepoints inside it (in this thread, and in tasks and
    threads that strictly hand off, like ``asyncio.run`` or ``asyncio.to_thread``)
    join its transaction. ``guard=False`` skips the commit guard (it needs the
    TEMP privilege on the database and costs one INSERT per use).
    """

    def __init__(self, pool: Any, key: Any = None, *, guard: bool = True) -> None:
        self._pool = pool
        self._key = key
        self._guard = guard
        self._scope: ConnectionScope | None = None
        self._xid: Any = None
        self.conn: Any = None

    def __repr__(self) -> str:
        return f"<RolledBack pool={self._pool!r} key={self._key!r}>"

    def __enter__(self) -> Any:
        if self._scope is not None:
            raise RuntimeError("a RolledBack block can be entered only once")
        if in_scope(self._pool, self._key):
            raise RuntimeError(
                f"a connection is already bound for pool {self._pool!r}, key {self._key!r}: "
                "RolledBack must be the outermost block, or it would join (and could not "
                "roll back) a transaction that another block commits"
            )
        scope = self._pool.connection(self._key)
        # Entered from this (non-generator) frame: a generator fixture around the test
        # would otherwise hide the binding while the generator is suspended at yield.
        conn = scope.__enter__()
        self._scope = scope
        self.conn = conn
        try:
            self._begin(conn)
        except BaseException as exc:
            scope.__exit__(type(exc), exc, exc.__traceback__)
            raise
        return conn

    def _begin(self, conn: Any) -> None:
        if self._guard and conn not in _installed:
            with conn.cursor() as cur:
                cur.execute(_ENSURE)
            if not conn.autocommit:
                conn.commit()  # nothing of the test's yet: only the guard's objects
            _installed.add(conn)
        if conn.autocommit:
            with conn.cursor() as cur:
                cur.execute("BEGIN")
        self._xid = _scalar(conn, _ARM if self._guard else "SELECT txid_current()")

    def _ended(self, conn: Any) -> bool:
        """True when the transaction begun on entry is no longer the open one."""
        if conn.closed:
            return False  # broken: the block's exit discards it, nothing was committed
        status = conn.info.transaction_status
        if status == _IDLE:  # ended, and nothing ran since
            return True
        if status != _INTRANS:  # failed (INERROR) or broken: cannot be asked
            return False
        return bool(_scalar(conn, _CURRENT) != self._xid)

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        scope = self._scope
        if scope is None:
            raise RuntimeError("RolledBack exited without being entered")
        try:
            ended = self._ended(self.conn)
        except Exception:  # the connection broke: the block's exit discards it
            ended = False
        if ev is None:  # end the block as failed, so that it rolls back
            scope.__exit__(_Ended, _Ended("rolled back at the end of the test"), None)
        else:
            scope.__exit__(et, ev, tb)
        if not ended:
            return
        problem = IsolationError(
            "the test's transaction was ended inside the test (by conn.rollback(), a "
            "ROLLBACK, or a COMMIT, which the commit guard refused), so what ran after that "
            "was outside it and may have been committed; let the with-blocks end units of "
            "work, and use pgctx.savepoint() to undo part of one"
        )
        if ev is None:
            raise problem
        add_note(ev, problem)
