"""``@with_connection``: run a callable's body inside ``pool.connection()``.

The wrapper is chosen by the callable's kind (:mod:`pgctx.callkinds`), found at
decoration time through ``__wrapped__``, ``functools.partial``, bound methods
and ``classmethod``/``staticmethod``, because one sync wrapper around an ``async
def`` or a generator would open and close the block before the body runs:

- functions and methods: the call runs inside the block;
- ``async def``: the block opens when the coroutine starts and closes when it
  finishes;
- generators and async generators: the block opens at the first ``next()``
  and closes at exhaustion, ``close()`` or garbage collection; the connection
  is bound only while the generator's body runs, so its consumer never sees it;
- ``@contextmanager``/``@asynccontextmanager`` functions: the call returns a
  context manager whose block opens at ``__enter__`` and ends at ``__exit__``;
  the inner context manager is entered inside the block and exited before it.

Built with wrapt, so ``inspect.signature`` and the kind tests report the
original function. Place it above ``@classmethod``/``@staticmethod``.
"""

from __future__ import annotations

import inspect
import sys
import types
from collections.abc import AsyncGenerator, Callable, Generator
from contextvars import Context, copy_context
from types import TracebackType
from typing import Any, TypeVar, overload

import wrapt

from pgctx.callkinds import (
    ASYNCCONTEXTMANAGER,
    ASYNCGEN,
    CONTEXTMANAGER,
    COROUTINE,
    DEFERRED,
    GENERATOR,
    kind_of,
    not_what_it_was_taken_for,
    own_kind,
    refuse_deferred,
)
from pgctx.errors import ScopeError
from pgctx.finalizers import defer, in_collector
from pgctx.registry import (
    _GENERATOR_FLAGS,
    GENERATOR_MARK,
    GeneratorOwner,
    check_pool,
    get_mapping,
    resolve_pool,
    set_mapping,
    stepper,
)
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


def _call(wrapped: Any, args: Any, kwargs: Any, conn: Any, where: Any) -> Any:
    """Call ``wrapped`` with ``conn`` put where the caller left `conn` unset."""
    if where is None:
        return wrapped(*args, **kwargs)
    if where is _KEYWORD:
        kwargs[_CONN] = conn
        return wrapped(*args, **kwargs)
    return wrapped(*args[:where], conn, *args[where + 1 :], **kwargs)


def _open(scope: ConnectionScope, owner: GeneratorOwner) -> Any:
    """Enter the generator's block in its own context, the generator as its owner.

    Called through ``Context.run`` from a plain function frame, so the binding is
    not tied to a generator frame: the tasks and threads the body starts see it.
    """
    set_mapping({**get_mapping(), GENERATOR_MARK: owner})
    return scope.__enter__()


async def _aopen(scope: ConnectionScope, owner: GeneratorOwner) -> Any:
    set_mapping({**get_mapping(), GENERATOR_MARK: owner})
    return await scope.__aenter__()


def _name(wrapped: Any) -> str:
    return str(getattr(wrapped, "__qualname__", None) or repr(wrapped))


def _close_later(ctx: Context, owner: GeneratorOwner, gen: Any, scope: ConnectionScope) -> None:
    """A generator finalized by the garbage collector, closed in the janitor thread."""
    owner.stepper = stepper()
    try:
        ctx.run(_close_and_exit, gen, scope)
    finally:
        owner.stepper = None
        owner.done = True


def _close_and_exit(gen: Any, scope: ConnectionScope) -> None:
    exit_error: BaseException = GeneratorExit()
    try:
        gen.close()
    except BaseException as exc:
        exit_error = exc
        raise
    finally:
        scope.__exit__(type(exit_error), exit_error, exit_error.__traceback__)


