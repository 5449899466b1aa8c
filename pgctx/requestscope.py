"""``with pool.scope():`` a lazy connection scope, e.g. one per web request.

The scope registers itself in the contextvar mapping under ``(id(pool),
SCOPE_MARK)``; the outermost with-block of the pool inside it takes the
scope's connection for its key (checking one out on first use) instead of
checking out its own, and gives it back to the scope at its end. The scope's
exit puts every connection it still holds back into the pool.
"""

from __future__ import annotations

import threading
from types import TracebackType
from typing import Any

from pgctx.errors import ScopeError
from pgctx.finalizers import defer, in_collector
from pgctx.registry import get_mapping, restore_mapping, set_mapping
from pgctx.transaction import add_note, roll_back_for_return

__all__ = ["SCOPE_MARK", "RequestScope"]

SCOPE_MARK = ("pgctx", "request-scope")  # mapping key marker for pool.scope() holders


class _Slot:
    __slots__ = ("busy", "conn", "holder", "key")

    def __init__(self, holder: RequestScope, key: Any) -> None:
        self.holder = holder
        self.key = key
        self.conn: Any = None
        self.busy = True


class RequestScope:
    """``with pool.scope():`` a lazy connection scope, e.g. one per web request.

    Nothing is checked out on entry. The first outermost block for a key inside
    it checks a connection out and keeps it for the later blocks of the scope
    (each block is still its own unit of work); the scope's exit puts every
    such connection away. A block that finds the scope's connection busy
    (a concurrent child task) gets its own checkout instead of sharing it.
    """

    __slots__ = ("_active", "_joined", "_lock", "_new", "_pool", "_prev", "_slots", "_state")

    def __init__(self, pool: Any) -> None:
        self._pool = pool
        self._slots: dict[Any, _Slot] = {}
        self._lock = threading.Lock()
        self._active = False
        self._joined = False
        self._state = 0
        self._new: Any = None

    def __repr__(self) -> str:
        return f"<RequestScope pool={self._pool!r} active={self._active}>"

    def __enter__(self) -> RequestScope:
        if self._state:
            raise ScopeError("a pool.scope() can be entered only once; call pool.scope() again")
        self._state = 1
        mapping = get_mapping()
        key = (id(self._pool), SCOPE_MARK)
        outer = mapping.get(key)
        if outer is not None and outer._active and outer._pool is self._pool:
            self._joined = True  # nested scope: the outer one keeps the connections
            return self
        self._active = True
        self._prev = mapping
        self._new = {**mapping, key: self}
        set_mapping(self._new)
        return self

    async def __aenter__(self) -> RequestScope:
        return self.__enter__()

    async def __aexit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.__exit__(et, ev, tb)

    def _reserve(self, key: Any) -> _Slot | None:
        """This scope's slot for ``key``, marked busy; None if busy or the scope ended.

        A new slot has no connection yet: the caller checks one out into it.
        """
        with self._lock:
            if not self._active:
                return None
            slot = self._slots.get(key)
            if slot is None:
                slot = self._slots[key] = _Slot(self, key)
            elif slot.busy:
                return None
            slot.busy = True
            return slot

    def _unreserve(self, slot: _Slot) -> None:
        """Forget a new slot whose checkout failed."""
        with self._lock:
            if self._slots.get(slot.key) is slot:
                del self._slots[slot.key]

    def _give_back(self, slot: _Slot, conn: Any, discard: bool) -> None:
        with self._lock:
            ours = self._slots.get(slot.key) is slot
            if ours and self._active and not discard:
                slot.busy = False
                return
            if ours:
                del self._slots[slot.key]
        self._pool.putconn(conn, close=discard)

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        if in_collector():  # a finalizer inside the garbage collector: see pgctx.finalizers
            defer(self.__exit__, et, ev, tb)
            return
        if self._state != 1:
            raise ScopeError("pool.scope() exited without being entered")
        self._state = 2
        if self._joined:
            return
        restore_mapping(self._prev, self._new)
        with self._lock:
            self._active = False
            idle = [slot.conn for slot in self._slots.values() if not slot.busy]
            self._slots.clear()  # busy slots are returned by their block when it ends
        problem: BaseException | None = None
        for conn in idle:
            try:
                discard, error = roll_back_for_return(conn, None)
                self._pool.putconn(conn, close=discard)
            except BaseException as release_error:
                error = release_error
            problem = problem or error
        if problem is not None:
            if ev is None or not isinstance(problem, Exception):
                raise problem
            add_note(ev, problem)
