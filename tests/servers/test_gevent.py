"""pgctx under gevent with psycogreen, whatever the order of imports and patching.

The greenlets run in a subprocess (monkey-patching is for a whole process), which must
finish within a bound: a deadlock fails the test instead of hanging the suite.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

import pytest

from tests.helpers import unique_app, wait_backends
from tests.servers.conftest import ROOT, require

require("gevent")
require("psycogreen")

BOUND = 30.0  # the run takes 1-2 s


@pytest.mark.parametrize("order", ["after", "import-before", "pool-before"])
def test_concurrent_greenlets_with_checks_resets_and_rollbacks(
    dsn: str, pg_admin: Any, order: str
) -> None:
    app = unique_app("green")
    path = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "PYTHONPATH": path}
    try:
        done = subprocess.run(
            [sys.executable, "-m", "tests.servers.green", order, dsn, app],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=BOUND,
        )
    except subprocess.TimeoutExpired as exc:
        output = f"{exc.stdout or ''}{exc.stderr or ''}"
        pytest.fail(f"the greenlets did not finish within {BOUND} s (a deadlock):\n{output}")
    assert done.returncode == 0, done.stdout + done.stderr
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["busiest"] > 1, "the greenlets never overlapped: psycogreen not in effect?"
    assert summary["stats"]["returns_bad"] == 0, summary
    assert wait_backends(pg_admin, app, 0) == 0
