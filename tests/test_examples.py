"""Every example runs to completion against the session's server (the README promises it)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
RUNS = [
    ("quickstart.py", []),
    ("with_blocks.py", []),
    ("decorators.py", []),
    ("flask_app.py", ["--check"]),
    ("starlette_app.py", ["--check"]),
    ("replicas.py", ["--two-servers"]),
    ("prometheus_export.py", []),
]


@pytest.mark.parametrize(("script", "args"), RUNS, ids=[name for name, _ in RUNS])
def test_example_runs(dsn: str, script: str, args: list[str]) -> None:
    if script == "flask_app.py":
        pytest.importorskip("flask")
    if script == "starlette_app.py":
        pytest.importorskip("starlette")
        pytest.importorskip("uvicorn")
    env = {k: v for k, v in os.environ.items() if k not in ("PGCTX_TEST_DSN", "DATABASE_URL")}
    env["PGCTX_DSN"] = dsn
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / script), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_example_is_run() -> None:
    assert {p.name for p in EXAMPLES.glob("*.py")} == {name for name, _ in RUNS}
