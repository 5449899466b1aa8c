"""libpq multi-host DSNs and read/write routing, on two throwaway servers.

``second`` stands in for a replica: its database is read-only by default
(``ALTER DATABASE ... SET default_transaction_read_only = on``), and "promoting" it
resets that.  It is not a hot standby (no replication), which the tests use to show
what each ``target_session_attrs`` really checks.  The servers are this module's own,
also when ``PGCTX_TEST_DSN`` is set.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from typing import Any

import psycopg2
import pytest

import pgctx
from pgctx.testing import ThrowawayServer

GENEROUS = 30.0  # seconds; an upper bound for things that take milliseconds


def port_of(conn: Any) -> int:
    with conn.cursor() as cur:
        cur.execute("SELECT inet_server_port()")
        return int(cur.fetchone()[0])


def set_read_only(server: ThrowawayServer, on: bool) -> None:
    conn = server.connect(options="-c default_transaction_read_only=off")
    with conn.cursor() as cur:
        value = "on" if on else "off"
        cur.execute(f"ALTER DATABASE postgres SET default_transaction_read_only = {value}")
    conn.close()


@pytest.fixture(scope="module")
def two() -> Iterator[tuple[ThrowawayServer, ThrowawayServer]]:
    try:
        first = ThrowawayServer()
    except ImportError as exc:
        pytest.skip(str(exc))
    with first, ThrowawayServer() as second:
        yield first, second


@pytest.fixture
def servers(
    two: tuple[ThrowawayServer, ThrowawayServer],
) -> Iterator[tuple[ThrowawayServer, ThrowawayServer]]:
    """(first, second): both running, second read-only, whatever the last test did."""
    for server in two:
        server.start()
    set_read_only(two[1], True)
    yield two
    for server in two:
        server.start()


def multi_dsn(*servers: ThrowawayServer, **params: str) -> str:
    hosts = ",".join(s.host for s in servers)
    ports = ",".join(str(s.port) for s in servers)
    extra = " ".join(f"{k}={v}" for k, v in params.items())
    return f"host={hosts} port={ports} user=postgres dbname=postgres {extra}".strip()


# -- failover --------------------------------------------------------------------------


@pytest.mark.parametrize("check", [pgctx.check_connection, None], ids=["check", "no-check"])
def test_first_host_stopped_the_pool_reaches_the_second(servers: Any, check: Any) -> None:
    first, second = servers
    pool = pgctx.ThreadedConnectionPool(1, 2, multi_dsn(first, second), timeout=5, check=check)
    try:
        with pool.connection() as conn:
            assert port_of(conn) == first.port
        first.stop("fast")
        if check is None:  # the idle connection to the stopped server fails once
            with pytest.raises(psycopg2.OperationalError) as info, pool.connection() as conn:
                port_of(conn)
            assert pgctx.is_disconnect(info.value)
        started = time.monotonic()
        with pool.connection() as conn:
            assert port_of(conn) == second.port
        assert time.monotonic() - started < 5
        stats = pool.get_stats()
        assert (stats["connections_lost"], stats["returns_bad"]) == ((1, 0) if check else (0, 1))
        # The first host is back: new connections go to it again, pooled ones stay.
        first.start()
        with pool.connection() as kept, pool.connection(separate=True) as new:
            assert (port_of(kept), port_of(new)) == (second.port, first.port)
    finally:
        pool.closeall()


def test_read_write_target_waits_for_a_promotion(servers: Any) -> None:
    first, second = servers
    dsn = multi_dsn(first, second, target_session_attrs="read-write")
    pool = pgctx.ThreadedConnectionPool(1, 2, dsn, timeout=2, check=pgctx.check_connection)
    try:
        first.stop("fast")
        with pytest.raises(pgctx.PoolTimeout) as info:
            pool.getconn()  # the second host answers, but is read-only: not a candidate
        assert "read-only" in str(info.value.__cause__)
        set_read_only(second, False)  # "promote" it
        with pool.connection() as conn:
            assert port_of(conn) == second.port
            with conn.cursor() as cur:
                cur.execute("CREATE TEMP TABLE written (v int)")  # writable indeed
    finally:
        pool.closeall()


def test_a_hung_first_host_costs_a_connect_timeout_per_host(servers: Any) -> None:
    """libpq's connect_timeout applies to each host in turn, so the first host can use
    up what pgctx derived from the pool's timeout; an explicit one bounds it per host."""
    first, _ = servers
    with socket.socket() as deaf:  # accepts TCP connections, never answers
        deaf.bind(("127.0.0.1", 0))
        deaf.listen(16)
        host = f"host=127.0.0.1,{first.host} port={deaf.getsockname()[1]},{first.port}"
        base = f"{host} user=postgres dbname=postgres"
        for dsn, options, at_least in [
            (f"{base} connect_timeout=2", {}, 1.5),
            (base, {"timeout": 3}, 2.5),  # connect_timeout=3 for the first host alone
        ]:
            pool = pgctx.ThreadedConnectionPool(0, 1, dsn, **options)
            try:
                started = time.monotonic()
                with pool.connection() as conn:
                    assert port_of(conn) == first.port
                assert at_least <= time.monotonic() - started < GENEROUS
            finally:
                pool.closeall()


