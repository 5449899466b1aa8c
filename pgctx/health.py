"""Connection health: disconnect classification, the pool check and the session reset.

Should a connection be closed rather than reused?

A healthy connection that saw an ordinary error (a constraint violation, a
deadlock, a statement timeout) only needs a rollback. A connection whose server
went away, whose protocol state is unknown, or that was interrupted in the
middle of a query must be closed: rolling it back fails or, worse, hands the
next borrower a connection in an undefined state.

``end_transaction`` applies that rule when a unit of work ends, from the
connection's state and the outcome of the rollback (not from the exception's type).
"""

from __future__ import annotations

from typing import Any

from pgctx._driver import extensions, psycopg2

__all__ = [
    "DISCONNECT_SQLSTATES",
    "check_connection",
    "is_broken",
    "is_disconnect",
    "reset_session",
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
        status = conn.get_transaction_status()  # conn.info would allocate an object
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

    This answers "does this error look like a lost connection?" (for retries and
    logging). pgctx's blocks and savepoints do not use it to decide what to do with
    a connection: they look at the connection's own state and try the rollback, since
    an ``InterfaceError`` such as "cursor already closed" also comes from healthy
    connections.
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
    """A pool ``reset``: ``DISCARD ALL``, so no server session state reaches the next borrower.

    Clears what a rollback leaves behind: ``SET`` parameters, ``SET ROLE``,
    temporary tables, prepared statements, advisory locks, ``LISTEN``. It must
    run on its own and outside a transaction, so an open one is rolled back.
    psycopg2's client-side attributes (``autocommit``, ``isolation_level``,
    ``readonly``, ``deferrable``) are not session state and stay as the last
    borrower left them: set them in ``configure`` and leave them alone.
    Use ``reset=pgctx.reset_session``.
    """
    if conn.info.transaction_status != extensions.TRANSACTION_STATUS_IDLE:
        conn.rollback()
    _run_outside_transaction(conn, "DISCARD ALL")
