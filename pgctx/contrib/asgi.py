"""Pure ASGI middleware: each HTTP or WebSocket connection in ``pool.scope()``.

Pure ASGI rather than Starlette's ``BaseHTTPMiddleware``, which runs the
endpoint in another task so context changes never reach the middleware. The
scope is installed before the app runs and ends after the app returns, which
for ASGI is after the whole response (streamed bodies included) was sent.
ASGI servers run each request in its own task, hence its own context copy.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from pgctx.registry import check_pool, resolve_pool
from pgctx.requestscope import RequestScope

__all__ = ["ConnectionMiddleware"]

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class ConnectionMiddleware:
    """Wrap an ASGI app: ``app = ConnectionMiddleware(app, pool)``.

    Lifespan events pass through untouched. ``pool`` defaults to the default
    pool (looked up per request).
    """

    def __init__(self, app: ASGIApp, pool: Any = None) -> None:
        self.app = app
        self.pool = None if pool is None else check_pool(pool)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        with RequestScope(resolve_pool(self.pool)):
            await self.app(scope, receive, send)
