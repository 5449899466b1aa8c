"""Pure ASGI middleware under real HTTP requests to uvicorn running a Starlette app."""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

import uvicorn  # noqa: E402
from starlette.applications import Starlette  # noqa: E402
from starlette.requests import Request  # noqa: E402
from starlette.responses import JSONResponse, StreamingResponse  # noqa: E402
from starlette.routing import Route  # noqa: E402

import pgctx.pool  # noqa: E402
from pgctx.contrib.asgi import ConnectionMiddleware  # noqa: E402
from pgctx.decorators import with_connection  # noqa: E402
from tests.helpers import AsyncBarrier, backends, unique_app, wait_backends, wait_until  # noqa: E402

N = 12


Pool = pgctx.pool.ThreadedConnectionPool


@pytest.fixture
def app_name() -> str:
    return unique_app("asgi")


@pytest.fixture
def pool(dsn: str, app_name: str) -> Iterator[Pool]:
    p = Pool(0, N, dsn, application_name=app_name, timeout=30)
    yield p
    if not p.closed:
        p.closeall()


def make_app(pool: Pool) -> Any:
    gate: dict[str, AsyncBarrier] = {}

    @with_connection(pool)
    async def backend_pid(conn: Any) -> int:
        with conn.cursor() as cur:
            cur.execute("SELECT pg_backend_pid()")
            return int(cur.fetchone()[0])

    @with_connection(pool)
    def sync_backend_pid(conn: Any) -> int:  # runs in Starlette's thread pool
        return int(conn.get_backend_pid())

    @with_connection(pool)
    async def numbers(n: int, conn: Any) -> AsyncIterator[bytes]:
        for i in range(n):
            with conn.cursor() as cur:
                cur.execute("SELECT %s", (i,))
                yield f"{cur.fetchone()[0]}\n".encode()
            await asyncio.sleep(0)

    async def concurrent(request: Request) -> JSONResponse:
        first = await backend_pid()
        barrier = gate.setdefault("b", AsyncBarrier(N))
        await asyncio.wait_for(barrier.wait(), 30)  # all requests hold a connection now
        second = await backend_pid()
        return JSONResponse({"first": first, "second": second, "in_use": len(pool._used)})

    def sync_endpoint(request: Request) -> JSONResponse:
        return JSONResponse({"pid": sync_backend_pid(), "again": sync_backend_pid()})

    async def stream(request: Request) -> StreamingResponse:
        return StreamingResponse(numbers(5), media_type="text/plain")

    app = Starlette(
        routes=[
            Route("/concurrent", concurrent),
            Route("/sync", sync_endpoint),
            Route("/stream", stream),
        ]
    )
    return ConnectionMiddleware(app, pool)


@pytest.fixture
def base_url(pool: Pool) -> Iterator[str]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(make_app(pool), log_level="warning", lifespan="off")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    for _ in range(300):
        if server.started:
            break
        threading.Event().wait(0.05)
    assert server.started
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(15)
    sock.close()


async def fetch_all(urls: list[str]) -> list[Any]:
    async with httpx.AsyncClient(timeout=60) as client:
        responses = await asyncio.gather(*(client.get(u) for u in urls))
    for r in responses:
        r.raise_for_status()
    return [
        r.json() if r.headers["content-type"].startswith("application/json") else r.text
        for r in responses
    ]


@pytest.mark.timeout(120)
def test_concurrent_requests_each_get_their_own_connection(
    base_url: str, pool: Pool, pg_admin: Any, app_name: str
) -> None:
    results = asyncio.run(fetch_all([f"{base_url}/concurrent"] * N))
    assert len({r["first"] for r in results}) == N
    assert all(r["first"] == r["second"] for r in results)  # one checkout per request
    assert all(r["in_use"] >= 1 for r in results)
    # The scope ends just after the response is sent: allow the server a moment.
    assert wait_until(lambda: len(pool._used) == 0)
    assert backends(pg_admin, app_name) <= N
    pool.closeall()
    assert wait_backends(pg_admin, app_name, 0) == 0


@pytest.mark.timeout(120)
def test_sync_endpoints_and_streams_leak_nothing(base_url: str, pool: Pool) -> None:
    results = asyncio.run(fetch_all([f"{base_url}/sync", f"{base_url}/stream"] * 30))
    assert all(r["pid"] == r["again"] for r in results[0::2])
    assert all(body == "0\n1\n2\n3\n4\n" for body in results[1::2])
    # The scope ends just after the response is sent: allow the server a moment.
    assert wait_until(lambda: len(pool._used) == 0)


def test_lifespan_passes_through(pool: Pool) -> None:
    calls: list[str] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        calls.append(scope["type"])

    asyncio.run(ConnectionMiddleware(app, pool)({"type": "lifespan"}, None, None))  # type: ignore[arg-type]
    assert calls == ["lifespan"]
