"""Web framework glue: one lazy connection scope per request.

- :class:`pgctx.contrib.wsgi.ConnectionMiddleware` for WSGI apps (Flask, Django, ...);
- :class:`pgctx.contrib.asgi.ConnectionMiddleware` for ASGI apps (Starlette, FastAPI, ...).

Both wrap each request in ``pool.scope()``: nothing is checked out until a block
or decorated function needs a connection, the request's blocks reuse that
connection, and it is put away when the response is finished.
"""

from __future__ import annotations

__all__: list[str] = []
