"""``@with_connection``: run a callable's body inside ``pool.connection()``.

The wrapper is chosen by the callable's kind, found at decoration time (through
``__func__`` for classmethods and staticmethods), because one sync wrapper
around an ``async def`` or a generator would open and close the block before
the body runs:

- functions and methods: the call runs inside the block;
- ``async def``: the block opens when the coroutine starts and closes when it
  finishes;
- generators and async generators: the block opens at the first ``next()``
  and closes at exhaustion, ``close()`` or garbage collection; the connection
  is bound only while the generator's body runs, so its consumer never sees it.

Built with wrapt, so ``inspect.signature`` and the kind tests report the
original function. Place it above ``@classmethod``/``@staticmethod``.
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncGenerator, Callable, Generator
from typing import Any, TypeVar, overload

import wrapt

from pgctx.registry import check_pool, get_mapping, resolve_pool, set_mapping
from pgctx.scope import ConnectionScope

__all__ = ["with_connection"]

F = TypeVar("F", bound=Callable[..., Any])

_CONN = "conn"
_KEYWORD = "keyword"


def _conn_position(func: Any) -> tuple[bool, int | None]:
    """Whether ``func`` declares ``conn``, and its positional index (None if keyword-only)."""
    try:
        params = list(inspect.signature(func).parameters.values())
    except (TypeError, ValueError):
        return False, None
    for index, param in enumerate(params):
        if param.name == _CONN:
            if param.kind is param.POSITIONAL_ONLY:
                raise TypeError(
                    f"{func!r} declares `conn` as positional-only, so @with_connection cannot "
                    "pass it by keyword; make it a normal or keyword-only parameter"
                )
            if param.kind is param.KEYWORD_ONLY:
                return True, None
            if param.kind is param.POSITIONAL_OR_KEYWORD:
                return True, index
    return False, None


def _kind(target: Any) -> str:
    if inspect.isasyncgenfunction(target):
        return "asyncgen"
    if inspect.iscoroutinefunction(target):
        return "coroutine"
    if inspect.isgeneratorfunction(target):
        return "generator"
    return "function"


def _call(wrapped: Any, args: Any, kwargs: Any, conn: Any, where: Any) -> Any:
    """Call ``wrapped`` with ``conn`` put where the caller left `conn` unset."""
    if where is None:
        return wrapped(*args, **kwargs)
    if where is _KEYWORD:
        kwargs[_CONN] = conn
        return wrapped(*args, **kwargs)
    return wrapped(*args[:where], conn, *args[where + 1 :], **kwargs)


def _step(slot_key: Any, handle: Any, fn: Callable[..., Any], *args: Any) -> Any:
    """Run one step of a generator with its connection bound in this context."""
    previous = get_mapping()
    set_mapping({**previous, slot_key: handle})
    try:
        return fn(*args)
    finally:
        set_mapping(previous)


def _run_generator(
    scope: ConnectionScope, wrapped: Any, args: Any, kwargs: Any, where: Any
) -> Generator[Any, Any, Any]:
    with scope as conn:
        slot_key, handle = scope._detach()
        gen = _call(wrapped, args, kwargs, conn, where)
        value: Any = None
        thrown: BaseException | None = None
        while True:
            try:
                if thrown is None:
                    item = _step(slot_key, handle, gen.send, value)
                else:
                    item = _step(slot_key, handle, gen.throw, thrown)
            except StopIteration as stop:
                return stop.value
            thrown = None
            try:
                value = yield item
            except GeneratorExit:
                _step(slot_key, handle, gen.close)
                raise
            except BaseException as exc:
                thrown = exc


async def _astep(slot_key: Any, handle: Any, awaitable_fn: Callable[..., Any], *args: Any) -> Any:
    previous = get_mapping()
    set_mapping({**previous, slot_key: handle})
    try:
        return await awaitable_fn(*args)
    finally:
        set_mapping(previous)


async def _run_async_generator(
    scope: ConnectionScope, wrapped: Any, args: Any, kwargs: Any, where: Any
) -> AsyncGenerator[Any, Any]:
    async with scope as conn:
        slot_key, handle = scope._detach()
        agen = _call(wrapped, args, kwargs, conn, where)
        value: Any = None
        thrown: BaseException | None = None
        while True:
            try:
                if thrown is None:
                    item = await _astep(slot_key, handle, agen.asend, value)
                else:
                    item = await _astep(slot_key, handle, agen.athrow, thrown)
            except StopAsyncIteration:
                return
            thrown = None
            try:
                value = yield item
            except GeneratorExit:
                await _astep(slot_key, handle, agen.aclose)
                raise
            except BaseException as exc:
                thrown = exc


async def _run_coroutine(
    scope: ConnectionScope, wrapped: Any, args: Any, kwargs: Any, where: Any
) -> Any:
    async with scope as conn:
        return await _call(wrapped, args, kwargs, conn, where)


def _run_function(scope: ConnectionScope, wrapped: Any, args: Any, kwargs: Any, where: Any) -> Any:
    with scope as conn:
        return _call(wrapped, args, kwargs, conn, where)


_RUNNERS: dict[str, Callable[..., Any]] = {
    "function": _run_function,
    "coroutine": _run_coroutine,
    "generator": _run_generator,
    "asyncgen": _run_async_generator,
}


def _decorate(target: Any, pool: Any, key: Any, close_on_error: bool, separate: bool) -> Any:
    if inspect.isclass(target):
        raise TypeError("@with_connection decorates functions and methods, not classes")
    func = target.__func__ if isinstance(target, (classmethod, staticmethod)) else target
    if not callable(func):
        raise TypeError(f"@with_connection needs a callable, got {type(target).__name__}")
    runner = _RUNNERS[_kind(func)]
    declares, position = _conn_position(func)

    @wrapt.decorator
    def wrapper(wrapped: Any, instance: Any, args: Any, kwargs: Any) -> Any:
        where: Any = None
        if declares:
            # A caller that passes a connection is respected: no block is opened.
            if kwargs.get(_CONN) is not None:
                return wrapped(*args, **kwargs)
            where = _KEYWORD
            if position is not None:
                index = position - (instance is not None)  # wrapt drops self/cls from args
                if index < len(args):
                    if args[index] is not None:
                        return wrapped(*args, **kwargs)
                    where = index
        scope = ConnectionScope(
            pool if pool is not None else resolve_pool(None), key, close_on_error, separate
        )
        if runner is _run_function:  # the hot path, inlined: one block around the call
            with scope as conn:
                if where is None:
                    return wrapped(*args, **kwargs)
                if where is _KEYWORD:
                    kwargs[_CONN] = conn
                    return wrapped(*args, **kwargs)
                return _call(wrapped, args, kwargs, conn, where)
        return runner(scope, wrapped, args, kwargs, where)

    return wrapper(target)


@overload
def with_connection(pool: F, /) -> F: ...


@overload
def with_connection(
    pool: Any = None,
    /,
    *,
    key: Any = None,
    close_on_error: bool = False,
    separate: bool = False,
) -> Callable[[F], F]: ...


def with_connection(
    pool: Any = None,
    /,
    *,
    key: Any = None,
    close_on_error: bool = False,
    separate: bool = False,
) -> Any:
    """Decorate a callable so its body runs inside ``pool.connection(key)``.

    Use bare (``@with_connection``, default pool) or with arguments
    (``@with_connection(pool, key="replica")``). The pool is looked up at call
    time when omitted, so decorating before ``set_default_pool()`` is fine. A
    function that declares a ``conn`` parameter receives the connection,
    unless its caller passes one. Nested decorated calls share the connection.
    """
    if inspect.isclass(pool):
        raise TypeError("@with_connection decorates functions and methods, not classes")
    if pool is not None and not hasattr(pool, "getconn"):
        if isinstance(pool, (classmethod, staticmethod)) or callable(pool):
            return _decorate(pool, None, key, close_on_error, separate)
        check_pool(pool)
    elif pool is not None:
        check_pool(pool)

    def decorator(target: F) -> F:
        return _decorate(target, pool, key, close_on_error, separate)  # type: ignore[no-any-return]

    return decorator
