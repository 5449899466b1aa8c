"""The with-block: ``with pool.connection(key) as conn:`` and ``with pool.scope():``.

The outermost block for a pool and key checks a connection out and binds it;
nested blocks (in the same thread or task, or after a strict hand-off) join it.
When the last block leaves, the unit of work ends:

- clean exit: commit (nothing in autocommit); but if an error escaped a joined
  block, or the transaction is in error, roll back and raise
  ``TransactionAborted`` rather than let ``commit()`` silently roll back;
- exception: roll back (only if a transaction is open) and return the connection;
- broken connection, disconnect error, failed rollback, or ``close_on_error``:
  close it instead of returning it.

The connection is always put away before any error from commit or rollback is
raised, and such errors never replace the body's exception (they are attached
to it as a note). This module is the hot path: small classes with __slots__.
"""

from __future__ import annotations

import threading  # get_ident looked up per call: gevent may patch it after import
from asyncio import current_task as _current_task
from asyncio.events import _get_running_loop
from collections.abc import Mapping
from sys import _getframe
from types import FrameType, TracebackType
from typing import Any

from pgctx._driver import extensions
from pgctx.asyncwait import getconn_async
from pgctx.errors import ScopeError, TransactionAborted
from pgctx.finalizers import COLLECTING, defer
from pgctx.registry import (
    _GENERATOR_FLAGS,
    GENERATOR_MARK,
    Binding,
    Handle,
    Owner,
    current_owner,
    generator_frame,
    get_mapping,
    hashable_key,
    resolve,
    set_mapping,
    unexpired,
)
from pgctx.registry import _bindings as _bindings
from pgctx.requestscope import SCOPE_MARK, RequestScope, _Slot
from pgctx.transaction import add_note, end_transaction, warn_ended_by_joined_block

__all__ = ["ConnectionScope", "ConnectionScopesMixin"]

_OPENER, _JOINED, _HANDOFF = 0, 1, 2
_OPEN = object()  # _join() found nothing to join: check a connection out
_EMPTY: dict[Any, Any] = {}  # the mapping of a context with nothing bound (never mutated)
_IDLE = extensions.TRANSACTION_STATUS_IDLE
_INTRANS = extensions.TRANSACTION_STATUS_INTRANS

# id(conn) -> the block that opened it, for every connection a block holds: a pool
# that hands out a connection some block still holds (a PersistentConnectionPool used
# with two keys) is refused instead of silently sharing one transaction; and a joined
# block that commits the opener's work names where the opener is.
_live: dict[int, ConnectionScope] = {}


