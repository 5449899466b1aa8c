"""pgctx behind a real PgBouncer in transaction mode: scopes, faults, many processes.

Each with-block is one transaction, and a transaction keeps one server connection from
its first statement to its end, so everything scopes promise holds behind PgBouncer.
What does not hold (session state between transactions) is in test_transaction_mode.py.
"""

from __future__ import annotations

import multiprocessing
import os
import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from functools import partial
from typing import Any

import psycopg2
import pytest

import pgctx
from pgctx.testing import ThrowawayServer
from pgctx.testing.pgbouncer import PgBouncer
from pgctx.testing.server import StopMode
from tests.helpers import wait_until

GENEROUS = 30.0  # seconds; an upper bound for things that take milliseconds


def one(conn: Any, sql: str, args: Any = None) -> Any:
    with conn.cursor() as cur:
        cur.execute(sql, args)
        return cur.fetchone()[0]


def server_sessions(admin: Any, user: str = "app") -> list[int]:
    """Backend pids of PgBouncer's server connections (the server's sessions of ``user``)."""
    with admin.cursor() as cur:
        cur.execute(
            "SELECT pid FROM pg_stat_activity WHERE usename = %s"
            " AND backend_type = 'client backend'",
            (user,),
        )
        return [int(pid) for (pid,) in cur.fetchall()]


def kill_server_sessions(admin: Any, bouncer: PgBouncer, expected: int) -> None:
    """Terminate PgBouncer's server connections; wait until PgBouncer has dropped them."""
    with admin.cursor() as cur:
        cur.execute(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE usename = 'app'"
        )
        assert cur.fetchone()[0] == expected
    assert wait_until(lambda: not bouncer.admin("SHOW SERVERS"), GENEROUS)


def client_state(bouncer: PgBouncer, conn: Any) -> str | None:
    """PgBouncer's state for the client connection ``conn`` (``SHOW CLIENTS``), or None."""
    with socket.socket(fileno=os.dup(conn.fileno())) as sock:
        port = sock.getsockname()[1]
    states = [c["state"] for c in bouncer.admin("SHOW CLIENTS") if c["port"] == port]
    return states[0] if states else None


def server_pids(bouncer: PgBouncer) -> set[int]:
    """Backend pids of the server connections PgBouncer holds (``SHOW SERVERS``)."""
    return {int(s["remote_pid"]) for s in bouncer.admin("SHOW SERVERS")}


def holds_none_of(bouncer: PgBouncer, pids: set[int]) -> bool:
    return not server_pids(bouncer) & pids


@pytest.fixture
def make_pool(pgbouncer: PgBouncer) -> Any:
    made: list[pgctx.ThreadedConnectionPool] = []

    def build(minconn: int = 1, maxconn: int = 4, **options: Any) -> Any:
        pool = pgctx.ThreadedConnectionPool(minconn, maxconn, pgbouncer.dsn, **options)
        made.append(pool)
        return pool

    yield build
    for pool in made:
        if not pool.closed:
            pool.closeall()


@pytest.fixture
def table(pgbouncer: PgBouncer, request: pytest.FixtureRequest) -> Any:
    name = f"t_{request.node.name.split('[')[0][-40:]}"
    conn = psycopg2.connect(pgbouncer.dsn)
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute(f"DROP TABLE IF EXISTS {name}")
        cur.execute(f"CREATE TABLE {name} (v int UNIQUE)")
    yield name
    with conn.cursor() as cur:
        cur.execute(f"DROP TABLE {name}")
    conn.close()


# -- scopes ----------------------------------------------------------------------------


def test_with_blocks_commit_and_roll_back(make_pool: Any, table: str) -> None:
    pool = make_pool(timeout=10)
    with pool.connection() as conn:
        one(conn, f"INSERT INTO {table} VALUES (1) RETURNING v")
    with pytest.raises(ZeroDivisionError), pool.connection() as conn:
        one(conn, f"INSERT INTO {table} VALUES (2) RETURNING v")
        1 / 0  # noqa: B018
    with pool.connection(separate=True) as other:
        assert one(other, f"SELECT array_agg(v) FROM {table}") == [1]


