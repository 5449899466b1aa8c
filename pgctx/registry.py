"""The contextvar registry: which connection is "the current one" for a pool and key.

One module-level ``ContextVar`` holds an immutable mapping ``(id(pool), key) ->
Handle``. Every change builds a new dict and sets it; nothing is mutated in
place, because child tasks and ``asyncio.to_thread`` share the parent's objects
by reference.

A :class:`Binding` is one checked-out connection shared by the blocks that
joined it; a :class:`Handle` is what one context sees of it. The rules:

- a binding whose opening block has ended is *released* and never visible,
  even in contexts copied while it was open (tasks, executor threads);
- a handle created in a (plain) generator frame is visible only while that
  generator runs, so a suspended generator never lends its connection to its
  consumer (PEP 568, which would have done this, is deferred);
- each binding keeps a stack of owners (thread ident, asyncio task). The owner on
  top uses it freely. Any other user takes the contested path: entries of owners
  found *done* are dropped, then a user whose handle came from the owner on top
  (a child thread or task) *claims* the binding until it is done; anything else
  is concurrent use and raises :class:`~pgctx.errors.ConcurrentUseError`;
- inside a decorated generator's own context the owner is the generator (a
  :class:`GeneratorOwner`) while some thread or task steps it; a generator that
  is not being stepped, or whose stepper is the one asking, blocks nobody.
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
from pgctx.finalizers import in_collector

__all__ = [
    "Binding",
    "GeneratorOwner",
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
GENERATOR_MARK = ("pgctx", "generator")  # mapping key: the decorated generator owning a context

# Modules whose frames run other code's jobs (executor and event-loop plumbing). A thread's
# claim lasts as long as the frame just above them, the job's own, is on its stack.
_PLUMBING = (
    "threading",
    "concurrent.futures.",
    "asyncio.",
    "anyio.",
    "gevent.",
    "greenlet",
    "eventlet.",
    "trio.",
    "queue",
)


class GeneratorOwner:
    """The owner a decorated generator's body acts as while a thread or task steps it.

    ``stepper`` is the (thread, task) stepping it right now, or None between
    steps; ``frame`` is the id of the body's frame, whose blocks stay visible to the tasks
    and threads the body starts; ``done`` is set when the generator has finished.
    """

    __slots__ = ("done", "frame", "name", "owner", "stepper")

    def __init__(self, name: str) -> None:
        self.name = name
        self.owner: Owner = (0, self)
        self.stepper: Owner | None = None
        self.frame: int | None = None  # an id: a frame holds its locals (3.10: the generator)
        self.done = False

    def __repr__(self) -> str:
        return f"<GeneratorOwner {self.name}>"


def current_owner(mapping: Mapping[Any, Any] | None = None) -> Owner:
    """Who is using a binding: (thread ident, running asyncio task or None), or a generator."""
    loop = _get_running_loop()
    me = (threading.get_ident(), None if loop is None else _current_task(loop))
    gen = (_bindings.get() if mapping is None else mapping).get(GENERATOR_MARK)
    if gen is not None and gen.stepper == me:
        return gen.owner  # type: ignore[no-any-return]
    return me


def stepper() -> Owner:
    """The (thread ident, running asyncio task or None) of the caller, ignoring generators."""
    loop = _get_running_loop()
    return (threading.get_ident(), None if loop is None else _current_task(loop))


def describe_owner(owner: Owner) -> str:
    ident, task = owner
    if task is None:
        return f"thread {ident}"
    if type(task) is GeneratorOwner:
        by = task.stepper
        return f"generator {task.name}" + ("" if by is None else f" ({describe_owner(by)})")
    name = task.get_name() if hasattr(task, "get_name") else repr(task)
    return f"task {name!r} in thread {ident}"


def _claim_marker(me: Owner) -> Any:
    """What tells later whether ``me`` is done: True for tasks and generators; for a
    thread, the frame just above the executor plumbing its job runs in (the job's own
    frame, popped before the job's future is resolved, so a waiting parent never sees
    the claim still held)."""
    if me[1] is not None:
        return True
    frame = sys._getframe(1)
    while True:
        back = frame.f_back
        if back is None or str(back.f_globals.get("__name__", "")).startswith(_PLUMBING):
            return frame
        frame = back


def _is_done(owner: Owner, marker: Any, frames: dict[int, FrameType]) -> bool:
    task = owner[1]
    if task is None:
        frame = frames.get(owner[0])
        while frame is not None:
            if frame is marker:
                return False
            frame = frame.f_back
        return True
    if type(task) is GeneratorOwner:
        return task.done
    done = getattr(task, "done", None)
    return bool(done()) if done is not None else False


class Binding:
    """One checked-out connection and the blocks currently inside it."""

    # One lock for all bindings: it guards a few field updates and is never held
    # while taking another lock; sparing a lock per block is measurable. Reentrant,
    # because a finalizer run by the garbage collector (a savepoint's exit) may take it
    # in a thread that was interrupted while holding it.
    lock = threading.RLock()

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
        # [owner, number of blocks, claim], top last; claim is None, or what tells whether
        # a child that claimed the binding is done (see _claim_marker)
        self.owners: list[list[Any]] = [[owner, 1, None]]
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
        owners = self.owners
        if owners and owners[-1][0] == me:  # the uncontested path
            if join:
                owners[-1][1] += 1
                self.blocks += 1
            return
        self._contested(handle, me, join)

    def _contested(self, handle: Handle, me: Owner, join: bool) -> None:
        owners = self.owners
        if any(e[2] is not None and not e[1] for e in owners):
            frames = sys._current_frames()
            owners[:] = [
                e for e in owners if e[1] or e[2] is None or not _is_done(e[0], e[2], frames)
            ]
        task = me[1]
        mine: Owner = me  # the thread or task running me (for a generator: its stepper)
        if type(task) is GeneratorOwner and task.stepper is not None:
            mine = task.stepper
        top = len(owners) - 1
        while top >= 0 and _waits_or_idle(owners[top][0], me, mine):
            top -= 1
        if top >= 0 and owners[top][0] == me:
            if join:
                if top == len(owners) - 1:
                    owners[top][1] += 1
                else:  # above generators that wait for me: a new entry, so they see me
                    owners.append([me, 1, owners[top][2]])
                self.blocks += 1
            return
        if top < 0 or handle.owner == owners[top][0]:  # a child of the owner on top
            owners.append([me, 1 if join else 0, _claim_marker(me)])
            if join:
                self.blocks += 1
            elif not in_collector():
                self._rebind(handle, me)
            return
        exc = ConcurrentUseError(
            f"the connection bound for pool {self.pool!r}, key {self.key!r} is in use by "
            f"{describe_owner(owners[top][0])}, so {describe_owner(me)} cannot use it at the "
            "same time; two threads or tasks must not share one connection. Give concurrent "
            "work its own connection with pool.connection(separate=True) (or "
            "@with_connection(separate=True)), or open its own scope. The shared "
            "transaction was marked failed and will be rolled back."
        )
        self.abort(exc)
        raise exc

    def _rebind(self, handle: Handle, me: Owner) -> None:
        """Show ``me`` as the owner in this context, so its own children may take over."""
        mapping = _bindings.get()
        slot = (id(self.pool), self.key)
        raw = mapping.get(slot)
        if raw is not None:
            _bindings.set({**mapping, slot: Handle(self, me, raw, handle.frame)})

    def leave(self, owner: Owner) -> None:
        """Remove one block of ``owner`` (call under ``lock``)."""
        owners = self.owners
        for i in range(len(owners) - 1, -1, -1):
            entry = owners[i]
            if entry[0] == owner and entry[1]:
                entry[1] -= 1
                if not entry[1] and entry[2] is None:
                    del owners[i]
                break
        self.blocks -= 1


def _waits_or_idle(owner: Owner, me: Owner, mine: Owner) -> bool:
    """Whether ``owner`` cannot be using the binding while ``me`` (stepped by ``mine``) runs:
    a generator nobody steps, or one stepped by my own thread or task (it waits for me),
    or the stepper of the generator I am (it waits for my step)."""
    if owner == me:
        return False
    task = owner[1]
    if type(task) is GeneratorOwner:
        by = task.stepper
        return by is None or by == mine
    return owner == mine and mine is not me


class Handle:
    """A context's view of a binding: who put it there, what it shadows."""

    __slots__ = ("active", "binding", "frame", "owner", "parent")

    def __init__(self, binding: Binding, owner: Owner, parent: Any, frame: int | None) -> None:
        self.binding = binding
        self.owner = owner
        self.parent = parent  # the handle this one shadows in its context, or None
        # the id of the generator frame that created it, or None. Not the frame: a
        # context holding it would keep an abandoned generator alive on 3.10 (the frame
        # holds its locals), and the id cannot be reused before the block has ended.
        self.frame = frame
        self.active = True


