"""callkinds: what a callable is, found through the decorators stacked on it."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import types
import warnings
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest
import wrapt
from hypothesis import given, settings
from hypothesis import strategies as st

from pgctx.callkinds import (
    ASYNCCONTEXTMANAGER,
    ASYNCGEN,
    CONTEXTMANAGER,
    COROUTINE,
    DEFERRED,
    FUNCTION,
    GENERATOR,
    discard,
    kind_of,
)


def plain(x: int = 0) -> int:
    return x


async def coroutine(x: int = 0) -> int:
    return x


def generator(x: int = 0) -> Iterator[int]:
    yield x


async def async_generator(x: int = 0) -> AsyncIterator[int]:
    yield x


BASES: dict[str, tuple[Callable[..., Any], str]] = {
    "plain": (plain, FUNCTION),
    "async def": (coroutine, COROUTINE),
    "generator": (generator, GENERATOR),
    "async generator": (async_generator, ASYNCGEN),
    "@contextmanager": (contextlib.contextmanager(generator), CONTEXTMANAGER),
    "@asynccontextmanager": (contextlib.asynccontextmanager(async_generator), ASYNCCONTEXTMANAGER),
}


def passthrough(func: Any) -> Any:
    @functools.wraps(func)
    def logged(*args: Any, **kwargs: Any) -> Any:
        return func(*args, **kwargs)

    return logged


@wrapt.decorator
def wrapt_passthrough(wrapped: Any, instance: Any, args: Any, kwargs: Any) -> Any:
    return wrapped(*args, **kwargs)


def retry_async(func: Any) -> Any:
    """An async wrapper of an async def: a coroutine over a coroutine."""

    @functools.wraps(func)
    async def retried(*args: Any, **kwargs: Any) -> Any:
        return await func(*args, **kwargs)

    return retried


class Holder:
    """A callable object, kind taken from its __call__."""

    def __init__(self, func: Any) -> None:
        self.func = func


# Layers that keep the kind of what they wrap, whatever it is.
TRANSPARENT: dict[str, Callable[[Any], Any]] = {
    "functools.wraps pass-through": passthrough,
    "wrapt pass-through": wrapt_passthrough,
    "functools.partial": functools.partial,
    "classmethod": classmethod,
    "staticmethod": staticmethod,
    "lru_cache": functools.lru_cache,
    "bound method": lambda f: types.MethodType(f, object()),
}


@settings(max_examples=300, deadline=None)
@given(
    base=st.sampled_from(sorted(BASES)),
    layers=st.lists(st.sampled_from(sorted(TRANSPARENT)), max_size=4),
)
def test_transparent_layers_keep_the_kind(base: str, layers: list[str]) -> None:
    func, expected = BASES[base]
    for layer in layers:
        if isinstance(func, (classmethod, staticmethod)):
            break  # descriptors go outermost (with @with_connection above them)
        func = TRANSPARENT[layer](func)
    assert kind_of(func) == expected


def test_callable_objects_take_the_kind_of_their_call() -> None:
    class Async:
        async def __call__(self) -> None:
            pass

    class Gen:
        def __call__(self) -> Iterator[int]:
            yield 1

    assert kind_of(Async()) == COROUTINE
    assert kind_of(Gen()) == GENERATOR
    assert kind_of(Holder(coroutine)) == FUNCTION  # no __call__ of its own: plain
    assert kind_of(len) == FUNCTION


def test_same_or_covering_kinds_stacked_are_accepted() -> None:
    assert kind_of(retry_async(coroutine)) == COROUTINE

    @functools.wraps(generator)
    def regenerate(*args: Any) -> Iterator[int]:
        yield from generator(*args)

    @functools.wraps(generator)
    async def async_over_sync(*args: Any) -> AsyncIterator[int]:
        for x in generator(*args):
            yield x

    @functools.wraps(contextlib.contextmanager(generator))
    def generator_using_a_with(*args: Any) -> Iterator[int]:
        with contextlib.contextmanager(generator)(*args) as x:
            yield x

    assert kind_of(regenerate) == GENERATOR
    assert kind_of(async_over_sync) == ASYNCGEN
    assert kind_of(generator_using_a_with) == GENERATOR


@pytest.mark.parametrize(
    ("outer", "inner"),
    [
        ("async def", "generator"),
        ("async def", "async generator"),
        ("async def", "@contextmanager"),
        ("async def", "@asynccontextmanager"),
        ("generator", "async def"),
        ("generator", "async generator"),
        ("generator", "@asynccontextmanager"),
    ],
)
def test_a_layer_that_cannot_run_what_it_wraps_is_refused(outer: str, inner: str) -> None:
    wrapped, _ = BASES[inner]
    if outer == "async def":

        @functools.wraps(wrapped)
        async def layer(*args: Any) -> Any:
            return wrapped(*args)

    else:

        @functools.wraps(wrapped)
        def layer(*args: Any) -> Iterator[Any]:
            yield wrapped(*args)

    with pytest.raises(TypeError, match="directly above") as info:
        kind_of(passthrough(layer))
    assert "wrapt.mark_as_sync" in str(info.value)


def test_a_cache_is_refused_only_where_it_would_key_on_the_connection() -> None:
    cached = functools.lru_cache(plain)
    assert kind_of(cached) == FUNCTION
    with pytest.raises(TypeError, match="above @with_connection"):
        kind_of(passthrough(cached), injects_conn=True)


@pytest.mark.skipif(not hasattr(wrapt, "mark_as_sync"), reason="wrapt without markers")
def test_wrapt_markers_are_authoritative() -> None:
    def run_to_completion(func: Any) -> Any:
        @functools.wraps(func)
        def run(*args: Any) -> Any:
            return asyncio.run(func(*args))

        return run

    def returns_coroutine(*args: Any) -> Any:  # no __wrapped__: nothing to follow
        return coroutine(*args)

    assert kind_of(run_to_completion(coroutine)) == COROUTINE  # fooled without a marker
    assert kind_of(wrapt.mark_as_sync(run_to_completion(coroutine))) == FUNCTION
    assert kind_of(passthrough(wrapt.mark_as_sync(run_to_completion(coroutine)))) == FUNCTION
    assert kind_of(wrapt.mark_as_async(returns_coroutine)) == COROUTINE
    assert kind_of(wrapt.mark_as_async(generator)) == ASYNCGEN  # wrapt's own reading
    assert kind_of(wrapt.mark_as_sync(async_generator)) == GENERATOR
    # An async marker over an async def that wraps a generator: the marker decides.
    assert kind_of(wrapt.mark_as_async(passthrough(generator), generator=False)) == COROUTINE


def _lazy_objects() -> list[Any]:
    return [
        coroutine(),
        generator(),
        async_generator(),
        contextlib.contextmanager(generator)(),
        contextlib.asynccontextmanager(async_generator)(),
    ]


def test_deferred_types_and_discard_leave_no_warning() -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        objects = _lazy_objects()
        assert all(type(obj) in DEFERRED for obj in objects)
        for obj in objects:
            discard(obj)
        del objects, obj
        gc.collect()
    assert [str(w.message) for w in caught] == []
    assert not ({type(x) for x in (1, "s", [], None, plain, iter([]))} & DEFERRED)


def test_discard_of_a_started_async_generator_does_not_raise() -> None:
    async def cleanup_awaits() -> AsyncIterator[int]:
        try:
            yield 1
        finally:
            await asyncio.sleep(0)

    async def main() -> None:
        agen = cleanup_awaits()
        assert await agen.__anext__() == 1
        discard(agen)  # cannot finish the cleanup here; must not raise
        with contextlib.suppress(RuntimeError, StopAsyncIteration):
            await agen.aclose()

    asyncio.run(main())


def test_odd_objects_end_the_walk() -> None:
    class Inventive:
        """Answers every attribute with a new object, __wrapped__ included."""

        def __getattr__(self, name: str) -> Any:
            return Inventive()

        def __call__(self) -> None:
            pass

    cyclic = passthrough(plain)
    cyclic.__wrapped__ = cyclic
    assert kind_of(Inventive()) == FUNCTION
    assert kind_of(cyclic) == FUNCTION
