"""What calling a callable does: run its body now, or return an object that runs it later.

``@with_connection`` must know this at decoration time, because a block around
the call of an ``async def``, a generator function or a ``@contextmanager``
function ends before their body runs. The kind is read from the callable and,
through ``__wrapped__`` (``functools.wraps``, ``lru_cache``, wrapt),
``functools.partial``, bound methods and ``classmethod``/``staticmethod``, from
what it wraps:

- a layer whose own code says what it is (``async def``, a generator, contextlib's
  ``@contextmanager`` helper) decides, unless a layer above already did;
- a plain layer (a logging or retry decorator returning ``func(*a, **kw)``) passes
  through whatever it wraps, so it gets the inner kind;
- wrapt's ``mark_as_sync``/``mark_as_async`` markers are authoritative: nothing
  below them is looked at.

A layer that cannot run what it wraps inside its own execution (an ``async def``
over a generator function, a generator over an ``async def``) is refused with a
``TypeError`` saying which order works. Decoration-time analysis can be fooled (a
plain function without ``__wrapped__`` that returns a coroutine), so
:data:`DEFERRED` lists the types of the objects a plain function must not return
from a block; checking it costs one set lookup.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from collections.abc import AsyncIterator, Iterator
from types import AsyncGeneratorType, CoroutineType, GeneratorType
from typing import Any

__all__ = [
    "ASYNCCONTEXTMANAGER",
    "ASYNCGEN",
    "CONTEXTMANAGER",
    "COROUTINE",
    "DEFERRED",
    "FUNCTION",
    "GENERATOR",
    "discard",
    "kind_of",
    "not_what_it_was_taken_for",
    "own_kind",
    "refuse_deferred",
    "returned_kind",
]

FUNCTION = "function"
COROUTINE = "async def"
GENERATOR = "generator"
ASYNCGEN = "async generator"
CONTEXTMANAGER = "@contextmanager"
ASYNCCONTEXTMANAGER = "@asynccontextmanager"


def _sample_generator() -> Iterator[None]:
    yield None


async def _sample_async_generator() -> AsyncIterator[None]:
    yield None


# contextlib's decorators return a ``helper`` function; every helper shares one code
# object, which identifies them without relying on contextlib's private names.
_CONTEXTMANAGER_CODE = contextlib.contextmanager(_sample_generator).__code__
_ASYNCCONTEXTMANAGER_CODE = contextlib.asynccontextmanager(_sample_async_generator).__code__
_GENERATOR_CM = type(contextlib.contextmanager(_sample_generator)())
_ASYNC_GENERATOR_CM = type(contextlib.asynccontextmanager(_sample_async_generator)())

#: Types of objects whose code runs only when someone iterates, awaits or enters them.
DEFERRED: frozenset[type] = frozenset(
    {GeneratorType, CoroutineType, AsyncGeneratorType, _GENERATOR_CM, _ASYNC_GENERATOR_CM}
)
_DEFERRED_KINDS = {
    GeneratorType: "a generator",
    CoroutineType: "a coroutine",
    AsyncGeneratorType: "an async generator",
    _GENERATOR_CM: "a context manager (from @contextmanager)",
    _ASYNC_GENERATOR_CM: "an async context manager (from @asynccontextmanager)",
}

_DESCRIPTIONS = {
    COROUTINE: "an async def",
    GENERATOR: "a generator function",
    ASYNCGEN: "an async generator function",
    CONTEXTMANAGER: "a @contextmanager function",
    ASYNCCONTEXTMANAGER: "an @asynccontextmanager function",
}

# (outer, inner): the outer layer's execution cannot cover the inner one's, because
# it may only create the inner object and hand it out (a coroutine returning a
# generator), or cannot run it at all (a sync generator cannot await).
_REFUSED = {
    (COROUTINE, GENERATOR),
    (COROUTINE, ASYNCGEN),
    (COROUTINE, CONTEXTMANAGER),
    (COROUTINE, ASYNCCONTEXTMANAGER),
    (GENERATOR, COROUTINE),
    (GENERATOR, ASYNCGEN),
    (GENERATOR, ASYNCCONTEXTMANAGER),
    (CONTEXTMANAGER, COROUTINE),
    (CONTEXTMANAGER, ASYNCGEN),
    (CONTEXTMANAGER, ASYNCCONTEXTMANAGER),
}

try:  # wrapt's transparent proxies (its decorators, and the markers of wrapt >= 2.2)
    from wrapt import BaseObjectProxy as _Proxy
except ImportError:  # wrapt 1.x
    from wrapt import ObjectProxy as _Proxy


_MAX_LAYERS = 100  # an object inventing a new __wrapped__ on every access ends the walk


def own_kind(layer: Any) -> str | None:
    """What ``layer``'s own code says it is, or None for a plain layer."""
    code = getattr(layer, "__code__", None)
    if code is _CONTEXTMANAGER_CODE:
        return CONTEXTMANAGER
    if code is _ASYNCCONTEXTMANAGER_CODE:
        return ASYNCCONTEXTMANAGER
    if inspect.isasyncgenfunction(layer):
        return ASYNCGEN
    if inspect.iscoroutinefunction(layer):  # also inspect.markcoroutinefunction (3.12+)
        return COROUTINE
    if inspect.isgeneratorfunction(layer):
        return GENERATOR
    return None


