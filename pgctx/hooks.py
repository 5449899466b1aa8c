"""psycopg2's pool hooks: which ones a subclass overrides, and going through them.

psycopg2's ``ThreadedConnectionPool.getconn/putconn/closeall`` take the lock and
call ``self._getconn/_putconn/_closeall``; ``__init__`` and ``_getconn`` call
``self._connect``, and ``_getconn`` calls ``self._getkey`` for automatic keys.
Subclasses written for psycopg2 override them. pgctx's pools do not go through
these methods (that is part of why they are fast), so at class creation
``install_routes`` gives a class that overrides one of them methods that call
the overrides where psycopg2 would; a class without overrides is left alone and
pays nothing.

The pool's methods that the routing replaces are named in each pool class's
``_HOOK_ROUTES``: hook -> (method, replacement). ``getconn`` is routed through
``_checkout``, which every ``getconn`` already calls, so a subclass's own
``getconn`` that calls ``super().getconn()`` reaches the override too.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from types import TracebackType
from typing import Any, TypeVar

from pgctx.waiting import Connection

HOOKS = ("_connect", "_getkey", "_getconn", "_putconn", "_closeall")

_F = TypeVar("_F", bound=Callable[..., Any])
_ROUTES: set[Callable[..., Any]] = set()  # the replacements install_routes may put on a class
_NOT_FOUND: Any = object()


def route(func: _F) -> _F:
    """Mark ``func`` as a method that ``install_routes`` installs (and may take back)."""
    _ROUTES.add(func)
    return func


class released:  # lower case: used like a function, ``with released(lock):``
    """Let go of ``lock`` for the block if this thread holds it, as ``Condition.wait`` does.

    psycopg2-style code calls ``_getconn`` with the pool's lock held; waiting there
    for a connection while holding it would wait for one that can never come back.
    """

    __slots__ = ("_lock", "_state")

    def __init__(self, lock: Any) -> None:
        self._lock = lock
        self._state: Any = None

    def __enter__(self) -> None:
        is_owned = getattr(self._lock, "_is_owned", None)  # RLocks (also gevent's) have it
        if is_owned is not None and is_owned():
            self._state = self._lock._release_save()  # every level of a reentrant hold

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._state is not None:
            self._lock._acquire_restore(self._state)  # not interruptible: always back


# -- class creation ---------------------------------------------------------------------


def install_routes(cls: Any, base: type) -> None:
    """Route ``cls``'s methods through the hooks it overrides (from ``__init_subclass__``).

    ``base`` is the class holding pgctx's own implementations of the hooks.
    """
    overridden = frozenset(name for name in HOOKS if getattr(cls, name) is not getattr(base, name))
    cls._overridden_hooks = overridden
    wanted: dict[str, tuple[str, Callable[..., Any]] | None] = {}
    for hook, (method, replacement) in cls._HOOK_ROUTES.items():
        wanted.setdefault(method, None)
        if hook in overridden:
            wanted[method] = (hook, replacement)
    if "_getkey" in overridden and wanted.get("_checkout") is None:
        wanted["_checkout"] = ("_getkey", cls._GETKEY_ROUTE)
    for method in ("_checkout", "putconn", "closeall"):
        _install(cls, method, wanted.get(method))


def _install(cls: Any, method: str, wanted: tuple[str, Callable[..., Any]] | None) -> None:
    resolved = getattr(cls, method)
    if wanted is None:
        if resolved in _ROUTES:  # inherited from a class that overrides a hook (a mixin)
            setattr(cls, method, _plain(cls, method))
        return
    hook, replacement = wanted
    if resolved in _ROUTES or _owner(cls, method).__module__.startswith("pgctx."):
        setattr(cls, method, replacement)
        return
    # The class (or a class of the user's between it and pgctx) has its own method,
    # which stays. If it calls the hook itself (as gevent's pool recipe does), fine;
    # if it reaches pgctx's method through super(), the override is never called.
    code = getattr(resolved, "__code__", None)
    if code is not None and hook not in code.co_names:
        owner = _owner(cls, method)
        warnings.warn(
            f"{cls.__qualname__} overrides {hook}(), but {owner.__qualname__}.{method}() "
            f"does not call self.{hook}(): pgctx's own {method}() never goes through "
            f"{hook}(), so the override is skipped when {method}() calls it through "
            f"super(). Call self.{hook}(...) with self._lock held in {method}() instead, "
            "as psycopg2's ThreadedConnectionPool does.",
            RuntimeWarning,
            stacklevel=4,
        )


def _owner(cls: type, method: str) -> type:
    return next(klass for klass in cls.__mro__ if method in vars(klass))


def _plain(cls: type, method: str) -> Any:
    """The nearest implementation of ``method`` in the MRO that is not a route."""
    return next(
        vars(klass)[method]
        for klass in cls.__mro__
        if method in vars(klass) and vars(klass)[method] not in _ROUTES
    )


# -- opening through an overridden _connect ----------------------------------------------


def open_through_connect(pool: Any, key: Any) -> Connection:
    """Open a connection with the class's own ``_connect``, called as psycopg2 calls it.

    psycopg2 calls ``_connect()`` (constructor) or ``_connect(key)`` (``_getconn``)
    with the pool's lock held, and the method registers the connection itself: in
    ``_used``/``_rused`` under the key, or in ``_pool``. pgctx takes it back out
    at once and registers it as it does any connection it opens, so that reserved
    slots and waiters stay consistent. A connection the override opened without
    ``super()._connect()`` is configured and counted here.
    """
    stats = pool._stats
    started = time.monotonic()
    with pool._lock:  # the override may touch _pool/_used, and psycopg2 holds it there
        opened, failed = stats.connections_num, stats.connections_errors
        before = _NOT_FOUND if key is None else pool._used.get(key, _NOT_FOUND)
        try:
            conn: Connection = pool._connect() if key is None else pool._connect(key)
        except BaseException:
            if stats.connections_errors == failed:
                stats.connections_errors += 1
            raise
        if conn is None:
            stats.connections_errors += 1
            raise TypeError(
                f"{type(pool).__qualname__}._connect() returned None: it must return the "
                "connection it opened, as psycopg2's _connect() does"
            )
        _take_back(pool, conn, key, before)
        if stats.connections_num == opened:  # not through pgctx's _connect: do its part
            if pool._life is not None:
                try:
                    pool._life.opened(conn)
                except BaseException:
                    stats.connections_errors += 1
                    pool._close(conn)
                    raise
            stats.connections_num += 1
            stats.connections_ms += (time.monotonic() - started) * 1000
    return conn


def _take_back(pool: Any, conn: Connection, key: Any, before: Any) -> None:
    """Undo the registering psycopg2's ``_connect`` does (``before``: what ``key`` held)."""
    if key is not None and pool._used.get(key) is conn:
        if before is _NOT_FOUND:  # (a concurrent caller with the same key may have one)
            del pool._used[key]
        else:
            pool._used[key] = before
    if pool._rused.get(id(conn), _NOT_FOUND) is not _NOT_FOUND:
        del pool._rused[id(conn)]
    idle = pool._pool
    for i in range(len(idle) - 1, -1, -1):
        if idle[i] is conn:
            del idle[i]
            break


__all__ = ["HOOKS", "install_routes", "open_through_connect", "released", "route"]
