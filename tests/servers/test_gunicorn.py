"""gunicorn with ``--preload`` (the app and its pool built in the master, then forked):
sync, gthread and gevent workers, around tests/servers/app.py."""

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
    require,
)

if sys.platform == "win32":
    pytest.skip("gunicorn runs on POSIX", allow_module_level=True)
gunicorn_config = require("gunicorn.config")

WORKERS = 2
# gunicorn 24+ opens a control socket in the home directory, shared by every instance.
NO_CONTROL_SOCKET = (
    ["--no-control-socket"] if "control_socket_disable" in gunicorn_config.Config().settings else []
)


def gunicorn(*worker: str) -> Callable[[int], list[str]]:
    def argv(port: int) -> list[str]:
        return [
            sys.executable, "-m", "gunicorn",
            "--preload",
            "--workers", str(WORKERS),
            "--bind", f"127.0.0.1:{port}",
            "--timeout", "20",
            "--graceful-timeout", "10",
            *NO_CONTROL_SOCKET,
            *worker,
            "tests.servers.app:application",
        ]  # fmt: skip

    return argv


KINDS = {
    "sync": gunicorn("--worker-class", "sync"),
    "gthread": gunicorn("--worker-class", "gthread", "--threads", "4"),
    # psycogreen is installed in post_fork, before the worker runs monkey.patch_all()
    "gevent": gunicorn(
        *("--worker-class", "gevent", "--worker-connections", "100"),
        *("--config", "python:tests.servers.gunicorn_gevent"),
    ),
}
OPTIONS = {
    "defaults": {},
    # timeout with minconn starts the maintenance thread; check and reset use the watchdog
    "options": {"timeout": 10, "check": True, "reset": True, "max_lifetime": 600},
}


@pytest.mark.parametrize("options", OPTIONS.values(), ids=OPTIONS.keys())
@pytest.mark.parametrize("kind", KINDS)
def test_preloaded_app_serves_from_each_workers_own_connections(
    serve: Callable[..., Server],
    pg_admin: Any,
    app_name: str,
    kind: str,
    options: dict[str, Any],
) -> None:
    if kind == "gevent":
        require("gevent")
        require("psycogreen")
    server = serve(KINDS[kind], WORKERS, **options)
    status, body = get(f"{server.url}/threads")
    assert status == 200, body
    # The master forked with no thread of pgctx's running (3.12+ warns otherwise).
    assert json.loads(body)["at_import"] == ["MainThread"]
    load = hammer(server, requests=64, threads=8)
    check_served_and_cleaned_up(server, load, pg_admin, app_name)
    assert "multi-threaded" not in server.log(), server.log()
