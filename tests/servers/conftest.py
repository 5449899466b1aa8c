"""Real servers around ``tests/servers/app.py``: start, load, stop, and what to check.

Every server binds a free port on 127.0.0.1, runs in its own session (process group) with
its output in a log file, and is stopped by the fixture: a graceful signal first, then
SIGKILL for the whole group if it does not exit within a bound. The logs of the servers a
test started are attached to its report when it fails.

The servers come with the dev extra (gunicorn, pyuwsgi, gevent, psycogreen). Without
one, its tests are skipped, except when ``CI`` is set: there they fail, so that a green
CI run proves they ran.
"""

from __future__ import annotations

import collections
import contextlib
import importlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import unique_app, wait_backends

ROOT = Path(__file__).resolve().parents[2]
START_WITHIN = 30.0  # seconds for a server to answer with all its workers
STOP_WITHIN = 20.0
ANSWER_WITHIN = 10.0  # per request: far more than any takes, less than a worker timeout


def require(module: str) -> Any:
    """Import ``module`` for a server test: skip without it, or fail when ``CI`` is set."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        if os.environ.get("CI"):
            pytest.fail(f"CI is set, so the server tests must run: {exc}", pytrace=False)
        pytest.skip(f"needs {module} (the dev extra): {exc}", allow_module_level=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def get(url: str, timeout: float = ANSWER_WITHIN) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(errors="replace")
    except OSError as exc:
        return 0, repr(exc)


class Server:
    """One server process (and its workers) serving the app on ``port``."""

    def __init__(self, argv: list[str], env: dict[str, str], port: int, log: Path) -> None:
        self.argv, self.env, self.port, self.log_path = argv, env, port, log
        self.url = f"http://127.0.0.1:{port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def start(self, workers: int) -> None:
        """Start it and wait until ``workers`` distinct worker processes have answered."""
        with open(self.log_path, "wb") as out:
            self.proc = subprocess.Popen(
                self.argv,
                cwd=ROOT,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        seen: set[int] = set()
        deadline = time.monotonic() + START_WITHIN
        while len(seen) < workers:
            if self.proc.poll() is not None:
                raise AssertionError(f"the server exited early:\n{self.log()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"{len(seen)} of {workers} workers answered:\n{self.log()}")
            # Concurrent slow pings reach different workers (an idle one accepts the next).
            answers = parallel([f"{self.url}/ping?sleep=0.1"] * (2 * workers), 2 * workers)
            seen |= {json.loads(body)["worker"] for status, body in answers if status == 200}
            if not seen:
                time.sleep(0.1)  # not listening yet: poll again

    def stop(self) -> int | None:
        """Stop gracefully (SIGTERM), kill the group if that takes too long; the exit code."""
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return None if proc is None else proc.returncode
        proc.send_signal(signal.SIGTERM)
        try:
            return proc.wait(STOP_WITHIN)
        except subprocess.TimeoutExpired:
            self.kill()
            return None

    def kill(self) -> None:
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(STOP_WITHIN)


def parallel(urls: list[str], threads: int) -> list[tuple[int, str]]:
    """GET every URL, ``threads`` at a time; (status, body) in order (status 0: no answer)."""
    results: list[tuple[int, str]] = [(0, "not sent")] * len(urls)
    jobs = collections.deque(enumerate(urls))
    lock = threading.Lock()

    def work() -> None:
        while True:
            with lock:
                if not jobs:
                    return
                i, url = jobs.popleft()
            results[i] = get(url)

    workers = [threading.Thread(target=work) for _ in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(2 * START_WITHIN)
    return results


class Load:
    """The outcome of many concurrent requests: failures and who served what."""

    def __init__(self, answers: list[tuple[int, str]]) -> None:
        self.failures = [body for status, body in answers if status != 200]
        self.served = [json.loads(body) for status, body in answers if status == 200]
        workers_of: dict[str, set[int]] = collections.defaultdict(set)
        for answer in self.served:
            workers_of[answer["backend"]].add(answer["worker"])
        self.shared = {backend: sorted(w) for backend, w in workers_of.items() if len(w) > 1}
        self.workers = {answer["worker"] for answer in self.served}


def hammer(server: Server, requests: int = 64, threads: int = 8, sleep: float = 0.02) -> Load:
    """Send ``requests`` requests over every route of the app, ``threads`` at a time."""
    routes = ("block", "decorated", "rollback", "failing")
    urls = [f"{server.url}/{routes[i % len(routes)]}?sleep={sleep}" for i in range(requests)]
    return Load(parallel(urls, threads))


@pytest.fixture
def app_name() -> str:
    return unique_app("srv")


@pytest.fixture
def serve(
    request: pytest.FixtureRequest, dsn: str, app_name: str, tmp_path: Path
) -> Iterator[Callable[..., Server]]:
    """``serve(argv_for_port, workers, **pool_options)``: a started server, stopped after.

    ``argv_for_port(port)`` gives the command line. The app's pool gets ``pool_options``.
    """
    started: list[Server] = []

    def start(argv_for_port: Callable[[int], list[str]], workers: int, **options: Any) -> Server:
        port = free_port()
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
            "PGCTX_APP_DSN": dsn,
            "PGCTX_APP_NAME": app_name,
            "PGCTX_APP_OPTIONS": json.dumps(options),
            "PYTHONWARNINGS": "always::DeprecationWarning",  # show fork() warnings (3.12+)
        }
        server = Server(argv_for_port(port), env, port, tmp_path / f"server-{len(started)}.log")
        started.append(server)
        server.start(workers)
        return server

    request.node.stash[_SERVERS] = started
    yield start
    for server in started:
        server.stop()


_SERVERS = pytest.StashKey[list[Server]]()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    report = yield
    servers = item.stash.get(_SERVERS, [])
    if report.failed:
        for i, server in enumerate(servers):
            report.sections.append((f"server {i} log ({' '.join(server.argv)})", server.log()))
    return report


def python_bin(name: str) -> str:
    """The console script ``name`` of the running interpreter's environment."""
    candidate = Path(sys.executable).with_name(name)
    return str(candidate) if candidate.exists() else name


def check_served_and_cleaned_up(server: Server, load: Load, pg_admin: Any, app_name: str) -> None:
    """The checks every server test makes after its load, then after stopping the server."""
    assert not load.failures, f"{len(load.failures)} failed requests, first:\n{load.failures[0]}"
    assert len(load.workers) >= 2, f"only workers {load.workers} served: the test proves nothing"
    assert not load.shared, f"server sessions used by two worker processes: {load.shared}"
    code = server.stop()
    assert code is not None, "the server had to be killed"
    assert wait_backends(pg_admin, app_name, 0) == 0, "the app left sessions on the server"