def _frame_running(frame: int) -> bool:
    f: FrameType | None = sys._getframe(1)
    while f is not None:
        if id(f) == frame:
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


def unexpired(handle: Any) -> Any:
    """``handle``'s chain without the handles in front whose block has ended.

    A block that ends in another context (an abandoned generator) cannot put the
    mapping back, so its dead handle stays where it was; dropping it when the next
    handle is stacked keeps chains from growing with every such block.
    """
    while handle is not None and (not handle.active or handle.binding.released):
        handle = handle.parent
    return handle


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
    mapping = _bindings.get()
    raw = mapping.get(hashable_key(pool, key))
    handle = None if raw is None else resolve(raw, pool)
    if handle is not None:
        binding = handle.binding
        me = current_owner(mapping)
        with binding.lock:
            if not binding.released:
                binding.check_user(handle, me, join=False)
                return binding.conn
    raise NoActiveConnection(
        f"no connection is bound for pool {pool!r}, key {key!r} in this context: open one "
        "with `with pool.connection() as conn:` or decorate the function with "
        "@pgctx.with_connection (a binding is visible only inside its block, and in "
        "tasks and threads started from it while it is open)"
    )


def in_scope(pool: Any = None, key: Any = None) -> bool:
    """True when a connection is bound for ``pool`` and ``key`` in this context."""
    return find(resolve_pool(pool), key) is not None


def _after_fork_in_child() -> None:
    Binding.lock = threading.RLock()  # another thread may have held it during the fork
    # The forking thread's context still shows the parent's blocks, whose connections
    # the child's pools have disowned: hide them, and mark them released so that the
    # inherited blocks' exits end nothing (the unit of work is the parent's).
    for value in _bindings.get().values():
        while isinstance(value, Handle):
            value.binding.released = True
            value = value.parent
    _bindings.set(MappingProxyType({}))


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
