"""The contextvar registry: which connection is "the current one" for a pool and key.

One module-level ``ContextVar`` holds an immutable mapping ``(id(pool), key) ->
Handle``. Every change builds a new dict and sets it; nothing is mutated in
place, because child tasks and ``asyncio.to_thread`` share the parent's objects
by reference.

A :class:`Binding` is one checked-out connection shared by the blocks that
joined it; a :class:`Handle` is what one context sees of it. The rules:

- a binding whose opening block has ended is *released* and never visible,
  even in contexts copied while it was open (tasks, executor threads);
- a handle created in a generator frame is visible only while that generator
  runs, so a suspended generator never lends its connection to its consumer
  (PEP 568, which would have done this, is deferred);
- each binding keeps a stack of owners (thread ident, asyncio task). A context
  may use the binding when its owner is on top; another owner may take over
  only from the handle of the owner on top (a strict hand-off such as
  ``await asyncio.to_thread(fn)``); anything else is concurrent use and raises
  :class:`~pgctx.errors.ConcurrentUseError`.
"""

from __future__ import annotations

import os
import sys
import threading
from asyncio import current_task as _current_task
from asyncio.events import _get_running_loop
from collections.abc import Mapping
from contextvars import ContextVar
from types import FrameType, MappingProxyType
from typing import Any, Protocol, runtime_checkable

from pgctx.errors import ConcurrentUseError, NoActiveConnection, NoDefaultPool

__all__ = [
    "Binding",
    "Handle",
    "NoDefaultPool",
    "PoolLike",
    "current_connection",
    "current_owner",
    "get_default_pool",
    "in_scope",
    "set_default_pool",
]

Owner = tuple[int, object]


@runtime_checkable
class PoolLike(Protocol):
    """What scopes need from a pool: psycopg2.pool's public checkout API."""

    closed: bool

    def getconn(self, *args: Any, **kwargs: Any) -> Any: ...

    def putconn(self, *args: Any, **kwargs: Any) -> Any: ...


_bindings: ContextVar[Mapping[Any, Any]] = ContextVar(
    "pgctx_bindings", default=MappingProxyType({})
)
_default_pool: Any = None

_GENERATOR_FLAGS = 0x20 | 0x200  # inspect.CO_GENERATOR | inspect.CO_ASYNC_GENERATOR


def current_owner() -> Owner:
    """(thread ident, running asyncio task or None): who is using a binding."""
    loop = _get_running_loop()
    return (threading.get_ident(), None if loop is None else _current_task(loop))


def describe_owner(owner: Owner) -> str:
    ident, task = owner
    if task is None:
        return f"thread {ident}"
    name = task.get_name() if hasattr(task, "get_name") else repr(task)
    return f"task {name!r} in thread {ident}"


class Binding:
    """One checked-out connection and the blocks currently inside it."""

    # One lock for all bindings: it guards a few field updates, is never held
    # while taking another lock, and sparing a Lock per block is measurable.
    lock = threading.Lock()

    __slots__ = (
        "abort_cause",
        "aborted",
        "blocks",
        "close_on_error",
        "conn",
        "key",
        "orphaned",
        "owners",
        "pool",
        "released",
        "savepoints",
    )

    def __init__(self, pool: Any, key: Any, conn: Any, owner: Owner, close_on_error: bool) -> None:
        self.pool = pool
        self.key = key
        self.conn = conn
        self.owners: list[list[Any]] = [[owner, 1]]  # [owner, number of blocks], top last
        self.blocks = 1
        self.close_on_error = close_on_error
        self.aborted = False  # an error escaped a joined block: the unit must not commit
        self.abort_cause: BaseException | None = None
        self.orphaned = False  # the opening block ended while others were still inside
        self.released = False
        self.savepoints = 0

    def abort(self, cause: BaseException | None) -> None:
        """Mark the unit of work failed (call under ``lock``)."""
        self.aborted = True
        if self.abort_cause is None:
            self.abort_cause = cause

    def check_user(self, handle: Handle, me: Owner, join: bool) -> None:
        """Apply the owner rules for ``me`` reaching this binding through ``handle``.

        Call under ``lock``. With ``join``, record ``me`` as a user (a block).
        """
        top = self.owners[-1]
        if top[0] == me:
            if join:
                top[1] += 1
        elif handle.owner == top[0]:
            if join:
                self.owners.append([me, 1])
        else:
            exc = ConcurrentUseError(
                f"the connection bound for pool {self.pool!r}, key {self.key!r} is in use by "
                f"{describe_owner(top[0])}, so {describe_owner(me)} cannot use it at the same "
                "time; two threads or tasks must not share one connection. Give concurrent "
                "work its own connection with pool.connection(separate=True) (or "
                "@with_connection(separate=True)), or open its own scope. The shared "
                "transaction was marked failed and will be rolled back."
            )
            self.abort(exc)
            raise exc
        if join:
            self.blocks += 1

    def leave(self, owner: Owner) -> None:
        """Remove one block of ``owner`` (call under ``lock``)."""
        owners = self.owners
        for i in range(len(owners) - 1, -1, -1):
            entry = owners[i]
            if entry[0] == owner:
                entry[1] -= 1
                if entry[1] == 0:
                    del owners[i]
                break
        self.blocks -= 1