def _inner(layer: Any) -> Any:
    """The callable ``layer`` wraps, or None."""
    if isinstance(layer, (classmethod, staticmethod)) or inspect.ismethod(layer):
        return layer.__func__
    if isinstance(layer, functools.partial):
        return layer.func
    try:
        wrapped = layer.__wrapped__
    except Exception:  # any object may refuse an unknown attribute
        wrapped = None
    if wrapped is not None:
        return wrapped
    if not inspect.isroutine(layer) and not inspect.isclass(layer):
        call = inspect.getattr_static(type(layer), "__call__", None)  # a callable object
        if inspect.isfunction(call):
            return call
    return None


def _is_marker(layer: Any) -> bool:
    """True for a wrapt layer that declares a calling convention of its own."""
    if getattr(layer, "_self_is_not_coroutine", False) is True:  # mark_as_sync
        return True
    if not isinstance(layer, _Proxy):
        return False
    try:  # mark_as_async: a proxy reporting another kind than what it wraps
        return own_kind(layer) != own_kind(layer.__wrapped__)
    except Exception:  # an uninitialised or odd proxy
        return False


def _name(layer: Any) -> str:
    return getattr(layer, "__qualname__", None) or type(layer).__name__


def _defined(layer: Any) -> str:
    """``name (file:line)``: functools.wraps copies names, not where the code is."""
    code: Any = getattr(layer, "__code__", None)
    where = getattr(code, "co_filename", None)
    if where is None:
        return _name(layer)
    return f"{_name(layer)} ({where}:{code.co_firstlineno})"


def _is_cache(layer: Any) -> bool:
    return hasattr(layer, "cache_info") and hasattr(layer, "cache_clear")


def kind_of(target: Any, injects_conn: bool = False) -> str:
    """The kind of ``target``; raise TypeError for combinations no block can cover."""
    decided: str | None = None
    decided_by: Any = None
    seen: list[Any] = []  # kept alive, so that no id is reused during the walk
    layer = target
    while layer is not None and all(layer is not s for s in seen) and len(seen) < _MAX_LAYERS:
        seen.append(layer)
        if injects_conn and _is_cache(layer):
            raise TypeError(
                f"@with_connection is above a cache ({_name(layer)}), which would key its "
                "entries on the connection passed as `conn` (and keep every one alive): put "
                "@functools.lru_cache (or @functools.cache) above @with_connection instead"
            )
        marker = _is_marker(layer)
        kind = own_kind(layer)
        if marker and decided is None:
            return kind or FUNCTION
        if kind is not None:
            if decided is None:
                decided, decided_by = kind, layer
            elif (decided, kind) in _REFUSED:
                raise TypeError(
                    f"@with_connection cannot cover {_name(target)!r}: it is called as "
                    f"{_DESCRIPTIONS[decided]} ({_defined(decided_by)}) but wraps "
                    f"{_DESCRIPTIONS[kind]} ({_defined(layer)}), whose body would run after "
                    "the block has ended. Put @with_connection directly above "
                    f"{_name(layer)!r} (below the decorators that change how it is "
                    "called), or declare the real calling convention with "
                    "wrapt.mark_as_sync / wrapt.mark_as_async"
                )
        if marker:
            break
        layer = _inner(layer)
    return decided or FUNCTION


def returned_kind(obj: Any) -> str:
    """What a deferred object (one of :data:`DEFERRED`) is, with its article."""
    return _DEFERRED_KINDS.get(type(obj), f"a {type(obj).__name__}")


def discard(obj: Any) -> None:
    """Close a deferred object without running its body (no "never awaited" warning)."""
    if isinstance(obj, (_GENERATOR_CM, _ASYNC_GENERATOR_CM)):
        obj = getattr(obj, "gen", None)
    try:
        if isinstance(obj, (GeneratorType, CoroutineType)):
            obj.close()
        elif isinstance(obj, AsyncGeneratorType):
            closing = obj.aclose()
            try:
                closing.send(None)  # an async generator never started closes at once
            except StopIteration:
                pass
            else:  # it had started and awaits in its cleanup: cannot finish it here
                closing.close()
    except Exception:  # closing a refused object must not hide the TypeError
        pass


_ADVICE = {
    "a generator": "make it a generator function itself (`yield from` the generator) "
    "or return a list",
    "an async generator": "make it an async generator function itself (iterate and yield)",
    "a coroutine": "make it an `async def` that awaits the coroutine, or put "
    "@with_connection directly above the async def",
}


def refuse_deferred(made: Any, target: Any) -> None:
    """Close ``made`` (a :data:`DEFERRED` object ``target`` returned in a block) and raise."""
    kind = returned_kind(made)
    discard(made)
    advice = _ADVICE.get(
        kind, "put @with_connection directly above @contextmanager / @asynccontextmanager"
    )
    raise TypeError(
        f"{_name(target)} returned {kind} from inside its @with_connection block: its "
        "code would run only after the block ended and gave the connection back, so the "
        f"block was rolled back instead. To run that code inside the block, {advice}; if a "
        "decorator hides what the function is, declare it with wrapt.mark_as_async (or "
        "mark_as_sync) below @with_connection"
    )


def not_what_it_was_taken_for(made: Any, kind: str, target: Any) -> TypeError:
    """Close ``made`` and return the error for a call that did not return a ``kind``'s object."""
    discard(made)
    return TypeError(
        f"@with_connection took {_name(target)} for {_DESCRIPTIONS[kind]} (what it wraps is "
        f"one), but calling it returned {type(made).__name__}; declare what it really is "
        "with wrapt.mark_as_sync / wrapt.mark_as_async, or put @with_connection below the "
        "decorator that changes it"
    )
