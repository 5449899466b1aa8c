"""Ending a unit of work: commit, roll back, or give up on the connection.

Used by the with-block (``pgctx.scope``) and savepoints. These functions never
raise: they return what went wrong so that the caller can put the connection
away first and then raise it, or attach it to the body's own exception.
"""

from __future__ import annotations

import os
import sys
import warnings
from types import FrameType
from typing import Any

from pgctx._driver import extensions
from pgctx.errors import JoinedCommitWarning, TransactionAborted, note_on
from pgctx.health import is_broken

__all__ = [
    "add_note",
    "end_transaction",
    "roll_back_for_return",
    "rollback",
    "warn_ended_by_joined_block",
]

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
    note_on(exc, text)


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


_PGCTX_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep
_REPORTED_DEPTH = 200  # frames remembered per warning, to skip the enclosing joined blocks


def _find_frame(frame: FrameType, ident: int) -> FrameType | None:
    """The frame with ``id() == ident`` on this thread's stack or another's, or None."""
    for top in (frame, *sys._current_frames().values()):
        walk: FrameType | None = top
        while walk is not None:
            if id(walk) == ident:
                return walk
            walk = walk.f_back
    return None


def _place(frame: FrameType | None, now: bool) -> tuple[str, FrameType | None]:
    """Where ``frame`` is in the user's code, and that frame.

    pgctx's own frames are skipped outwards; a ``@with_connection`` function met on
    the way (its wrapper's ``wrapped``) is named. With ``now``, the line is given as
    the one that frame is running now.
    """
    decorated = None
    found = frame
    while found is not None and found.f_code.co_filename.startswith(_PGCTX_DIR):
        if decorated is None:
            decorated = found.f_locals.get("wrapped")
        found = found.f_back
    found = found if found is not None else frame
    if found is None:
        return "an unknown place", None
    code = found.f_code
    if now:
        text = f"{code.co_name}() in {code.co_filename}, now at line {found.f_lineno}"
    else:
        text = f"{code.co_name}() at {code.co_filename}:{found.f_lineno}"
    if decorated is not None:
        name = getattr(decorated, "__qualname__", None) or type(decorated).__name__
        text = f"the call of @with_connection {name} by {text}"
    return text, found


def warn_ended_by_joined_block(opener: Any, inner: FrameType) -> None:
    """Warn that a joined block committed or rolled back its enclosing block's work.

    ``opener`` is the enclosing (outermost) block, or None; its ``_site`` is the frame
    that opened it, whose line now is the one that led into the joined block.
    ``inner`` is the frame leaving the joined block; the warning is attributed to its
    line. Joined blocks around the one that warned do not warn again for it.
    Runs only when warning: not on any block's path.
    """
    reported = getattr(opener, "_reported", ())
    if id(inner) in reported:
        return  # a joined block nested in this one already named the place
    site = None if opener is None else _find_frame(inner, opener._site)
    if site is not None:
        outer_text, _ = _place(site, now=True)
    elif opener is not None:  # suspended (a task awaiting a hand-off): name its function
        code = opener._site_code
        outer_text = f"{code.co_name}() in {code.co_filename}"
    else:
        outer_text = "an unknown place"
    inner_text, joined = _place(inner, now=False)
    assert joined is not None
    if opener is not None:
        # The joined blocks around this one exit from frames between here and the
        # opener's: remember those by id (only for the latest warning, so a loop of such
        # commits keeps nothing alive).
        frames: list[int] = []
        walk: FrameType | None = inner
        while walk is not None and len(frames) < _REPORTED_DEPTH:
            frames.append(id(walk))
            if id(walk) == opener._site:
                break
            walk = walk.f_back
        opener._reported = tuple(frames)
    message = (
        "a block that joined an enclosing block ended that block's transaction (a "
        "commit() or rollback() inside it), so the enclosing block's work done before "
        "was committed or rolled back with it, not when the enclosing block ends. "
        f"Enclosing block: opened in {outer_text}; joined block: {inner_text}. "
        "Nested blocks share one transaction that the outermost block ends: remove "
        "the commit()/rollback(), or give this code a transaction of its own with "
        "pool.connection(separate=True) (@with_connection(separate=True))"
    )
    globals_ = joined.f_globals
    warnings.warn_explicit(
        message,
        JoinedCommitWarning,
        joined.f_code.co_filename,
        joined.f_lineno,
        module=globals_.get("__name__"),
        registry=globals_.setdefault("__warningregistry__", {}),
    )
