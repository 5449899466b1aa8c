"""What holds behind PgBouncer in transaction mode, and what follows for reset and configure.

A server connection is lent to a client for one transaction only (an autocommit
statement is a transaction).  Session state (SET, temp tables, session advisory locks,
PREPARE...) therefore stays with the *server* connection: the client that created it
may not see it again, and other clients may.  The tests pin PgBouncer's pool to one or
two server connections, and hold them with other clients, so that which server
connection a transaction lands on is known (PgBouncer lends only idle ones).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import psycopg2
import pytest

import pgctx
from pgctx.testing.pgbouncer import PgBouncer


def row(conn: Any, sql: str) -> Any:
    with conn.cursor() as cur:
        cur.execute(sql)
        return cur.fetchone()


PID_AND_PATH = "SELECT pg_backend_pid(), current_setting('search_path')"


@pytest.fixture
def pools() -> Any:
    made: list[pgctx.ThreadedConnectionPool] = []

    def build(dsn: str, minconn: int = 1, maxconn: int = 2, **options: Any) -> Any:
        pool = pgctx.ThreadedConnectionPool(minconn, maxconn, dsn, **options)
        made.append(pool)
        return pool

    yield build
    for pool in made:
        if not pool.closed:
            pool.closeall()


@pytest.fixture
def raw(pgbouncer: PgBouncer) -> Any:
    """Open plain psycopg2 clients of the same PgBouncer (closed after the test)."""
    conns: list[Any] = []

    def connect() -> Any:
        conns.append(psycopg2.connect(pgbouncer.dsn))
        return conns[-1]

    yield connect
    for conn in conns:
        conn.close()


def test_session_state_stays_with_the_server_connection(
    pgbouncer: PgBouncer, pools: Any, raw: Any
) -> None:
    """A SET survives its transaction on the server connection: lost for its client,
    leaked to the next client of that server connection."""
    pool = pools(pgbouncer.dsn)
    holder, other = raw(), raw()
    held_pid, _ = row(holder, PID_AND_PATH)  # holds server connection 1
    with pool.connection() as conn:  # so this transaction gets server connection 2
        row(conn, "SET search_path TO leaked, public; SELECT 1")
        set_pid, path = row(conn, PID_AND_PATH)
        assert path == "leaked, public" and set_pid != held_pid
    other_pid, other_path = row(other, PID_AND_PATH)  # the only idle one: number 2
    holder.commit()
    with pool.connection() as again:
        again_pid, again_path = row(again, PID_AND_PATH)
    assert (other_pid, other_path) == (set_pid, "leaked, public")  # leaked to another client
    assert (again_pid, again_path) == (held_pid, '"$user", public')  # lost for its own


def test_a_set_in_configure_reaches_other_clients(
    pgbouncer: PgBouncer, pools: Any, raw: Any
) -> None:
    def configure(conn: Any) -> None:
        row(conn, "SET statement_timeout = '1234ms'; SELECT 1")
        conn.commit()

    pool = pools(pgbouncer.dsn, configure=configure)
    with pool.connection() as conn:
        (pid,) = row(conn, "SELECT pg_backend_pid()")
    stranger = raw()  # not configured at all, yet it gets the setting
    assert row(stranger, "SELECT pg_backend_pid(), current_setting('statement_timeout')") == (
        pid,
        "1234ms",
    )


def test_client_side_session_attributes_apply_per_transaction(
    make_pgbouncer: Callable[..., PgBouncer], pools: Any
) -> None:
    """psycopg2 sends readonly/isolation_level with each BEGIN: nothing stays behind."""
    bouncer = make_pgbouncer(default_pool_size=1)
    sql = (
        "SELECT current_setting('transaction_read_only'), current_setting('transaction_isolation')"
    )
    pool = pools(
        bouncer.dsn,
        configure=lambda c: c.set_session(readonly=True, isolation_level="SERIALIZABLE"),
    )
    plain = pools(bouncer.dsn)
    for _ in range(2):
        with pool.connection() as conn:
            assert row(conn, sql) == ("on", "serializable")
        with plain.connection() as conn:  # the same server connection (there is one)
            assert row(conn, sql) == ("off", "read committed")


def test_readonly_in_autocommit_mode_is_a_session_set_that_leaks(
    make_pgbouncer: Callable[..., PgBouncer],
) -> None:
    """In autocommit mode psycopg2 has no BEGIN to carry it: it runs SET default_...."""
    bouncer = make_pgbouncer(default_pool_size=1)
    conn, stranger = psycopg2.connect(bouncer.dsn), psycopg2.connect(bouncer.dsn)
    try:
        conn.autocommit = True
        conn.readonly = True
        assert row(stranger, "SELECT current_setting('transaction_read_only')") == ("on",)
    finally:
        conn.close()
        stranger.close()


def test_set_local_and_role_settings_hold(
    make_pgbouncer: Callable[..., PgBouncer], pools: Any
) -> None:
    bouncer = make_pgbouncer(default_pool_size=1)
    pool = pools(bouncer.dsn)
    with pool.connection() as conn:
        row(conn, "SET LOCAL statement_timeout = '999ms'; SELECT 1")
        assert row(conn, "SHOW statement_timeout") == ("999ms",)
    with pool.connection() as conn:  # same server connection: SET LOCAL ended with COMMIT
        assert row(conn, "SHOW statement_timeout") == ("0",)
    # ALTER ROLE tuned SET statement_timeout (conftest) reaches every server connection
    two = make_pgbouncer(default_pool_size=2)
    tuned = pools(two.dsn_for("tuned"), 2, 2)
    with tuned.connection() as a, tuned.connection(separate=True) as b:
        assert row(a, "SHOW statement_timeout") == row(b, "SHOW statement_timeout") == ("4321ms",)


def test_startup_options_are_refused_or_silently_ignored(
    make_pgbouncer: Callable[..., PgBouncer],
) -> None:
    options = "-c statement_timeout=1234"
    bouncer = make_pgbouncer()
    with pytest.raises(psycopg2.OperationalError, match="unsupported startup parameter: options"):
        pgctx.ThreadedConnectionPool(1, 1, bouncer.dsn, options=options)
    lenient = make_pgbouncer(settings={"ignore_startup_parameters": "extra_float_digits,options"})
    pool = pgctx.ThreadedConnectionPool(1, 1, lenient.dsn, options=options)
    try:
        with pool.connection() as conn:
            assert row(conn, "SHOW statement_timeout") == ("0",)  # not 1234ms
    finally:
        pool.closeall()


@pytest.mark.parametrize("always", [False, True], ids=["default", "server_reset_query_always"])
def test_pgbouncer_reset_query_cleans_each_server_connection(
    make_pgbouncer: Callable[..., PgBouncer], pools: Any, always: bool
) -> None:
    bouncer = make_pgbouncer(default_pool_size=1, settings={"server_reset_query_always": always})
    pool = pools(bouncer.dsn)
    with pool.connection() as conn:
        row(conn, "SET search_path TO leaked, public; SELECT 1")
    with pool.connection(separate=True) as other:
        leaked = row(other, PID_AND_PATH)[1] == "leaked, public"
    assert leaked is not always


def test_reset_session_may_clean_another_server_connection(
    pgbouncer: PgBouncer, pools: Any, raw: Any
) -> None:
    """pgctx's DISCARD ALL is one more transaction: it runs on whichever server
    connection is idle when the client connection comes back, not on the one used."""
    holder, other = raw(), raw()
    held_pid, _ = row(holder, PID_AND_PATH)  # holds server connection 1
    seen: list[Any] = []

    def reset(conn: Any) -> None:
        # Between the commit and the reset, another client takes server connection 2
        # (the only idle one), then server connection 1 is freed for DISCARD ALL.
        seen.append(row(other, PID_AND_PATH))
        holder.commit()
        pgctx.reset_session(conn)

    pool = pools(pgbouncer.dsn, reset=reset)
    with pool.connection() as conn:
        row(conn, "SET search_path TO leaked, public; SELECT 1")
        (set_pid,) = row(conn, "SELECT pg_backend_pid()")
    assert set_pid != held_pid
    assert seen == [(set_pid, "leaked, public")]  # the reset came too late
    other.commit()
    # Both server connections, held at once: the one used still has the state.
    assert {row(holder, PID_AND_PATH), row(other, PID_AND_PATH)} == {
        (set_pid, "leaked, public"),
        (held_pid, '"$user", public'),
    }


def test_reset_session_wipes_the_clients_application_name(pgbouncer: PgBouncer, pools: Any) -> None:
    """DISCARD ALL resets the server's application_name, and PgBouncer adopts the
    server's value for the client for good."""
    sql = "SELECT current_setting('application_name')"
    plain = pools(pgbouncer.dsn, application_name="web-1")
    resetting = pools(pgbouncer.dsn, application_name="web-2", reset=pgctx.reset_session)
    for _ in range(2):
        with plain.connection() as conn:
            assert row(conn, sql) == ("web-1",)
    with resetting.connection() as conn:
        assert row(conn, sql) == ("web-2",)
    with resetting.connection() as conn:  # the same client connection, after the reset
        assert row(conn, sql) == ("",)
