"""WSGI middleware under real HTTP requests to a threaded wsgiref server."""

from __future__ import annotations

import contextvars
import json
import threading
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import pytest

import pgctx.pool
from pgctx.contrib.wsgi import ConnectionMiddleware
from pgctx.decorators import with_connection
from pgctx.errors import NoActiveConnection
from pgctx.registry import current_connection, in_scope
from tests.helpers import backends, unique_app, wait_backends, wait_until

N = 12


Pool = pgctx.pool.ThreadedConnectionPool


class ThreadingServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def app_name() -> str:
    return unique_app("wsgi")


@pytest.fixture
def pool(dsn: str, app_name: str) -> Iterator[Pool]:
    p = Pool(0, N, dsn, application_name=app_name, timeout=30)
    yield p
    if not p.closed:
        p.closeall()


def make_app(pool: Pool, barrier: threading.Barrier) -> Any:
    @with_connection(pool)
    def backend_pid(conn: Any) -> int:
        with conn.cursor() as cur:
            cur.execute("SELECT pg_backend_pid()")
            return int(cur.fetchone()[0])

    @with_connection(pool)
    def rows(n: int, conn: Any) -> Iterator[bytes]:
        for i in range(n):
            with conn.cursor() as cur:
                cur.execute("SELECT %s", (i,))
                yield f"{cur.fetchone()[0]}\n".encode()

    def app(environ: dict[str, Any], start_response: Any) -> Any:
        path = environ["PATH_INFO"]
        if path == "/stream":
            start_response("200 OK", [("Content-Type", "text/plain")])
            return rows(5)
        first = backend_pid()
        if path == "/concurrent":
            barrier.wait(30)  # every request holds its connection at the same time
        second = backend_pid()  # a later block in the same request
        body = json.dumps({"first": first, "second": second, "in_use": len(pool._used)})
        start_response("200 OK", [("Content-Type", "application/json")])
        return [body.encode()]

    return ConnectionMiddleware(app, pool)


@pytest.fixture
def server(pool: Pool) -> Iterator[tuple[str, threading.Barrier]]:
    barrier = threading.Barrier(N)
    httpd = make_server(
        "127.0.0.1",
        0,
        make_app(pool, barrier),
        server_class=ThreadingServer,
        handler_class=QuietHandler,
    )
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_port}", barrier
    httpd.shutdown()
    httpd.server_close()
    thread.join(10)


def get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=60) as response:
        return bytes(response.read())


@pytest.mark.timeout(120)
def test_concurrent_requests_each_get_their_own_connection(
    server: tuple[str, threading.Barrier], pool: Pool, pg_admin: Any, app_name: str
) -> None:
    url, _ = server
    with ThreadPoolExecutor(N) as executor:
        results = [json.loads(b) for b in executor.map(get, [f"{url}/concurrent"] * N)]
    pids = [r["first"] for r in results]
    assert len(set(pids)) == N  # no two concurrent requests shared a connection
    assert all(r["first"] == r["second"] for r in results)  # one checkout per request
    assert wait_until(lambda: len(pool._used) == 0)  # nothing left checked out
    assert backends(pg_admin, app_name) <= N
    pool.closeall()
    assert wait_backends(pg_admin, app_name, 0) == 0


@pytest.mark.timeout(120)
def test_many_sequential_and_streamed_requests_leak_nothing(
    server: tuple[str, threading.Barrier], pool: Pool
) -> None:
    url, _ = server
    with ThreadPoolExecutor(8) as executor:
        bodies = list(executor.map(get, [f"{url}/stream", f"{url}/plain"] * 40))
    assert bodies[0] == b"0\n1\n2\n3\n4\n"
    assert all(json.loads(b)["in_use"] >= 1 for b in bodies[1::2])
    # The scope ends just after the response is sent: allow the server a moment.
    assert wait_until(lambda: len(pool._used) == 0)


def test_each_request_runs_in_its_own_copied_context(pool: Pool) -> None:
    marker: contextvars.ContextVar[str] = contextvars.ContextVar("marker", default="clean")
    seen: list[tuple[str, bool]] = []

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        seen.append((marker.get(), in_scope(pool)))
        marker.set("leaked by a request")
        pool.connection().__enter__()  # a buggy request that never exits its block
        start_response("200 OK", [])
        return [b""]

    wrapped = ConnectionMiddleware(app, pool)
    for _ in range(2):  # the same thread, like a worker serving two requests
        response = wrapped({"PATH_INFO": "/"}, lambda *a: None)
        list(response)
        response.close()  # type: ignore[attr-defined]
    assert seen == [("clean", False), ("clean", False)]
    with pytest.raises(NoActiveConnection):
        current_connection(pool)
