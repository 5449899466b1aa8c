"""pgctx's exception types.

``PoolError`` *is* ``psycopg2.pool.PoolError``, so ``except PoolError`` clauses
written for psycopg2 keep catching everything the pools raise. Every new pool
error subclasses it; scope errors subclass ``PgctxError``; warnings subclass
``UserWarning``.
"""

from __future__ import annotations

import contextlib

from pgctx._driver import psycopg2_pool

PoolError = psycopg2_pool.PoolError
"""``psycopg2.pool.PoolError`` itself: ``except`` clauses written for psycopg2 keep matching.

Raised, as in psycopg2, for an exhausted or closed pool and for a connection put back
under an unknown key; ``PoolTimeout`` and ``TooManyWaiters`` subclass it.
"""


class PoolTimeout(PoolError):
    """No connection became free within the pool's ``timeout``.

    The message starts with "connection pool exhausted", like psycopg2's
    immediate error, so code matching on that text keeps working.
    """


class TooManyWaiters(PoolError):
    """More callers than ``max_waiting`` are already waiting for a connection."""


class PgctxError(Exception):
    """Base class of the errors raised by pgctx's scopes and registry."""


class NoActiveConnection(PgctxError, LookupError):
    """``current_connection()`` was called where no connection is bound."""


class NoDefaultPool(NoActiveConnection):
    """``pool`` was omitted but no default pool was set."""


class ScopeError(PgctxError, RuntimeError):
    """A scope object was misused (entered twice, exited without entering...)."""


class ConcurrentUseError(PgctxError, RuntimeError):
    """Two threads or tasks tried to use one bound connection at the same time."""


class TransactionAborted(PgctxError):
    """A nested block failed, so the outer block rolled back instead of committing."""


class JoinedCommitWarning(UserWarning):
    """A block that joined an enclosing one committed or rolled back its transaction.

    The enclosing block's work done before the join was committed (or undone) with
    it, not at the end of the enclosing block. Seen in code rewritten from
    getconn/commit/putconn to blocks that kept its own ``conn.commit()``.
    """


def note_on(exc: BaseException, text: str) -> None:
    """Attach ``text`` to ``exc`` as a note, without replacing the exception.

    Python 3.11+ prints notes with the traceback; on 3.10 the note is only kept in
    ``exc.__notes__``, where 3.11's ``add_note`` would put it.
    """
    add_note = getattr(exc, "add_note", None)
    if add_note is not None:
        add_note(text)
        return
    with contextlib.suppress(AttributeError, TypeError):  # exceptions without a __dict__
        setattr(exc, "__notes__", [*getattr(exc, "__notes__", []), text])  # noqa: B010


__all__ = [
    "ConcurrentUseError",
    "JoinedCommitWarning",
    "NoActiveConnection",
    "NoDefaultPool",
    "PgctxError",
    "PoolError",
    "PoolTimeout",
    "ScopeError",
    "TooManyWaiters",
    "TransactionAborted",
]
