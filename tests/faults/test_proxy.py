"""Tests of the fault proxy itself, through psycopg2 against the real server.

Timing is never a pass/fail criterion except as a generous upper bound: waits use events
and deadlines.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import psycopg2
import pytest
from psycopg2.extensions import connection as Connection
from psycopg2.extensions import parse_dsn

from pgctx.testing import PgServer
from tests.faults.proxy import FaultProxy

DEADLINE = 15.0


def wait_for(cond: Callable[[], bool], timeout: float = DEADLINE) -> bool:
    """Poll *cond* until true or *timeout*; returns the last result."""
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            return False
        time.sleep(0.02)
    return True


def scalar(conn: Connection, sql: str) -> Any:
    with conn.cursor() as cur:
        cur.execute(sql)
        row = cur.fetchone()
    assert row is not None
    return row[0]


class Query(threading.Thread):
    """Runs one query on *conn* in the background; ``done`` is set when it ends either way."""

    def __init__(self, conn: Connection, sql: str) -> None:
        super().__init__(daemon=True)
        self.conn, self.sql = conn, sql
        self.done = threading.Event()
        self.result: Any = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.result = scalar(self.conn, self.sql)
        except BaseException as exc:
            self.error = exc
        finally:
            self.done.set()


@pytest.fixture
def conn(proxy: FaultProxy) -> Iterator[Connection]:
    """A connection through the proxy, established in relay mode."""
    c = psycopg2.connect(proxy.dsn, connect_timeout=10)
    c.autocommit = True
    try:
        yield c
    finally:
        c.close()


def server_port(pg_server: PgServer) -> int:
    return int(parse_dsn(pg_server.dsn).get("port", 5432))


def test_relay(proxy: FaultProxy, conn: Connection, pg_server: PgServer) -> None:
    assert proxy.port != server_port(pg_server)
    assert f"port={proxy.port}" in proxy.dsn
    assert scalar(conn, "SELECT 1") == 1
    assert scalar(conn, "SELECT inet_server_port()") == server_port(pg_server)
    assert proxy.connections == 1
    # a large result crosses the bounded buffers intact
    assert scalar(conn, "SELECT length(repeat('x', 5000000))") == 5000000
    assert len(scalar(conn, "SELECT repeat('x', 5000000)")) == 5000000
    conn.close()
    assert wait_for(lambda: proxy.connections == 0)


def test_server_side_close_is_passed_on(
    proxy: FaultProxy, conn: Connection, pg_server: PgServer
) -> None:
    pid = scalar(conn, "SELECT pg_backend_pid()")
    admin = pg_server.connect()
    try:
        scalar(admin, f"SELECT pg_terminate_backend({int(pid)})")
    finally:
        admin.close()
    # the server's FATAL message reaches the client before the close
    with pytest.raises(psycopg2.OperationalError, match="terminat"):
        scalar(conn, "SELECT 1")
    assert conn.closed
    assert wait_for(lambda: proxy.connections == 0)


def test_refuse(proxy: FaultProxy) -> None:
    port = proxy.port
    proxy.set_mode("refuse")
    start = time.monotonic()
    with pytest.raises(psycopg2.OperationalError, match="refused"):
        psycopg2.connect(proxy.dsn, connect_timeout=10)
    assert time.monotonic() - start < DEADLINE
    proxy.set_mode("relay")
    assert proxy.port == port
    c = psycopg2.connect(proxy.dsn, connect_timeout=10)
    try:
        assert scalar(c, "SELECT 1") == 1
    finally:
        c.close()


def test_refuse_keeps_established(proxy: FaultProxy, conn: Connection) -> None:
    proxy.set_mode("refuse")
    assert scalar(conn, "SELECT 2") == 2


@pytest.mark.parametrize("mode", ["hang_on_connect", "blackhole_new"])
def test_hang_on_connect(proxy: FaultProxy, conn: Connection, mode: Any) -> None:
    proxy.set_mode(mode)
    start = time.monotonic()
    with pytest.raises(psycopg2.OperationalError, match="timeout"):
        psycopg2.connect(proxy.dsn, connect_timeout=1)
    assert time.monotonic() - start < DEADLINE
    assert scalar(conn, "SELECT 3") == 3  # established connections still relay
    assert wait_for(lambda: proxy.pending == 0)  # the timed-out client's socket is freed
    proxy.set_mode("relay")
    c = psycopg2.connect(proxy.dsn, connect_timeout=10)
    try:
        assert scalar(c, "SELECT 1") == 1
    finally:
        c.close()


def test_held_connect_completes_when_healed(proxy: FaultProxy) -> None:
    proxy.set_mode("hang_on_connect")
    result: list[Connection] = []
    done = threading.Event()

    def connect() -> None:
        try:
            result.append(psycopg2.connect(proxy.dsn, connect_timeout=int(DEADLINE)))
        finally:
            done.set()

    t = threading.Thread(target=connect, daemon=True)
    t.start()
    assert wait_for(lambda: proxy.pending == 1)
    assert not done.wait(0.3)
    proxy.set_mode("relay")
    assert done.wait(DEADLINE)
    t.join(DEADLINE)
    assert result
    try:
        assert scalar(result[0], "SELECT 1") == 1
    finally:
        result[0].close()


def test_stop_relaying_then_reset(proxy: FaultProxy, conn: Connection) -> None:
    proxy.set_mode("stop_relaying")
    q = Query(conn, "SELECT 1")
    q.start()
    cpu = time.process_time()
    assert not q.done.wait(0.5)  # the server never sees the query
    assert time.process_time() - cpu < 0.25  # the proxy idles: no busy loop while muted
    assert proxy.connections == 1
    assert proxy.reset_all() == 1
    assert q.done.wait(DEADLINE)
    q.join(DEADLINE)
    assert isinstance(q.error, psycopg2.OperationalError)
    assert conn.closed
    assert proxy.connections == 0


def test_stop_relaying_then_heal(proxy: FaultProxy, conn: Connection) -> None:
    proxy.set_mode("stop_relaying")
    q = Query(conn, "SELECT 42")
    q.start()
    assert not q.done.wait(0.5)
    proxy.set_mode("relay")  # held bytes are delivered, as TCP does after a partition
    assert q.done.wait(DEADLINE)
    q.join(DEADLINE)
    assert q.error is None
    assert q.result == 42


def test_reset_all(proxy: FaultProxy, conn: Connection) -> None:
    other = psycopg2.connect(proxy.dsn, connect_timeout=10)
    try:
        assert scalar(other, "SELECT 1") == 1
        assert proxy.connections == 2
        assert proxy.reset_all() == 2
        assert proxy.connections == 0
        for c in (conn, other):
            with pytest.raises(psycopg2.OperationalError):
                scalar(c, "SELECT 1")
            assert c.closed
    finally:
        other.close()
    c = psycopg2.connect(proxy.dsn, connect_timeout=10)  # new connections still work
    try:
        assert scalar(c, "SELECT 1") == 1
    finally:
        c.close()


def test_target_down_closes_the_client() -> None:
    with socket.socket() as s:  # a port with nothing listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with FaultProxy(f"host=127.0.0.1 port={port} user=postgres dbname=postgres") as p:
        start = time.monotonic()
        with pytest.raises(psycopg2.OperationalError):
            psycopg2.connect(p.dsn, connect_timeout=10)
        assert time.monotonic() - start < DEADLINE
        assert wait_for(lambda: p.connections + p.pending == 0)


def test_close_leaves_no_threads(pg_server: PgServer) -> None:
    baseline = threading.active_count()
    p = FaultProxy(pg_server.dsn)
    c = psycopg2.connect(p.dsn, connect_timeout=10)
    try:
        assert scalar(c, "SELECT 1") == 1
        assert threading.active_count() > baseline
        start = time.monotonic()
        p.close()
        assert time.monotonic() - start < DEADLINE
        assert wait_for(lambda: threading.active_count() <= baseline)
        with pytest.raises(psycopg2.OperationalError):
            scalar(c, "SELECT 1")  # close() closed the relayed connection
        with pytest.raises(psycopg2.OperationalError):
            psycopg2.connect(p.dsn, connect_timeout=10)
        with pytest.raises(RuntimeError):
            p.set_mode("relay")
        p.close()  # idempotent
    finally:
        c.close()
