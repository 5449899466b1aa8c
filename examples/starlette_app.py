"""A Starlette app (ASGI) with one lazily checked-out connection per request.

Run:  python examples/starlette_app.py          (uvicorn on http://127.0.0.1:8000)
      python examples/starlette_app.py --check  (a few requests, then exit)
Uses PGCTX_DSN or DATABASE_URL when set, else starts a throwaway server.
"""

from __future__ import annotations

import asyncio
import sys
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

import pgctx
from pgctx.contrib.asgi import ConnectionMiddleware
from pgctx.testing import throwaway_or_env


@pgctx.with_connection
async def add_item(name: str, conn: Any = None) -> int:
    with conn.cursor() as cur:
        cur.execute("INSERT INTO items (name) VALUES (%s) RETURNING id", (name,))
        return int(cur.fetchone()[0])


@pgctx.with_connection
def list_items(conn: Any = None) -> list[str]:  # sync: Starlette runs it in a thread
    with conn.cursor() as cur:
        cur.execute("SELECT name FROM items ORDER BY id")
        return [name for (name,) in cur.fetchall()]


async def post_item(request: Request) -> JSONResponse:
    body = await request.json()
    return JSONResponse({"id": await add_item(body["name"])}, status_code=201)


def get_items(request: Request) -> JSONResponse:
    return JSONResponse({"items": list_items()})


def create_app(pool: Any) -> Any:
    app = Starlette(
        routes=[
            Route("/items", post_item, methods=["POST"]),
            Route("/items", get_items, methods=["GET"]),
        ]
    )
    return ConnectionMiddleware(app, pool)  # pure ASGI: one pool.scope() per request


async def check(app: Any) -> None:
    import httpx

    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        assert (await client.post("/items", json={"name": "pear"})).status_code == 201
        assert (await client.get("/items")).json() == {"items": ["pear"]}
    print("ok")


def main(dsn: str, checking: bool) -> None:
    pool = pgctx.ThreadedConnectionPool(1, 8, dsn, timeout=10)
    pgctx.set_default_pool(pool)
    try:
        with pool.connection() as conn, conn.cursor() as cur:
            cur.execute("DROP TABLE IF EXISTS items")
            cur.execute("CREATE TABLE items (id serial PRIMARY KEY, name text)")
        app = create_app(pool)
        if checking:
            asyncio.run(check(app))
        else:
            import uvicorn

            uvicorn.run(app, host="127.0.0.1", port=8000)
    finally:
        pool.closeall()


if __name__ == "__main__":
    with throwaway_or_env() as dsn:
        main(dsn, "--check" in sys.argv)
