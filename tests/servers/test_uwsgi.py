"""uWSGI (the pyuwsgi wheel) in its default pre-fork mode, around tests/servers/app.py.

Its master loads the app, so the pool opens ``minconn`` connections there, then forks
the workers in C: Python's ``os.register_at_fork`` hooks never run in them. Each worker
must notice it is a new process on its first checkout and open its own connections.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from typing import Any

import pytest

from tests.servers.conftest import (
    Server,
    check_served_and_cleaned_up,
    get,
    hammer,
    python_bin,
    require,
)

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="uWSGI runs on POSIX")
if sys.platform != "win32":
    require("pyuwsgi")


def uwsgi(processes: int, *more: str) -> Callable[[int], list[str]]:
    def argv(port: int) -> list[str]:
        return [
            python_bin("uwsgi"),
            "--master",
            "--processes", str(processes),
            "--http-socket", f"127.0.0.1:{port}",
            "--module", "tests.servers.app:application",
            "--need-app",
            "--die-on-term",  # SIGTERM shuts down (uWSGI 2.0 would reload)
            "--disable-logging",
            "--reload-mercy", "10",
            "--worker-reload-mercy", "10",
            *more,
        ]  # fmt: skip

    return argv


@pytest.mark.parametrize(
    "mode",
    [
        pytest.param([], id="processes"),
        pytest.param(["--threads", "4"], id="threads"),
    ],
)
@pytest.mark.parametrize(
    "options",
    [
        pytest.param({}, id="defaults"),
        pytest.param({"timeout": 10, "check": True, "reset": True}, id="options"),
    ],
)
def test_prefork_workers_never_share_the_masters_connections(
    serve: Callable[..., Server],
    pg_admin: Any,
    app_name: str,
    mode: list[str],
    options: dict[str, Any],
) -> None:
    server = serve(uwsgi(3, *mode), 3, **options)
    status, body = get(f"{server.url}/threads")
    assert status == 200, body
    assert json.loads(body)["at_import"] == ["MainThread"]  # the master forks single-threaded
    load = hammer(server, requests=96, threads=12)
    check_served_and_cleaned_up(server, load, pg_admin, app_name)
