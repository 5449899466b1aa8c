"""One supervised foreground process in a temporary directory: what servers share.

Both ThrowawayServer (postgres) and PgBouncer run a single daemon in the foreground,
in its own session, as an unprivileged user when we are root, logging to a file in a
temporary directory.  That directory and the process must go away on close, at exit,
and, through a watchdog (see _watchdog.py), when the owning process dies.
"""

from __future__ import annotations

import atexit
import contextlib
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
from typing import IO, Any, ClassVar, TypeVar

from pgctx.testing._account import make_traversable, server_account
from pgctx.testing._common import ServerError

_WATCHDOG = Path(__file__).with_name("_watchdog.py")


def free_port() -> int:
    """A TCP port of 127.0.0.1 free right now (someone may take it before we bind)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def clean_env() -> dict[str, str]:
    """The environment without PG* variables (PGDATA, PGPORT, PGOPTIONS...) of the caller."""
    return {k: v for k, v in os.environ.items() if not k.startswith("PG")}


_P = TypeVar("_P", bound="SupervisedProcess")

# Strong references, oldest first: an instance forgotten by its owner still gets a clean
# stop at exit, and a pooler closes before the server created before it.
_live: dict[SupervisedProcess, None] = {}


@atexit.register
def _close_all() -> None:
    for proc in reversed(list(_live)):
        # A forked child exiting normally must not stop its parent's processes.
        if proc._owner_pid != os.getpid():
            continue
        with contextlib.suppress(Exception):
            proc.close()


class SupervisedProcess:
    """Base of ThrowawayServer and PgBouncer: the directory, process, watchdog and log.

    Subclasses set their own attributes, then call ``__init__``, which creates the
    directory and runs the hooks (_make_dirs, _prepare, then start); from the directory
    on, any failure closes everything.  They provide _command and _ready, and stop()
    and restart() with their own modes (``_STOP_SIGNALS``).
    """

    _KIND: ClassVar[str]  # in "... is closed"
    _NAME: ClassVar[str]  # the process, in error messages
    _STOP_SIGNALS: ClassVar[Mapping[str, signal.Signals]]
    _CLOSE_STOP: ClassVar[tuple[str, float]]  # stop mode and timeout used by close()
    _POLL: ClassVar[float] = 0.05  # seconds between readiness checks

    def __init__(self, *, prefix: str, log_name: str, start_timeout: float, start: bool) -> None:
        self._start_timeout = start_timeout
        self._lock = threading.RLock()
        self._proc: subprocess.Popen[bytes] | None = None
        self._watchdog: subprocess.Popen[bytes] | None = None
        self._pipe_w: int | None = None
        self._log: IO[bytes] | None = None
        self._closed = False
        self._started = False
        self._owner_pid = os.getpid()
        # PostgreSQL and PgBouncer refuse to run as root (see _account.py).
        self._ids = server_account() if os.geteuid() == 0 else None
        self._root = Path(tempfile.mkdtemp(prefix=prefix))
        self._dirs = [self._root]  # removed by close() and by the watchdog
        self._log_path = self._root / log_name
        # From here on the directories must go away whatever happens.
        try:
            self._make_dirs()
            self._start_watchdog()
            if self._ids is not None:
                for d in self._dirs:
                    make_traversable(d)
                    os.chown(d, *self._ids)
            self._prepare()
            _live[self] = None
            if start:
                self.start()
        except BaseException:
            self.close()
            raise

    # -- hooks ------------------------------------------------------------------------

    def _make_dirs(self) -> None:
        """Create directories besides root (append them to _dirs) for the watchdog."""

    def _prepare(self) -> None:
        """Prepare the directory (initdb, configuration) before the first start."""

    def _command(self) -> list[str]:
        raise NotImplementedError

    def _ready(self) -> bool:
        """Whether the started process accepts connections yet."""
        raise NotImplementedError

    def _move_port(self) -> bool:
        """After a failed first start: if the port was taken, pick another; say so."""
        return False

    # -- state ------------------------------------------------------------------------

    @property
    def root(self) -> Path:
        """The temporary directory holding everything; deleted by close()."""
        return self._root

    @property
    def log_path(self) -> Path:
        return self._log_path

    @property
    def pid(self) -> int | None:
        """Process id of the running process, else None."""
        return self._proc.pid if self.running and self._proc is not None else None

    @property
    def watchdog_pid(self) -> int | None:
        return self._watchdog.pid if self._watchdog is not None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def _state(self) -> str:
        return "closed" if self._closed else ("running" if self.running else "stopped")

    def __enter__(self: _P) -> _P:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self._log_path.read_bytes()[-chars:].decode(errors="replace")
        except OSError:
            return "(no log)"

    # -- lifecycle --------------------------------------------------------------------

    def _popen_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"cwd": self._root, "env": clean_env()}
        if self._ids is not None:
            kwargs.update(user=self._ids[0], group=self._ids[1], extra_groups=[])
        return kwargs

    def _start_watchdog(self) -> None:
        r, w = os.pipe()
        try:
            self._watchdog = subprocess.Popen(
                [sys.executable, "-I", str(_WATCHDOG), str(r), *map(str, self._dirs)],
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
        """Start the process (no-op if running) and wait until it accepts connections."""
        with self._lock:
            if self._closed:
                raise ServerError(f"{self._KIND} is closed")
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
                    if self._started or attempt == 2 or not self._move_port():
                        raise

    def _spawn(self) -> None:
        if self._log is None:
            self._log = open(self._log_path, "ab")  # noqa: SIM115 - closed by close()
        self._proc = subprocess.Popen(
            self._command(),
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # a ^C to the test run must not stop it behind our back
            **self._popen_kwargs(),
        )
        self._tell_watchdog(self._proc.pid)

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self._start_timeout
        while True:
            assert self._proc is not None
            if self._proc.poll() is not None:
                raise ServerError(
                    f"{self._NAME} exited with code {self._proc.returncode} while starting; "
                    f"log tail:\n{self.log_tail()}"
                )
            if self._ready():
                return
            if time.monotonic() > deadline:
                self._kill()
                raise ServerError(
                    f"{self._NAME} not ready after {self._start_timeout:.0f}s; "
                    f"log tail:\n{self.log_tail()}"
                )
            time.sleep(self._POLL)

    def _stop(self, mode: str, timeout: float) -> None:
        sig = self._STOP_SIGNALS.get(mode)
        if sig is None:
            *others, last = self._STOP_SIGNALS
            raise ValueError(f"unknown stop mode {mode!r}; use {', '.join(others)} or {last}")
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
                        f"{self._NAME} did not stop ({mode}) within {timeout:.0f}s; killed it"
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
        self._proc = None
        self._tell_watchdog(0)

    def close(self) -> None:
        """Stop the process, delete its directories and end its watchdog.  Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            _live.pop(self, None)
            try:
                with contextlib.suppress(ServerError):
                    self._stop(*self._CLOSE_STOP)
            finally:
                self._kill()
                if self._log is not None:
                    self._log.close()
                for d in self._dirs:
                    shutil.rmtree(d, ignore_errors=True)
                if self._pipe_w is not None:
                    os.close(self._pipe_w)  # EOF: the watchdog finds nothing to do and exits
                    self._pipe_w = None
                if self._watchdog is not None:
                    try:
                        self._watchdog.wait(30)
                    except subprocess.TimeoutExpired:
                        self._watchdog.kill()
                        self._watchdog.wait()