class ConnectionScope:
    """``with pool.connection(key) as conn:``; fresh per use, entered once."""

    __slots__ = (
        "_binding",
        "_close_on_error",
        "_frame",
        "_handle",
        "_intrans",
        "_key",
        "_new",
        "_owner",
        "_pool",
        "_prev",
        "_reported",
        "_role",
        "_separate",
        "_site",
        "_site_code",
        "_slot",
        "_state",
    )

    _owner: Owner
    _prev: Mapping[Any, Any]
    _site: int | None  # id() of the opener's frame: no frame kept alive by a block

    def __init__(
        self, pool: Any, key: Any = None, close_on_error: bool = False, separate: bool = False
    ) -> None:
        self._pool = pool
        self._key = key
        self._close_on_error = close_on_error
        self._separate = separate
        self._state = 0
        self._new: Any = None
        self._handle: Handle | None = None
        self._slot: _Slot | None = None

    def __repr__(self) -> str:
        return f"<ConnectionScope pool={self._pool!r} key={self._key!r}>"

    def __enter__(self) -> Any:
        # The hot path: with nothing bound in this context yet (the common case)
        # there is nothing to join and no request scope to use.
        if not self._state and not _bindings.get():
            frame = _getframe(1)
            self._frame = id(frame) if frame.f_code.co_flags & _GENERATOR_FLAGS else None
            self._site = id(frame)  # the opener's place, named if a joined block commits
            self._site_code = frame.f_code
            self._prev = _EMPTY
            loop = _get_running_loop()
            self._owner = (threading.get_ident(), None if loop is None else _current_task(loop))
            try:
                hash(self._key)
            except TypeError:
                hashable_key(self._pool, self._key)  # raises a clear error
            return self._open(self._pool.getconn())
        conn = self._join(generator_frame(1))
        if conn is _OPEN:
            conn = self._open(self._checkout())
        return conn

    async def __aenter__(self) -> Any:
        """Like ``__enter__``, but waits for a free connection off the event loop.

        A blocking wait on the loop would deadlock: the connections it waits for
        are held by tasks of the same loop.
        """
        conn = self._join(generator_frame(1))
        if conn is _OPEN:
            conn = self._open(await self._checkout_async())
        return conn

    async def __aexit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.__exit__(et, ev, tb)

    def _join(self, frame: FrameType | None) -> Any:
        """Join the connection bound in this context, or return _OPEN."""
        if self._state:
            raise ScopeError(
                "a pool.connection() block can be entered only once; "
                "call pool.connection() again for another block"
            )
        pool = self._pool
        mapping = get_mapping()
        slot_key = (id(pool), self._key)
        try:
            raw = mapping.get(slot_key)  # hashes the key even when the mapping is empty
        except TypeError:
            hashable_key(pool, self._key)  # raises a clear error
            raise
        me = current_owner(mapping)
        self._owner = me
        self._prev = mapping
        self._frame = None
        if frame is not None:
            gen = mapping.get(GENERATOR_MARK)
            if gen is None or id(frame) != gen.frame:  # else a decorated generator's body,
                self._frame = id(frame)  # whose context is its own
        if raw is not None and not self._separate:
            handle = resolve(raw, pool)
            if handle is not None:
                binding = handle.binding
                joined = False
                with binding.lock:
                    if not binding.released:
                        binding.check_user(handle, me, join=True)
                        joined = True
                if joined:
                    self._binding = binding
                    self._state = 1
                    # Open before the join and idle at its clean exit: someone committed.
                    self._intrans = binding.conn.get_transaction_status() == _INTRANS
                    if handle.owner == me:
                        self._role = _JOINED
                    else:  # a hand-off: this context now shows the new owner
                        self._role = _HANDOFF
                        self._bind(slot_key, raw)
                    return binding.conn
        site = frame if frame is not None else _getframe(2)
        self._site = id(site)  # the opener's place (an id: no frame kept alive by a block)
        self._site_code = site.f_code
        return _OPEN

    def _holder(self) -> RequestScope | None:
        if self._separate or not self._prev:
            return None
        holder: RequestScope | None = self._prev.get((id(self._pool), SCOPE_MARK))
        return holder if holder is not None and holder._active else None

    def _checkout(self) -> Any:
        holder = self._holder()
        if holder is not None:
            slot = holder._reserve(self._key)
            if slot is not None:
                if slot.conn is None:
                    try:
                        slot.conn = self._pool.getconn()
                    except BaseException:
                        holder._unreserve(slot)
                        raise
                self._slot = slot
                return slot.conn
        return self._pool.getconn()

    async def _checkout_async(self) -> Any:
        holder = self._holder()
        slot = None if holder is None else holder._reserve(self._key)
        if slot is not None and slot.conn is not None:
            self._slot = slot
            return slot.conn
        try:
            conn = await getconn_async(self._pool)
        except BaseException:
            if holder is not None and slot is not None:
                holder._unreserve(slot)
            raise
        if slot is not None:
            slot.conn = conn
            self._slot = slot
        return conn

    def _open(self, conn: Any) -> Any:
        opener = _live.get(id(conn))
        if opener is not None and opener._binding.conn is conn and not opener._binding.released:
            if self._slot is not None:
                self._slot.holder._give_back(self._slot, conn, False)
            raise ScopeError(
                f"pool {self._pool!r} handed out a connection that another block still holds "
                "(a PersistentConnectionPool has one connection per thread: use one key and "
                "no separate=True with it); the block was not entered"
            )
        binding = Binding(self._pool, self._key, conn, self._owner, self._close_on_error)
        _live[id(conn)] = self
        self._binding = binding
        self._role = _OPENER
        self._state = 1
        slot_key = (id(self._pool), self._key)
        prev = self._prev
        parent = unexpired(prev.get(slot_key)) if prev else None
        handle = Handle(binding, self._owner, parent, self._frame)
        self._handle = handle
        self._new = {**prev, slot_key: handle} if prev else {slot_key: handle}
        _bindings.set(self._new)
        return conn

    def _bind(self, slot_key: Any, raw: Any) -> None:
        handle = Handle(self._binding, self._owner, raw, self._frame)
        self._handle = handle
        self._new = {**self._prev, slot_key: handle}
        set_mapping(self._new)

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        if COLLECTING[0] and COLLECTING[0] == threading.get_ident():
            # a finalizer inside the garbage collector: never touch the interrupted
            # context or wait for a lock this thread may hold (see pgctx.finalizers)
            defer(self.__exit__, et, ev, tb)
            return
        if self._state != 1:
            raise ScopeError("pool.connection() block exited without being entered")
        self._state = 2
        binding = self._binding
        if self._new is not None:
            if _bindings.get() is self._new:  # else it ended in another context: leave it
                _bindings.set(self._prev)
            self._new = None
        if self._handle is not None:
            self._handle.active = False
        if binding.released:  # only a forked child's inherited block (see registry)
            return
        opener = self._role == _OPENER
        with binding.lock:
            owners = binding.owners
            if len(owners) == 1 and owners[0][1] == 1 and owners[0][0] == self._owner:
                owners.clear()  # the opener leaving alone: what leave() would do, faster
                binding.blocks -= 1
            else:
                binding.leave(self._owner)
            if opener:
                finish = not binding.blocks
                if not finish:
                    binding.orphaned = True
                    binding.abort(ev)
            else:
                if et is not None and not issubclass(et, GeneratorExit):
                    binding.abort(ev)
                finish = binding.orphaned and not binding.blocks
            if finish:
                binding.released = True
                owners.clear()  # claims left by children hold frames: drop them now
        if finish:
            self._finish(binding, ev if et is not None else None)
        elif not opener and et is None and self._intrans:
            conn = binding.conn
            if not conn.closed and conn.get_transaction_status() == _IDLE:
                warn_ended_by_joined_block(_live.get(id(conn)), _getframe(1))
        elif opener and et is None:
            raise TransactionAborted(
                "this block ended while another thread or task (or a suspended generator) "
                "was still inside a block that joined it, so nothing was committed: the "
                "transaction is rolled back and the connection returned when that block ends"
            )

    def _finish(self, binding: Binding, exc: BaseException | None) -> None:
        conn = binding.conn
        # Still held here, so the entry is this binding's (a second holder is refused);
        # once given back, the connection may be another block's.
        _live.pop(id(conn), None)
        discard, problem = end_transaction(
            conn, exc, binding.aborted, binding.abort_cause, binding.close_on_error
        )
        try:
            if self._slot is not None:
                self._slot.holder._give_back(self._slot, conn, discard)
            else:
                binding.pool.putconn(conn, close=discard)
        except BaseException as release_error:
            problem = problem or release_error
        if problem is not None:
            if exc is None or not isinstance(problem, Exception):
                raise problem
            add_note(exc, problem)


class ConnectionScopesMixin:
    """Adds ``connection()`` and ``scope()`` to a pool class (put it first in the bases)."""

    def connection(
        self, key: Any = None, *, close_on_error: bool = False, separate: bool = False
    ) -> ConnectionScope:
        """A with-block that checks out (or joins) this pool's connection for ``key``.

        ``key`` names a logical connection in this context (e.g. "replica"), not
        a psycopg2 pool key. ``separate=True`` always takes a new connection and
        transaction; ``close_on_error=True`` closes rather than returns it on
        any exception.
        """
        return ConnectionScope(self, key, close_on_error, separate)  # positional: hot path

    def scope(self) -> RequestScope:
        """A lazy connection scope: checked out on first use, put away at its end."""
        return RequestScope(self)