def _run_generator(
    scope: ConnectionScope, wrapped: Any, args: Any, kwargs: Any, where: Any
) -> Generator[Any, Any, Any]:
    """Drive the decorated generator, each step in its own context (copied at the first)."""
    owner = GeneratorOwner(_name(wrapped))
    ctx = copy_context()
    owner.stepper = stepper()
    try:
        conn = ctx.run(_open, scope, owner)
        try:
            gen = ctx.run(_call, wrapped, args, kwargs, conn, where)
        except BaseException as exc:
            ctx.run(scope.__exit__, type(exc), exc, exc.__traceback__)
            raise
    finally:
        owner.stepper = None
    frame = getattr(gen, "gi_frame", None)
    owner.frame = None if frame is None else id(frame)
    value: Any = None
    thrown: BaseException | None = None
    try:
        while True:
            owner.stepper = stepper()
            try:
                item = ctx.run(gen.send, value) if thrown is None else ctx.run(gen.throw, thrown)
            finally:
                owner.stepper = None
            thrown = None
            try:
                value = yield item
            except GeneratorExit:
                if in_collector():  # see pgctx.finalizers: not here, not now
                    defer(_close_later, ctx, owner, gen, scope)
                    raise
                owner.stepper = stepper()
                ctx.run(gen.close)
                raise
            except BaseException as exc:
                thrown = exc
    except StopIteration as stop:
        owner.stepper = stepper()
        try:
            ctx.run(scope.__exit__, None, None, None)
        finally:
            owner.stepper = None
            owner.done = True
        return stop.value
    except BaseException as exc:
        if not owner.done and not (isinstance(exc, GeneratorExit) and in_collector()):
            owner.stepper = stepper()
            try:
                ctx.run(scope.__exit__, type(exc), exc, exc.__traceback__)
            finally:
                owner.stepper = None
                owner.done = True
        raise


@types.coroutine
def _in_context(ctx: Context, awaitable: Any) -> Generator[Any, Any, Any]:
    """Await ``awaitable`` with each of its steps run in ``ctx``.

    The futures it yields go out to the event loop unchanged, so the loop sees the
    same awaits (and cancellations come back in the same way).
    """
    coro = awaitable.__await__() if not hasattr(awaitable, "send") else awaitable
    send: Any = coro.send
    arg: Any = None
    while True:
        try:
            future = ctx.run(send, arg)
        except StopIteration as stop:
            return stop.value
        try:
            arg = yield future
            send = coro.send
        except GeneratorExit:
            ctx.run(coro.close)
            raise
        except BaseException as exc:
            arg = exc
            send = coro.throw


async def _run_async_generator(
    scope: ConnectionScope, wrapped: Any, args: Any, kwargs: Any, where: Any
) -> AsyncGenerator[Any, Any]:
    """Drive the decorated async generator, each step in its own context."""
    owner = GeneratorOwner(_name(wrapped))
    ctx = copy_context()
    owner.stepper = stepper()
    try:
        conn = await _in_context(ctx, _aopen(scope, owner))
        try:
            agen = ctx.run(_call, wrapped, args, kwargs, conn, where)
        except BaseException as exc:
            ctx.run(scope.__exit__, type(exc), exc, exc.__traceback__)
            raise
    finally:
        owner.stepper = None
    frame = getattr(agen, "ag_frame", None)
    owner.frame = None if frame is None else id(frame)
    value: Any = None
    thrown: BaseException | None = None
    try:
        while True:
            owner.stepper = stepper()
            try:
                if thrown is None:
                    item = await _in_context(ctx, agen.asend(value))
                else:
                    item = await _in_context(ctx, agen.athrow(thrown))
            finally:
                owner.stepper = None
            thrown = None
            try:
                value = yield item
            except GeneratorExit:
                if in_collector():  # no loop to close it on: see pgctx.finalizers
                    defer(_aclose_later, ctx, owner, agen, scope)
                    raise
                owner.stepper = stepper()
                await _in_context(ctx, agen.aclose())
                raise
            except BaseException as exc:
                thrown = exc
    except StopAsyncIteration:
        owner.stepper = stepper()
        try:
            ctx.run(scope.__exit__, None, None, None)
        finally:
            owner.stepper = None
            owner.done = True
    except BaseException as exc:
        if not owner.done and not (isinstance(exc, GeneratorExit) and in_collector()):
            owner.stepper = stepper()
            try:
                ctx.run(scope.__exit__, type(exc), exc, exc.__traceback__)
            finally:
                owner.stepper = None
                owner.done = True
        raise


