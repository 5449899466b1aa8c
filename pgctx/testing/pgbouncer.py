"""A throwaway PgBouncer in front of a test server, for tests behind a real pooler.

It runs the system's ``pgbouncer`` binary (Debian: ``apt-get install pgbouncer``) in
the foreground, listening on 127.0.0.1 only, with ``auth_type = trust`` (pair it with a
server that trusts local TCP logins, such as :class:`~pgctx.testing.ThrowawayServer`).
PgBouncer refuses to run as root, so as root it runs as the same unprivileged user as
the throwaway server.  Its process is stopped on close, at exit, and by a watchdog if
the owning process dies.
"""

from __future__ import annotations

import os
import shutil
import signal
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, ClassVar

from pgctx.testing._common import ServerError
from pgctx.testing._process import SupervisedProcess, free_port

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


class PgBouncer(SupervisedProcess):
    """PgBouncer on 127.0.0.1:<free port> for database ``dbname`` of ``host:port``.

    ``users`` are the user names clients may log in as (trust: no password);
    ``admin_users`` may also use the admin console (database ``pgbouncer``).  Any other
    pgbouncer.ini setting goes in ``settings``; those not set keep PgBouncer's defaults
    (``server_check_delay`` 30 s, ``query_wait_timeout`` 120 s...), except
    ``server_login_retry`` (1 s).  The port is kept across restarts.
    """

    _KIND = _NAME = "pgbouncer"
    _STOP_SIGNALS: ClassVar[Mapping[str, signal.Signals]] = {
        "immediate": signal.SIGTERM,
        "safe": signal.SIGINT,
    }
    _CLOSE_STOP = ("immediate", 10.0)
    _POLL = 0.02

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
        self.host = "127.0.0.1"
        self.port = free_port()  # kept across restarts
        super().__init__(
            prefix="pgctx-bouncer-",
            log_name="pgbouncer.log",
            start_timeout=start_timeout,
            start=start,
        )

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

    def __repr__(self) -> str:
        return f"<PgBouncer {self._state} port={self.port} -> {self._target}>"

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

    def _prepare(self) -> None:
        """Write pgbouncer.ini and userlist.txt (again after a port change)."""
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
        if self._ids is not None:
            for path in (ini, userlist):
                os.chown(path, *self._ids)

    def _command(self) -> list[str]:
        return [str(self._binary), str(self._root / "pgbouncer.ini")]

    def _ready(self) -> bool:
        import psycopg2

        try:
            self.admin("SHOW VERSION")
        except psycopg2.Error:
            return False
        return True

    def _move_port(self) -> bool:
        if "in use" not in self.log_tail(500):
            return False
        self.port = free_port()
        self._prepare()
        return True

    def stop(self, mode: str = "immediate", timeout: float = 30.0) -> None:
        """Stop: ``immediate`` (SIGTERM: drop every client and server connection at once)
        or ``safe`` (SIGINT: PAUSE, wait for running transactions, then exit)."""
        self._stop(mode, timeout)

    def restart(self, mode: str = "immediate") -> None:
        with self._lock:
            self.stop(mode)
            self.start()


def _setting(value: object) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    return str(value)
