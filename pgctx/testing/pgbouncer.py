"""A throwaway PgBouncer in front of a test server, for tests behind a real pooler.

It runs the system's ``pgbouncer`` binary (Debian: ``apt-get install pgbouncer``) in
the foreground, listening on 127.0.0.1 only, with ``auth_type = trust`` (pair it with a
server that trusts local TCP logins, such as :class:`~pgctx.testing.ThrowawayServer`).
PgBouncer refuses to run as root, so as root it runs as the same unprivileged user as
the throwaway server.  Its process is stopped on close, at exit, and by a watchdog if
the owning process dies.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import IO, Any

from pgctx.testing._common import ServerError
from pgctx.testing.server import _UNPRIVILEGED_USER, _WATCHDOG, _clean_env, _free_port

__all__ = ["PgBouncer", "PgBouncerNotFound", "find_pgbouncer"]

_SEARCH = ("/usr/sbin/pgbouncer", "/usr/bin/pgbouncer", "/usr/local/bin/pgbouncer")


class PgBouncerNotFound(ServerError):
    """No pgbouncer binary on this machine."""


def find_pgbouncer() -> Path:
    """The pgbouncer binary: ``$PGCTX_PGBOUNCER``, else on PATH, else the usual places."""
    override = os.environ.get("PGCTX_PGBOUNCER")
    if override:
        if not os.access(override, os.X_OK):
            raise PgBouncerNotFound(f"PGCTX_PGBOUNCER={override!r} is not an executable file")
        return Path(override)
    found = shutil.which("pgbouncer")
    if found:
        return Path(found)
    for candidate in _SEARCH:
        if os.access(candidate, os.X_OK):
            return Path(candidate)
    raise PgBouncerNotFound(
        "pgbouncer is not installed (looked on PATH and in /usr/sbin): install it with "
        "`apt-get install pgbouncer` (Debian/Ubuntu), or set PGCTX_PGBOUNCER to its path"
    )


def _user_ids(name: str) -> tuple[int, int]:
    import pwd

    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        subprocess.run(
            ["useradd", "--system", "--no-create-home", "--shell", "/bin/false", name],
            check=True,
            capture_output=True,
        )
        entry = pwd.getpwnam(name)
    return entry.pw_uid, entry.pw_gid


_live: set[PgBouncer] = set()


@atexit.register
def _close_all() -> None:
    for bouncer in list(_live):
        if bouncer._owner_pid == os.getpid():  # a forked child leaves its parent's alone
            with contextlib.suppress(Exception):
                bouncer.close()


class PgBouncer:
    """PgBouncer on 127.0.0.1:<free port> for database ``dbname`` of ``host:port``.

    ``users`` are the user names clients may log in as (trust: no password);
    ``admin_users`` may also use the admin console (database ``pgbouncer``).  Any other
    pgbouncer.ini setting goes in ``settings``; those not set keep PgBouncer's defaults
    (``server_check_delay`` 30 s, ``query_wait_timeout`` 120 s...), except
    ``server_login_retry`` (1 s).  The port is kept across restarts.
    """

    def __init__(
        self,
        host: str,
        port: int,
        *,
        dbname: str = "postgres",
        users: Iterable[str] = ("postgres",),
        admin_users: Iterable[str] = ("postgres",),
        pool_mode: str = "transaction",
        default_pool_size: int = 2,
        max_client_conn: int = 100,
        settings: Mapping[str, object] | None = None,
        start: bool = True,
        start_timeout: float = 30.0,
    ) -> None:
        self._binary = find_pgbouncer()
        self.dbname = dbname
        self.users = list(users)
        self.admin_users = list(admin_users)
        self._config: dict[str, str] = {
            "listen_addr": "127.0.0.1",
            "unix_socket_dir": "",
            "auth_type": "trust",
            "pool_mode": pool_mode,
            "default_pool_size": str(default_pool_size),
            "min_pool_size": "0",
            "max_client_conn": str(max_client_conn),
            # pgbouncer waits this long before retrying a failed server login (default
            # 15 s); short, so that a server restart costs tests seconds, not minutes
            "server_login_retry": "1",
            "ignore_startup_parameters": "extra_float_digits",
            "logfile": "",
            "pidfile": "",
            **{str(k): _setting(v) for k, v in (settings or {}).items()},
        }
        self._target = f"host={host} port={port} dbname={dbname}"
        self._start_timeout = start_timeout
        self._ids = _user_ids(_UNPRIVILEGED_USER) if os.geteuid() == 0 else None
        self._owner_pid = os.getpid()
        self._lock = threading.RLock()
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self._watchdog: subprocess.Popen[bytes] | None = None
        self._pipe_w: int | None = None
        self._closed = False
        self._started = False
        self.host = "127.0.0.1"
        self.port = _free_port()  # kept across restarts
        self._root = Path(tempfile.mkdtemp(prefix="pgctx-bouncer-"))
        self.log_path = self._root / "pgbouncer.log"
        try:
            self._start_watchdog()
            self._write_config()
            _live.add(self)
            if start:
                self.start()
        except BaseException:
            self.close()
            raise

    # -- addresses and state ----------------------------------------------------------

    @property
    def dsn(self) -> str:
        """libpq DSN of the pooled database, as the first of ``users``."""
        return self.dsn_for(self.users[0])

    def dsn_for(self, user: str) -> str:
        return f"host={self.host} port={self.port} user={user} dbname={self.dbname}"

    @property
    def admin_dsn(self) -> str:
        """DSN of the admin console (SHOW, PAUSE, RESUME, KILL...)."""
        return f"host={self.host} port={self.port} user={self.admin_users[0]} dbname=pgbouncer"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def __repr__(self) -> str:
        state = "closed" if self._closed else ("running" if self.running else "stopped")
        return f"<PgBouncer {state} port={self.port} -> {self._target}>"

    def __enter__(self) -> PgBouncer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- admin console ----------------------------------------------------------------

    def admin(self, command: str) -> list[dict[str, Any]]:
        """Run one admin console command; the rows as dicts (empty for PAUSE, RESUME...)."""
        import psycopg2

        conn = psycopg2.connect(self.admin_dsn, connect_timeout=10)
        try:
            conn.autocommit = True  # the console knows no BEGIN
            with conn.cursor() as cur:
                cur.execute(command)
                if cur.description is None:
                    return []
                names = [d[0] for d in cur.description]
                return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]
        finally:
            conn.close()

    def pools(self) -> dict[str, Any]:
        """The ``SHOW POOLS`` row of the pooled database (first user), or {}."""
        for row in self.admin("SHOW POOLS"):
            if row["database"] == self.dbname and row["user"] == self.users[0]:
                return row
        return {}

    def pause(self) -> None:
        """``PAUSE db``: wait for running transactions, then hold every new query."""
        self.admin(f"PAUSE {self.dbname}")

    def resume(self) -> None:
        self.admin(f"RESUME {self.dbname}")

    # -- lifecycle --------------------------------------------------------------------

    def _write_config(self) -> None:
        lines = ["[databases]", f"{self.dbname} = {self._target}", "", "[pgbouncer]"]
        lines += [f"listen_port = {self.port}"]
        lines += [f"auth_file = {self._root / 'userlist.txt'}"]
        lines += [f"admin_users = {','.join(self.admin_users)}"]
        lines += [f"{key} = {value}" for key, value in self._config.items()]
        ini = self._root / "pgbouncer.ini"
        ini.write_text("\n".join(lines) + "\n")
        users = dict.fromkeys([*self.users, *self.admin_users])
        userlist = self._root / "userlist.txt"
        userlist.write_text("".join(f'"{u}" ""\n' for u in users))
        userlist.chmod(0o600)
        for path in (self._root, ini, userlist):
            if self._ids is not None:
                os.chown(path, *self._ids)

    def _start_watchdog(self) -> None:
        r, w = os.pipe()
        try:
            self._watchdog = subprocess.Popen(
                [sys.executable, "-I", str(_WATCHDOG), str(r), str(self._root)],
                pass_fds=(r,),
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        except BaseException:
            os.close(w)
            raise
        finally:
            os.close(r)
        self._pipe_w = w

    def _tell_watchdog(self, pid: int) -> None:
        if self._pipe_w is not None:
            with contextlib.suppress(OSError):
                os.write(self._pipe_w, b"%d\n" % pid)

    def start(self) -> None:
        """Start pgbouncer (no-op if running) and wait until its admin console answers."""
        with self._lock:
            if self._closed:
                raise ServerError("pgbouncer is closed")
            if self.running:
                return
            if self._log is None:
                self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed by close()
            kwargs: dict[str, Any] = {"cwd": self._root, "env": _clean_env()}
            if self._ids is not None:
                kwargs.update(user=self._ids[0], group=self._ids[1], extra_groups=[])
            for attempt in range(3):
                self._proc = subprocess.Popen(
                    [str(self._binary), str(self._root / "pgbouncer.ini")],
                    stdin=subprocess.DEVNULL,
                    stdout=self._log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                    **kwargs,
                )
                self._tell_watchdog(self._proc.pid)
                try:
                    self._wait_ready()
                    self._started = True
                    return
                except ServerError:
                    # Someone took the port since we picked it: only a first start moves.
                    if self._started or attempt == 2 or "in use" not in self.log_tail(500):
                        raise
                    self.port = _free_port()
                    self._write_config()

    def _wait_ready(self) -> None:
        import psycopg2

        deadline = time.monotonic() + self._start_timeout
        while True:
            assert self._proc is not None
            if self._proc.poll() is not None:
                raise ServerError(
                    f"pgbouncer exited with code {self._proc.returncode} while starting; "
                    f"log tail:\n{self.log_tail()}"
                )
            try:
                self.admin("SHOW VERSION")
                return
            except psycopg2.Error:
                if time.monotonic() > deadline:
                    self._kill()
                    raise ServerError(
                        f"pgbouncer not ready after {self._start_timeout:.0f}s; "
                        f"log tail:\n{self.log_tail()}"
                    ) from None
                time.sleep(0.02)

    def stop(self, mode: str = "immediate", timeout: float = 30.0) -> None:
        """Stop: ``immediate`` (SIGTERM: drop every client and server connection at once)
        or ``safe`` (SIGINT: PAUSE, wait for running transactions, then exit)."""
        sig = {"immediate": signal.SIGTERM, "safe": signal.SIGINT}.get(mode)
        if sig is None:
            raise ValueError(f"unknown stop mode {mode!r}; use immediate or safe")
        with self._lock:
            proc = self._proc
            if proc is None:
                return
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(sig)
                try:
                    proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    self._kill()
                    raise ServerError(
                        f"pgbouncer did not stop ({mode}) within {timeout:.0f}s; killed it"
                    ) from None
            self._proc = None
            self._tell_watchdog(0)

    def restart(self, mode: str = "immediate") -> None:
        with self._lock:
            self.stop(mode)
            self.start()

    def _kill(self) -> None:
        proc = self._proc
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(30)
        self._proc = None
        self._tell_watchdog(0)

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log_path.read_bytes()[-chars:].decode(errors="replace")
        except OSError:
            return "(no log)"

    def close(self) -> None:
        """Stop pgbouncer, delete its directory and end its watchdog.  Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            _live.discard(self)
            try:
                with contextlib.suppress(ServerError):
                    self.stop("immediate", timeout=10)
            finally:
                self._kill()
                if self._log is not None:
                    self._log.close()
                shutil.rmtree(self._root, ignore_errors=True)
                if self._pipe_w is not None:
                    os.close(self._pipe_w)
                    self._pipe_w = None
                if self._watchdog is not None:
                    try:
                        self._watchdog.wait(30)
                    except subprocess.TimeoutExpired:
                        self._watchdog.kill()
                        self._watchdog.wait()


def _setting(value: object) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    return str(value)
