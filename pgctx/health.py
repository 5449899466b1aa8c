"""Disconnect classification: should a connection be closed rather than reused?

A healthy connection that saw an ordinary error (a constraint violation, a
deadlock, a statement timeout) only needs a rollback. A connection whose server
went away, whose protocol state is unknown, or that was interrupted in the
middle of a query must be closed: rolling it back fails or, worse, hands the
next borrower a connection in an undefined state.

``end_transaction`` applies that rule when a unit of work ends; scopes use it.
"""

from __future__ import annotations

from typing import Any

from pgctx._driver import extensions, psycopg2
from pgctx.errors import TransactionAborted

__all__ = [
    "DISCONNECT_SQLSTATES",
    "add_note",
    "check_connection",
    "end_transaction",
    "is_broken",
    "is_disconnect",
    "reset_session",
    "roll_back_for_return",
    "rollback",
]

#: SQLSTATEs outside class 08 that mean the session is gone: admin_shutdown,
#: crash_shutdown, cannot_connect_now.
DISCONNECT_SQLSTATES = frozenset({"57P01", "57P02", "57P03"})

_UNUSABLE_STATUSES = frozenset(
    {extensions.TRANSACTION_STATUS_UNKNOWN, extensions.TRANSACTION_STATUS_ACTIVE}
)
_CONNECTION_ERRORS = (psycopg2.OperationalError, psycopg2.InterfaceError)


def is_broken(conn: Any) -> bool:
    """True when ``conn`` cannot be reused: closed, status UNKNOWN, or ACTIVE.

    ACTIVE means a command is still in progress (the block was left by an
    interrupt or a cancellation in the middle of a query), so the connection's
    protocol state belongs to nobody.
    """
    if conn.closed:
        return True
    try:
        status = conn.info.transaction_status
    except psycopg2.Error:
        return True
    return status in _UNUSABLE_STATUSES


def is_disconnect(exc: BaseException | None, conn: Any = None) -> bool:
    """True when ``exc`` (or ``conn``'s state) says the connection is unusable.

    By SQLSTATE: class 08 (connection exception) and 57P01-57P03 (server
    shutdown). psycopg2 raises ``OperationalError``/``InterfaceError`` without a
    SQLSTATE when the socket itself failed ("server closed the connection
    unexpectedly", "connection already closed"), so those count too. Other
    errors with a SQLSTATE (``57014`` statement timeout, ``40001``, ``23505``...)
    leave the session usable after a rollback. With ``conn``, a closed or
    broken connection (see :func:`is_broken`) counts whatever ``exc`` is.
    """
    if conn is not None and is_broken(conn):
        return True
    if exc is None:
        return False
    code = getattr(exc, "pgcode", None)
    if code:
        return isinstance(code, str) and (code.startswith("08") or code in DISCONNECT_SQLSTATES)
    return isinstance(exc, _CONNECTION_ERRORS)


def _run_outside_transaction(conn: Any, statement: str) -> None:
    """Run ``statement`` in autocommit mode, leaving ``conn.autocommit`` as it was.

    Turning autocommit on is local to psycopg2 (no round trip), and it keeps the
    statement from opening a transaction the borrower would then have to end.
    """
    autocommit = conn.autocommit
    if not autocommit:
        conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute(statement)
    finally:
        if not autocommit and not conn.closed:
            conn.autocommit = False


def check_connection(conn: Any) -> None:
    """A pool ``check``: raise if ``conn`` cannot run a query; one round trip.

    Sends ``SELECT 1`` (psycopg2 rejects the empty query other drivers use) and
    leaves the transaction status as it was. Use ``check=pgctx.check_connection``.
    """
    if conn.closed:
        raise psycopg2.InterfaceError("connection already closed")
    if conn.info.transaction_status != extensions.TRANSACTION_STATUS_IDLE:
        with conn.cursor() as cur:  # inside a transaction already: just use it
            cur.execute("SELECT 1")
        return
    _run_outside_transaction(conn, "SELECT 1")


def reset_session(conn: Any) -> None:
    """A pool ``reset``: ``DISCARD ALL``, so no session state reaches the next borrower.

    Clears what a rollback leaves behind: ``SET`` parameters, ``SET ROLE``,
    temporary tables, prepared statements, advisory locks, ``LISTEN``. It must
    run on its own and outside a transaction, so an open one is rolled back.
    Use ``reset=pgctx.reset_session``.
    """
    if conn.info.transaction_status != extensions.TRANSACTION_STATUS_IDLE:
        conn.rollback()
    _run_outside_transaction(conn, "DISCARD ALL")


_IDLE = extensions.TRANSACTION_STATUS_IDLE
_INTRANS = extensions.TRANSACTION_STATUS_INTRANS
_INERROR = extensions.TRANSACTION_STATUS_INERROR


def add_note(exc: BaseException, problem: BaseException) -> None:
    """Attach ``problem`` to ``exc`` without replacing it (a note on 3.11+)."""
    note = getattr(exc, "add_note", None)
    if note is not None:
        note(
            f"pgctx: putting the connection away after this error also failed with "
            f"{type(problem).__name__}: {problem}".rstrip()
        )


def rollback(conn: Any) -> None:
    """Roll back, also a transaction opened by hand with BEGIN on an autocommit connection."""
    if conn.autocommit:  # psycopg2's rollback() is a no-op in autocommit, even after BEGIN
        with conn.cursor() as cur:
            cur.execute("ROLLBACK")
    else:
        conn.rollback()


def roll_back_for_return(conn: Any, exc: BaseException | None) -> tuple[bool, BaseException | None]:
    """Roll back if needed; return (discard, error). Discards what cannot be rolled back."""
    if is_disconnect(exc, conn):
        return True, None
    try:
        if conn.info.transaction_status != _IDLE:
            rollback(conn)
    except BaseException as problem:
        return True, problem
    return conn.info.transaction_status != _IDLE, None


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
        return roll_back_for_return(conn, exc)
    if is_broken(conn):
        if conn.autocommit:
            return True, None
        return True, TransactionAborted(
            "the connection broke before the block ended, so its transaction was lost: "
            "nothing was committed"
        )
    status = conn.info.transaction_status
    if aborted or status == _INERROR:
        discard, problem = roll_back_for_return(conn, None)
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
            discard, problem = roll_back_for_return(conn, None)
            return discard, problem or TransactionAborted(
                "a transaction opened with BEGIN on an autocommit connection was still open "
                "when the block ended; it was rolled back, not committed"
            )
        try:
            conn.commit()
        except BaseException as problem:
            discard, _ = roll_back_for_return(conn, problem)
            return discard, problem
    return False, None