def test_a_block_keeps_one_server_connection_while_other_clients_interleave(
    make_pool: Any, table: str, pgbouncer: PgBouncer
) -> None:
    pool = make_pool(timeout=10)
    others = [psycopg2.connect(pgbouncer.dsn) for _ in range(2)]
    try:
        with pool.connection() as conn:
            one(conn, "CREATE TEMP TABLE scratch (v int) ON COMMIT DROP; SELECT 1")
            pids = set()
            for i in range(5):
                pids.add(one(conn, "SELECT pg_backend_pid()"))
                one(conn, "INSERT INTO scratch VALUES (%s) RETURNING v", (i,))
                for other in others:  # each runs a transaction of its own in between
                    one(other, "SELECT 1")
                    other.commit()
            assert len(pids) == 1  # the temp table (session state) stays reachable too
            assert one(conn, "SELECT count(*) FROM scratch") == 5
    finally:
        for other in others:
            other.close()


def test_nested_blocks_join_and_an_escaped_error_aborts(make_pool: Any, table: str) -> None:
    pool = make_pool(timeout=10)
    with pytest.raises(pgctx.TransactionAborted), pool.connection() as outer:
        one(outer, f"INSERT INTO {table} VALUES (1) RETURNING v")
        with pool.connection() as inner:
            assert inner is outer
        try:
            with pool.connection():
                raise ValueError("inner failure")
        except ValueError:
            pass
    with pool.connection() as conn:
        assert one(conn, f"SELECT count(*) FROM {table}") == 0  # nothing was committed


def test_decorators_and_savepoints(make_pool: Any, table: str) -> None:
    pool = make_pool(timeout=10)

    @pgctx.with_connection(pool)
    def add(v: int, conn: Any = None) -> None:
        one(conn, f"INSERT INTO {table} VALUES (%s) RETURNING v", (v,))

    @pgctx.with_connection(pool)
    def values(conn: Any = None) -> Any:
        with conn.cursor("named") as cur:  # a server-side cursor: DECLARE in the transaction
            cur.itersize = 1
            cur.execute(f"SELECT v FROM {table} ORDER BY v")
            for (v,) in cur:
                yield v

    with pool.connection():
        add(1)
        with pytest.raises(psycopg2.errors.UniqueViolation), pgctx.savepoint(pool):
            add(2)
            add(1)  # undone with add(2), not with the outer insert
        add(3)
    assert list(values()) == [1, 3]


# -- faults ----------------------------------------------------------------------------


def test_server_connection_killed_while_idle_is_invisible_to_clients(
    make_pool: Any, pgbouncer: PgBouncer, server_admin: Any
) -> None:
    """No check needed: PgBouncer notices the dead server connection and opens another."""
    pool = make_pool(1, 1)
    with pool.connection() as conn:
        before = one(conn, "SELECT pg_backend_pid()")
    kill_server_sessions(server_admin, pgbouncer, 1)
    with pool.connection() as again:
        assert again is conn  # the pooled client connection to PgBouncer lives on
        assert one(again, "SELECT pg_backend_pid()") != before
    assert pool.get_stats()["returns_bad"] == 0


def test_server_connection_killed_mid_transaction_drops_the_client_connection(
    make_pool: Any, pgbouncer: PgBouncer, server_admin: Any
) -> None:
    pool = make_pool(1, 1)
    with pytest.raises(psycopg2.OperationalError) as info, pool.connection() as conn:
        one(conn, "SELECT pg_backend_pid()")  # the transaction holds a server connection
        kill_server_sessions(server_admin, pgbouncer, 1)
        one(conn, "SELECT 1")
    assert pgctx.is_disconnect(info.value)  # PgBouncer closed the client connection too
    assert conn.closed and pool.get_stats()["returns_bad"] == 1
    with pool.connection() as conn:  # the slot was freed: a new client connection
        assert one(conn, "SELECT 1") == 1


