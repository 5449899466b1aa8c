"""WSGI middleware: each request in its own copied context and ``pool.scope()``.

Each request runs in a fresh ``contextvars`` copy, so nothing a request binds
(or forgets to unbind) is seen by the next request on the same worker thread.
The scope stays open until the server closes the response iterable, so
streamed bodies still have their connection.
"""

from __future__ import annotations

import contextvars
import sys
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from pgctx.registry import check_pool, resolve_pool
from pgctx.requestscope import RequestScope

__all__ = ["ConnectionMiddleware"]

WSGIApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]


class _ClosingResponse:
    """The app's response iterable, iterated and closed in the request's context."""

    __slots__ = ("_context", "_iterator", "_result", "_scope")

    def __init__(
        self, context: contextvars.Context, scope: RequestScope, result: Iterable[bytes]
    ) -> None:
        self._context = context
        self._scope = scope
        self._result = result
        self._iterator: Iterator[bytes] | None = None

    def __iter__(self) -> _ClosingResponse:
        return self

    def __next__(self) -> bytes:
        if self._iterator is None:
            self._iterator = self._context.run(iter, self._result)
        return self._context.run(next, self._iterator)

    def close(self) -> None:
        self._context.run(self._close)

    def _close(self) -> None:
        try:
            close = getattr(self._result, "close", None)
            if close is not None:
                close()
        except BaseException:
            self._scope.__exit__(*sys.exc_info())
            raise
        self._scope.__exit__(None, None, None)


class ConnectionMiddleware:
    """Wrap a WSGI app: ``app = ConnectionMiddleware(app, pool)``.

    ``pool`` defaults to the default pool (looked up per request).
    """

    def __init__(self, app: WSGIApp, pool: Any = None) -> None:
        self.app = app
        self.pool = None if pool is None else check_pool(pool)

    def __call__(
        self, environ: dict[str, Any], start_response: Callable[..., Any]
    ) -> Iterable[bytes]:
        context = contextvars.copy_context()
        return context.run(self._start, context, environ, start_response)

    def _start(
        self,
        context: contextvars.Context,
        environ: dict[str, Any],
        start_response: Callable[..., Any],
    ) -> Iterable[bytes]:
        scope = RequestScope(resolve_pool(self.pool))
        scope.__enter__()
        try:
            result = self.app(environ, start_response)
        except BaseException:
            scope.__exit__(*sys.exc_info())
            raise
        return _ClosingResponse(context, scope, result)