def _aclose_later(ctx: Context, owner: GeneratorOwner, agen: Any, scope: ConnectionScope) -> None:
    """An async generator finalized by the collector outside any event loop: close it
    here if it finishes without awaiting anything; the block is ended either way."""
    owner.stepper = stepper()
    closing = agen.aclose()
    exit_error: BaseException = GeneratorExit()
    try:
        ctx.run(closing.send, None)
    except StopIteration:
        pass
    except BaseException as exc:
        exit_error = exc
    else:
        ctx.run(closing.close)
        exit_error = RuntimeError("the async generator awaited while being closed outside a loop")
    finally:
        try:
            ctx.run(scope.__exit__, type(exit_error), exit_error, exit_error.__traceback__)
        finally:
            owner.stepper = None
            owner.done = True


_PRODUCES: dict[str, Callable[[Any], bool]] = {
    GENERATOR: inspect.isgenerator,
    ASYNCGEN: inspect.isasyncgen,
}


def _checked(wrapped: Any, kind: str, target: Any) -> Callable[..., Any]:
    """``wrapped``, checked to return the kind of object it was taken for."""

    def call(*args: Any, **kwargs: Any) -> Any:
        made = wrapped(*args, **kwargs)
        if not _PRODUCES[kind](made):
            raise not_what_it_was_taken_for(made, kind, target)
        return made

    return call


async def _run_coroutine(
    scope: ConnectionScope, wrapped: Any, args: Any, kwargs: Any, where: Any
) -> Any:
    async with scope as conn:
        awaitable = _call(wrapped, args, kwargs, conn, where)
        if not inspect.isawaitable(awaitable):  # a wrapper that hid a sync function
            raise not_what_it_was_taken_for(awaitable, COROUTINE, wrapped)
        result = await awaitable
        if result is not None and type(result) in DEFERRED:  # e.g. a forgotten await
            refuse_deferred(result, wrapped)
        return result


def _adopt(scope: ConnectionScope, caller: Any) -> None:
    """Bind the block as if ``caller`` had entered it: inside a generator, only while it runs."""
    scope._site = id(caller)  # the place a JoinedCommitWarning names, if this block opened
    scope._site_code = caller.f_code
    handle = scope._handle
    if handle is not None and caller.f_code.co_flags & _GENERATOR_FLAGS:
        gen = get_mapping().get(GENERATOR_MARK)
        if gen is None or id(caller) != gen.frame:  # a decorated generator's context is its own
            handle.frame = id(caller)


class _Block:
    """What a decorated ``@contextmanager``/``@asynccontextmanager`` function returns."""

    __slots__ = ("_args", "_exit", "_inner", "_kwargs", "_scope", "_state", "_where", "_wrapped")

    def __init__(
        self, scope: ConnectionScope, wrapped: Any, args: Any, kwargs: Any, where: Any
    ) -> None:
        self._scope = scope
        self._wrapped = wrapped
        self._args = args
        self._kwargs = kwargs
        self._where = where
        self._state = 0

    def _start(self) -> ConnectionScope:
        if self._state:
            raise ScopeError(
                "a context manager returned by a @with_connection function can be entered "
                "only once; call the function again for another block"
            )
        self._state = 1
        return self._scope

    def _inner_cm(self, conn: Any, enter: str, leave: str, kind: str) -> Any:
        inner = _call(self._wrapped, self._args, self._kwargs, conn, self._where)
        cls = type(inner)
        if not (hasattr(cls, enter) and hasattr(cls, leave)):
            raise not_what_it_was_taken_for(inner, kind, self._wrapped)
        self._inner = inner
        self._exit = getattr(cls, leave)
        return getattr(cls, enter)


class _BlockContextManager(_Block):
    __slots__ = ()

    def __enter__(self) -> Any:
        scope = self._start()
        conn = scope.__enter__()
        try:
            _adopt(scope, sys._getframe(1))
            enter = self._inner_cm(conn, "__enter__", "__exit__", CONTEXTMANAGER)
            value = enter(self._inner)
        except BaseException as exc:
            scope.__exit__(type(exc), exc, exc.__traceback__)
            raise
        self._state = 2
        return value

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> bool:
        if self._state != 2:
            raise ScopeError("context manager exited without being entered")
        self._state = 3
        scope = self._scope
        try:  # the inner context manager ends inside the block
            suppressed = self._exit(self._inner, et, ev, tb)
        except BaseException as exc:
            scope.__exit__(type(exc), exc, exc.__traceback__)
            raise
        if suppressed:
            scope.__exit__(None, None, None)
            return True
        scope.__exit__(et, ev, tb)
        return False