@pytest.mark.parametrize("check", [None, pgctx.check_connection], ids=["no-check", "check"])
def test_pgbouncer_restart(make_pool: Any, pgbouncer: PgBouncer, check: Any) -> None:
    """A restart drops every client connection: without check each idle one fails once."""
    pool = make_pool(2, 2, check=check)
    pgbouncer.restart()
    for _ in range(2 if check is None else 0):
        with pytest.raises(psycopg2.OperationalError) as info, pool.connection() as conn:
            one(conn, "SELECT 1")
        assert pgctx.is_disconnect(info.value)
    with pool.connection() as conn, pool.connection(separate=True) as other:
        assert one(conn, "SELECT 1") == one(other, "SELECT 1") == 1
    stats = pool.get_stats()
    assert (stats["connections_lost"], stats["returns_bad"]) == (
        (0, 2) if check is None else (2, 0)
    )


def test_pause_holds_a_block_until_resume(make_pool: Any, pgbouncer: PgBouncer) -> None:
    pool = make_pool(1, 1, timeout=10, check=pgctx.check_connection)
    conn = pool.getconn()
    pool.putconn(conn)
    result: list[Any] = []
    pgbouncer.pause()
    try:
        worker = threading.Thread(target=lambda: result.append(_select_one(pool)))
        worker.start()
        # The borrower's query (the check first) waits inside PgBouncer; pgctx's
        # check deadline (10 s) has not passed, so nothing fails.
        assert wait_until(lambda: client_state(pgbouncer, conn) == "waiting", GENEROUS)
        assert worker.is_alive() and not result
    finally:
        pgbouncer.resume()
    worker.join(GENEROUS)
    assert result == [1] and pool.get_stats()["connections_lost"] == 0


def _select_one(pool: Any) -> Any:
    with pool.connection() as conn:
        return one(conn, "SELECT 1")


def test_a_check_cut_off_by_pause_gives_a_new_connection_that_waits_too(
    make_pool: Any, pgbouncer: PgBouncer
) -> None:
    """PgBouncer accepts logins while paused: pgctx's timeout does not bound the pause."""
    pool = make_pool(1, 1, timeout=1, check=pgctx.check_connection)
    old = pool.getconn()
    pool.putconn(old)
    pgbouncer.pause()
    try:
        started = time.monotonic()
        conn = pool.getconn()  # the check of `old` is cut off after ~1 s; a fresh login
        assert time.monotonic() - started < GENEROUS
        assert conn is not old and pool.get_stats()["connections_lost"] == 1
        result: list[Any] = []
        worker = threading.Thread(target=lambda: result.append(one(conn, "SELECT 1")))
        worker.start()
        assert wait_until(lambda: client_state(pgbouncer, conn) == "waiting", GENEROUS)
        assert worker.is_alive() and not result  # queued until RESUME (or query_wait_timeout)
        # the check pgctx cut off is still queued in PgBouncer too
        assert pgbouncer.pools()["cl_waiting"] == 2
    finally:
        pgbouncer.resume()
    worker.join(GENEROUS)
    assert result == [1]
    pool.putconn(conn)


def test_server_restart_behind_pgbouncer_is_invisible_to_idle_clients(
    make_pgbouncer: Callable[..., PgBouncer], private_pg_server: ThrowawayServer
) -> None:
    admin = private_pg_server.connect()
    with admin.cursor() as cur:
        cur.execute("CREATE ROLE app LOGIN")
    admin.close()
    bouncer = make_pgbouncer(server=private_pg_server, default_pool_size=2)
    pool = pgctx.ThreadedConnectionPool(2, 2, bouncer.dsn)  # no check
    try:
        with pool.connection() as a, pool.connection(separate=True) as b:
            before = {one(a, "SELECT pg_backend_pid()"), one(b, "SELECT pg_backend_pid()")}
        modes: list[StopMode] = ["fast", "immediate"]
        for mode in modes:
            private_pg_server.restart(mode)
            # precondition, not a pass condition: PgBouncer has seen its servers go
            assert wait_until(partial(holds_none_of, bouncer, before), GENEROUS)
            with pool.connection() as a, pool.connection(separate=True) as b:
                after = {one(a, "SELECT pg_backend_pid()"), one(b, "SELECT pg_backend_pid()")}
            assert not after & before
            before = after
        stats = pool.get_stats()
        assert stats["returns_bad"] == stats["connections_lost"] == 0
        assert stats["connections_num"] == 2  # the same two client connections throughout
    finally:
        pool.closeall()


