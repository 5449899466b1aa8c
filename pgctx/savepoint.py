"""``with pgctx.savepoint():`` contain a failure inside the current unit of work.

A database error aborts the whole PostgreSQL transaction, and an exception
that escapes a joined block marks the unit failed. Inside a savepoint both are
undone: the exception still propagates (so the caller decides what to do),
but once it is caught the outer block can go on and commit.

A context manager only, never a decorator, so the rollback sits next to the
code that handles the error.
"""

from __future__ import annotations

from types import TracebackType
from typing import Any

from pgctx._driver import extensions
from pgctx.errors import NoActiveConnection, ScopeError, TransactionAborted
from pgctx.health import is_broken
from pgctx.registry import Binding, current_owner, find, resolve_pool
from pgctx.transaction import add_note

__all__ = ["Savepoint", "savepoint"]

_INERROR = extensions.TRANSACTION_STATUS_INERROR


def _execute(conn: Any, sql: str) -> None:
    with conn.cursor() as cur:
        cur.execute(sql)


class Savepoint:
    """``SAVEPOINT`` on entry; ``RELEASE`` on success, ``ROLLBACK TO`` and re-raise on error."""

    __slots__ = ("_binding", "_key", "_name", "_pool", "_state", "_was_aborted")

    def __init__(self, pool: Any = None, key: Any = None) -> None:
        self._pool = pool
        self._key = key
        self._state = 0

    def __enter__(self) -> Any:
        if self._state:
            raise ScopeError("a savepoint() can be entered only once; call savepoint() again")
        pool = resolve_pool(self._pool)
        handle = find(pool, self._key)
        if handle is None:
            raise NoActiveConnection(
                f"savepoint() needs an open block for pool {pool!r}, key {self._key!r}: "
                "use it inside `with pool.connection():` or a @with_connection function"
            )
        binding = handle.binding
        conn = binding.conn
        if conn.autocommit:
            raise ScopeError(
                "savepoint() needs a transaction, but the connection is in autocommit mode; "
                "open one with BEGIN (or turn autocommit off) first"
            )
        with binding.lock:
            binding.check_user(handle, current_owner(), join=False)
            binding.savepoints += 1
            self._name = f"pgctx_savepoint_{binding.savepoints}"
            self._was_aborted = binding.aborted
        _execute(conn, f"SAVEPOINT {self._name}")
        self._binding = binding
        self._state = 1
        return conn

    def _undo(self, binding: Binding) -> None:
        _execute(
            binding.conn, f"ROLLBACK TO SAVEPOINT {self._name}; RELEASE SAVEPOINT {self._name}"
        )
        with binding.lock:  # errors raised inside the savepoint no longer poison the unit
            binding.aborted = self._was_aborted
            if not self._was_aborted:
                binding.abort_cause = None

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._state != 1:
            raise ScopeError("savepoint() exited without being entered")
        self._state = 2
        binding = self._binding
        conn = binding.conn
        if et is None:
            failed_inside = (binding.aborted and not self._was_aborted) or (
                conn.info.transaction_status == _INERROR  # an error was caught inside
            )
            if failed_inside:
                self._undo(binding)
                raise TransactionAborted(
                    "an error inside this savepoint was caught without being re-raised, so "
                    "its work was rolled back to the savepoint; let the error propagate out "
                    "of the savepoint and catch it outside"
                )
            _execute(conn, f"RELEASE SAVEPOINT {self._name}")
            return
        # Decided from the connection, never from the exception's type: an
        # InterfaceError or a class-08 SQLSTATE can come from a healthy connection
        # ("cursor already closed"), and skipping the rollback then would let the
        # enclosing block commit work this savepoint was meant to undo.
        if is_broken(conn):
            with binding.lock:  # nothing to roll back to: the unit cannot commit
                binding.abort(ev)
            return
        try:
            self._undo(binding)
        except Exception as problem:  # the rollback failed: the connection is broken
            with binding.lock:
                binding.abort(ev)
            add_note(ev if ev is not None else problem, problem)


def savepoint(pool: Any = None, key: Any = None) -> Savepoint:
    """A savepoint in the block currently open for ``pool`` (default pool) and ``key``."""
    return Savepoint(pool, key)
