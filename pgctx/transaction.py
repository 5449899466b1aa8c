"""Ending a unit of work: commit, roll back, or give up on the connection.

Used by the with-block (``pgctx.scope``) and savepoints. These functions never
raise: they return what went wrong so that the caller can put the connection
away first and then raise it, or attach it to the body's own exception.
"""

from __future__ import annotations

import contextlib
from typing import Any

from pgctx._driver import extensions
from pgctx.errors import TransactionAborted
from pgctx.health import is_broken

__all__ = ["add_note", "end_transaction", "roll_back_for_return", "rollback"]

_IDLE = extensions.TRANSACTION_STATUS_IDLE
_INTRANS = extensions.TRANSACTION_STATUS_INTRANS
_INERROR = extensions.TRANSACTION_STATUS_INERROR


def add_note(exc: BaseException, problem: BaseException) -> None:
    """Attach ``problem`` to ``exc`` as a note, without replacing it.

    Python 3.11+ prints notes with the traceback; on 3.10 the note is only kept
    in ``exc.__notes__``, where 3.11's ``add_note`` would put it.
    """
    text = (
        f"pgctx: putting the connection away after this error also failed with "
        f"{type(problem).__name__}: {problem}".rstrip()
    )
    note = getattr(exc, "add_note", None)
    if note is not None:
        note(text)
        return
    with contextlib.suppress(AttributeError, TypeError):  # exceptions without a __dict__
        setattr(exc, "__notes__", [*getattr(exc, "__notes__", []), text])  # noqa: B010


def rollback(conn: Any) -> None:
    """Roll back, also a transaction opened by hand with BEGIN on an autocommit connection."""
    if conn.autocommit:  # psycopg2's rollback() is a no-op in autocommit, even after BEGIN
        with conn.cursor() as cur:
            cur.execute("ROLLBACK")
    else:
        conn.rollback()


def roll_back_for_return(
    conn: Any, exc: BaseException | None = None
) -> tuple[bool, BaseException | None]:
    """Roll back if needed; return (discard, error). Discards what cannot be rolled back.

    Decided from the connection's state (closed, status UNKNOWN/ACTIVE) and from the
    rollback itself, never from ``exc``: an ``InterfaceError`` or a class-08 SQLSTATE
    also comes from healthy connections ("cursor already closed"), and a disconnect
    the status does not show yet makes the rollback fail. ``exc`` is accepted for
    the callers that pass the block's error, and not consulted.
    """
    if is_broken(conn):
        return True, None
    try:
        if conn.get_transaction_status() != _IDLE:
            rollback(conn)
    except BaseException as problem:
        return True, problem
    return conn.get_transaction_status() != _IDLE, None


def end_transaction(
    conn: Any,
    exc: BaseException | None,
    aborted: bool = False,
    abort_cause: BaseException | None = None,
    close_on_error: bool = False,
) -> tuple[bool, BaseException | None]:
    """End a unit of work on ``conn``: commit or roll back; return (discard, error).

    Never raises.

    With ``exc`` (the block failed) the error is secondary, to attach to ``exc``;
    on a clean exit it is the error to raise.
    """
    if exc is not None:
        if close_on_error:
            return True, None
        return roll_back_for_return(conn)
    if not conn.closed and conn.get_transaction_status() == _IDLE and not aborted:
        return False, None  # the common case: autocommit, or nothing left to commit
    if is_broken(conn):
        if conn.autocommit:
            return True, None
        return True, TransactionAborted(
            "the connection broke before the block ended, so its transaction was lost: "
            "nothing was committed"
        )
    status = conn.get_transaction_status()
    if aborted or status == _INERROR:
        discard, problem = roll_back_for_return(conn)
        if aborted:
            err = TransactionAborted(
                "an exception escaped a nested block (or another thread or task misused the "
                "connection), so this block rolled back instead of committing; catch errors "
                "inside `with pgctx.savepoint():` to continue a unit of work after them"
            )
            err.__cause__ = abort_cause
        else:
            err = TransactionAborted(
                "the transaction failed inside this block (a database error was caught "
                "without a savepoint), so it was rolled back instead of committed; catch "
                "errors inside `with pgctx.savepoint():` to continue after them"
            )
        return discard, problem or err
    if status == _INTRANS:
        if conn.autocommit:
            discard, problem = roll_back_for_return(conn)
            return discard, problem or TransactionAborted(
                "a transaction opened with BEGIN on an autocommit connection was still open "
                "when the block ended; it was rolled back, not committed"
            )
        try:
            conn.commit()
        except BaseException as problem:
            discard, _ = roll_back_for_return(conn)
            return discard, problem
    return False, None