# -- several processes with several threads each ---------------------------------------

PROCESSES, THREADS, ROUNDS, SERVER_POOL = 3, 4, 20, 3


def _process(dsn: str, proc: int) -> dict[str, Any]:
    """One process: a pgctx pool of THREADS connections to PgBouncer, THREADS threads."""
    pool = pgctx.ThreadedConnectionPool(
        1, THREADS, dsn, timeout=GENEROUS, check=pgctx.check_connection, max_idle=GENEROUS
    )
    barrier = threading.Barrier(THREADS, timeout=GENEROUS)
    pids: set[int] = set()
    errors: list[str] = []

    def work(thread: int) -> None:
        try:
            with pool.connection():
                barrier.wait()  # all THREADS client connections open at once (no query yet)
            for n in range(ROUNDS):
                with pool.connection() as conn, conn.cursor() as cur:
                    cur.execute("INSERT INTO mp_rows VALUES (%s, %s, %s)", (proc, thread, n))
                    cur.execute(
                        "SELECT count(*), pg_backend_pid() FROM mp_rows"
                        " WHERE proc = %s AND thread = %s",
                        (proc, thread),
                    )
                    count, pid = cur.fetchone()
                    pids.add(pid)
                    if count != n + 1:
                        errors.append(f"{proc}/{thread}: round {n} saw {count} rows")
        except Exception as exc:
            errors.append(f"{proc}/{thread}: {exc!r}")

    workers = [threading.Thread(target=work, args=(t,)) for t in range(THREADS)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    stats = pool.get_stats()
    pool.closeall()
    return {"pids": pids, "errors": errors, "clients": stats["connections_num"]}


def test_processes_with_threads_share_a_bounded_number_of_server_connections(
    make_pgbouncer: Callable[..., PgBouncer], server_admin: Any
) -> None:
    bouncer = make_pgbouncer(default_pool_size=SERVER_POOL)
    with psycopg2.connect(bouncer.dsn) as setup, setup.cursor() as cur:
        cur.execute("DROP TABLE IF EXISTS mp_rows")
        cur.execute("CREATE TABLE mp_rows (proc int, thread int, n int, UNIQUE (proc, thread, n))")
    setup.close()
    peak = [0]
    done = threading.Event()

    def sample() -> None:  # the server's view, every few ms, while the processes run
        while not done.is_set():
            peak[0] = max(peak[0], len(server_sessions(server_admin)))
            time.sleep(0.005)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(PROCESSES, mp_context=ctx) as executor:
            futures = [executor.submit(_process, bouncer.dsn, p) for p in range(PROCESSES)]
            results = [f.result(timeout=120) for f in futures]
    finally:
        done.set()
        sampler.join()
    assert [r["errors"] for r in results] == [[]] * PROCESSES
    assert sum(r["clients"] for r in results) == PROCESSES * THREADS  # 12 client connections
    all_pids = set().union(*(r["pids"] for r in results))
    assert 1 <= len(all_pids) <= SERVER_POOL  # ...served by at most 3 server connections
    assert 1 <= peak[0] <= SERVER_POOL
    with psycopg2.connect(bouncer.dsn) as check, check.cursor() as cur:
        cur.execute("SELECT count(*), count(DISTINCT (proc, thread, n)) FROM mp_rows")
        assert cur.fetchone() == (PROCESSES * THREADS * ROUNDS,) * 2
        cur.execute("DROP TABLE mp_rows")
    check.close()