# -- what target_session_attrs checks ---------------------------------------------------

ATTRS = [
    ("any", "second"),
    ("read-write", "first"),  # skips the read-only second host
    ("read-only", "second"),
    ("primary", "second"),  # "not a hot standby": a read-only primary qualifies
    ("prefer-standby", "second"),  # no standby at all: falls back to any
    ("standby", None),  # neither is a hot standby
]


@pytest.mark.parametrize(("attrs", "expected"), ATTRS, ids=[a for a, _ in ATTRS])
def test_target_session_attrs(servers: Any, attrs: str, expected: str | None) -> None:
    first, second = servers
    dsn = multi_dsn(second, first, target_session_attrs=attrs)  # the read-only one first
    if expected is None:
        with pytest.raises(psycopg2.OperationalError, match="not in hot standby mode"):
            psycopg2.connect(dsn)
        return
    conn = psycopg2.connect(dsn)
    try:
        assert port_of(conn) == {"first": first, "second": second}[expected].port
    finally:
        conn.close()


@pytest.mark.skipif(psycopg2.__libpq_version__ < 160000, reason="load_balance_hosts: libpq 16")
def test_load_balance_hosts_spreads_new_connections(servers: Any) -> None:
    first, second = servers
    dsn = multi_dsn(first, second, load_balance_hosts="random")
    seen = set()
    for _ in range(30):  # all on one host: probability 2 ** -29
        conn = psycopg2.connect(dsn)
        seen.add(port_of(conn))
        conn.close()
    assert seen == {first.port, second.port}


# -- read/write routing: one pool per server, the registry picks the connection --------


def test_reads_go_to_the_replica_pool_and_writes_to_the_primary_pool(servers: Any) -> None:
    primary_srv, replica_srv = servers
    primary = pgctx.ThreadedConnectionPool(1, 4, primary_srv.dsn, timeout=5)
    replica = pgctx.ThreadedConnectionPool(1, 4, replica_srv.dsn, timeout=5)
    for server in servers:  # the schema exists on both, as it would by replication
        admin = server.connect(options="-c default_transaction_read_only=off")
        with admin.cursor() as cur:
            cur.execute("DROP TABLE IF EXISTS items; CREATE TABLE items (name text)")
        admin.close()

    @pgctx.with_connection(primary)
    def add(name: str, conn: Any = None) -> int:
        with conn.cursor() as cur:
            cur.execute("INSERT INTO items VALUES (%s)", (name,))
        return port_of(conn)

    def reader() -> Any:  # read-your-writes: inside a write block, read from the primary
        return primary if pgctx.in_scope(primary) else replica

    def names() -> tuple[int, list[str]]:
        with reader().connection() as conn, conn.cursor() as cur:
            cur.execute("SELECT coalesce(array_agg(name), '{}') FROM items")
            return port_of(conn), cur.fetchone()[0]

    @pgctx.with_connection(replica)
    def write_on_the_replica() -> None:
        with pgctx.current_connection(replica).cursor() as cur:
            cur.execute("INSERT INTO items VALUES ('x')")

    try:
        assert add("a") == primary_srv.port
        # no replication here: the replica never sees it (lag without an end)
        assert names() == (replica_srv.port, [])
        with primary.connection() as conn:
            assert add("b") == primary_srv.port  # joins this block
            assert names() == (primary_srv.port, ["a", "b"])  # own uncommitted write
            with replica.connection() as other:  # another pool: its own connection
                assert other is not conn and pgctx.current_connection(primary) is conn
        with pytest.raises(psycopg2.errors.ReadOnlySqlTransaction):
            write_on_the_replica()
        assert replica.get_stats()["checked_out"] == primary.get_stats()["checked_out"] == 0
    finally:
        primary.closeall()
        replica.closeall()