class _BlockAsyncContextManager(_Block):
    __slots__ = ()

    async def __aenter__(self) -> Any:
        scope = self._start()
        conn = await scope.__aenter__()
        try:
            _adopt(scope, sys._getframe(1))
            enter = self._inner_cm(conn, "__aenter__", "__aexit__", ASYNCCONTEXTMANAGER)
            value = await enter(self._inner)
        except BaseException as exc:
            await scope.__aexit__(type(exc), exc, exc.__traceback__)
            raise
        self._state = 2
        return value

    async def __aexit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> bool:
        if self._state != 2:
            raise ScopeError("async context manager exited without being entered")
        self._state = 3
        scope = self._scope
        try:
            suppressed = await self._exit(self._inner, et, ev, tb)
        except BaseException as exc:
            await scope.__aexit__(type(exc), exc, exc.__traceback__)
            raise
        if suppressed:
            await scope.__aexit__(None, None, None)
            return True
        await scope.__aexit__(et, ev, tb)
        return False


_RUNNERS: dict[str, Callable[..., Any]] = {
    COROUTINE: _run_coroutine,
    GENERATOR: _run_generator,
    ASYNCGEN: _run_async_generator,
    CONTEXTMANAGER: _BlockContextManager,
    ASYNCCONTEXTMANAGER: _BlockAsyncContextManager,
}


def _decorate(target: Any, pool: Any, key: Any, close_on_error: bool, separate: bool) -> Any:
    if inspect.isclass(target):
        raise TypeError("@with_connection decorates functions and methods, not classes")
    func = target.__func__ if isinstance(target, (classmethod, staticmethod)) else target
    if not callable(func):
        raise TypeError(f"@with_connection needs a callable, got {type(target).__name__}")
    declares, position = _conn_position(func)
    kind = kind_of(target, injects_conn=declares)
    runner = _RUNNERS.get(kind)
    # Generators found behind a plain wrapper: check that the wrapper really returns one.
    check = kind in _PRODUCES and own_kind(func) != kind
    # When wrapt binds `target` to an instance or class, it passes the bound callable
    # (not `target`) and drops the first parameter (self/cls) from args; a staticmethod
    # loses nothing. A bound method, a partial or a callable object is passed as is.
    shift = 0 if isinstance(target, staticmethod) else 1

    @wrapt.decorator
    def wrapper(wrapped: Any, instance: Any, args: Any, kwargs: Any) -> Any:
        where: Any = None
        if declares:
            # A caller that passes a connection is respected: no block is opened.
            if kwargs.get(_CONN) is not None:
                return wrapped(*args, **kwargs)
            where = _KEYWORD
            if position is not None:
                index = position if wrapped is target else position - shift
                if 0 <= index < len(args):
                    if args[index] is not None:
                        return wrapped(*args, **kwargs)
                    where = index
        if runner is None:  # the hot path, inlined: one block around the call
            with ConnectionScope(
                pool if pool is not None else resolve_pool(None), key, close_on_error, separate
            ) as conn:
                if where is None:
                    result = wrapped(*args, **kwargs)
                elif where is _KEYWORD:
                    kwargs[_CONN] = conn
                    result = wrapped(*args, **kwargs)
                else:
                    result = _call(wrapped, args, kwargs, conn, where)
                # One set lookup (none for None): did it return code that would run
                # only after the block? (e.g. a coroutine behind a plain wrapper)
                if result is not None and type(result) in DEFERRED:
                    refuse_deferred(result, target)
            return result
        scope = ConnectionScope(
            pool if pool is not None else resolve_pool(None), key, close_on_error, separate
        )
        return runner(
            scope, _checked(wrapped, kind, target) if check else wrapped, args, kwargs, where
        )

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
    The block covers the body of ``async def`` functions, generators and
    ``@contextmanager`` functions (the whole ``with`` body), also behind other
    decorators; stackings no block can cover raise ``TypeError`` here.
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