def _new_binding_lock_in_child() -> None:
    # A thread of the parent may have held the lock at the fork; it does not exist here.
    Binding.lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_new_binding_lock_in_child)


class Handle:
    """A context's view of a binding: who put it there, what it shadows."""

    __slots__ = ("active", "binding", "frame", "owner", "parent")

    def __init__(
        self, binding: Binding, owner: Owner, parent: Any, frame: FrameType | None
    ) -> None:
        self.binding = binding
        self.owner = owner
        self.parent = parent  # the handle this one shadows in its context, or None
        self.frame = frame  # the generator frame that created it, or None
        self.active = True


def _frame_running(frame: FrameType) -> bool:
    f: FrameType | None = sys._getframe(1)
    while f is not None:
        if f is frame:
            return True
        f = f.f_back
    return False


def resolve(handle: Any, pool: Any) -> Handle | None:
    """The first live handle in ``handle``'s chain, or None."""
    while handle is not None:
        b = handle.binding
        if (
            handle.active
            and not b.released
            and b.pool is pool
            and (handle.frame is None or _frame_running(handle.frame))
        ):
            return handle  # type: ignore[no-any-return]
        handle = handle.parent
    return None


def generator_frame(depth: int) -> FrameType | None:
    """The caller's frame at ``depth`` if it is a generator's, else None."""
    frame = sys._getframe(depth + 1)
    return frame if frame.f_code.co_flags & _GENERATOR_FLAGS else None


def get_mapping() -> Mapping[Any, Any]:
    return _bindings.get()


def set_mapping(mapping: Mapping[Any, Any]) -> None:
    _bindings.set(mapping)


def restore_mapping(previous: Mapping[Any, Any], ours: Mapping[Any, Any] | None) -> None:
    """Put ``previous`` back if the current mapping is still ``ours``.

    A scope may end in another context (a generator finalised elsewhere, an
    async generator closed by the loop): then the current mapping belongs to
    someone else and is left alone; the released binding is invisible anyway.
    """
    if ours is not None and _bindings.get() is ours:
        _bindings.set(previous)


def hashable_key(pool: Any, key: Any) -> tuple[int, Any]:
    slot = (id(pool), key)
    try:
        hash(slot)
    except TypeError:
        raise TypeError(
            f"a connection key must be hashable (a str, int or tuple), got {type(key).__name__}"
        ) from None
    return slot


def set_default_pool(pool: Any) -> Any:
    """Make ``pool`` the one used when ``pool`` is omitted; return the previous one.

    ``set_default_pool(None)`` clears it. The default is process-wide (not per
    context), like a module-level ``pool = ...`` it replaces.
    """
    global _default_pool
    if pool is not None:
        check_pool(pool)
    previous, _default_pool = _default_pool, pool
    return previous


def get_default_pool() -> Any:
    """The pool set by :func:`set_default_pool`, or None."""
    return _default_pool


def check_pool(pool: Any) -> Any:
    if not isinstance(pool, PoolLike):
        raise TypeError(
            "pool must be a connection pool (an object with getconn() and putconn(), such as "
            f"pgctx.ThreadedConnectionPool), got {type(pool).__name__}"
        )
    return pool


def resolve_pool(pool: Any) -> Any:
    """``pool``, or the default pool; raise NoDefaultPool when there is none."""
    if pool is not None:
        return pool
    if _default_pool is None:
        raise NoDefaultPool(
            "no pool given and no default pool set: pass pool=..., or call "
            "pgctx.set_default_pool(pool) once at startup"
        )
    return _default_pool


def find(pool: Any, key: Any) -> Handle | None:
    """The live handle bound for (pool, key) in this context, or None."""
    handle = _bindings.get().get(hashable_key(pool, key))
    return None if handle is None else resolve(handle, pool)


def current_connection(pool: Any = None, key: Any = None) -> Any:
    """The connection of the innermost open block for ``pool`` and ``key``.

    Never checks a connection out. Raises :class:`NoActiveConnection` outside
    a block, and :class:`ConcurrentUseError` when another thread or task is
    using the bound connection right now.
    """
    pool = resolve_pool(pool)
    handle = find(pool, key)
    if handle is None:
        raise NoActiveConnection(
            f"no connection is bound for pool {pool!r}, key {key!r} in this context: open one "
            "with `with pool.connection() as conn:` or decorate the function with "
            "@pgctx.with_connection (a binding is visible only inside its block, and in "
            "tasks and threads started from it while it is open)"
        )
    binding = handle.binding
    with binding.lock:
        binding.check_user(handle, current_owner(), join=False)
    return binding.conn


def in_scope(pool: Any = None, key: Any = None) -> bool:
    """True when a connection is bound for ``pool`` and ``key`` in this context."""
    return find(resolve_pool(pool), key) is not None
