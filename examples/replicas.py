"""Read/write routing: writes through the primary's pool, reads through a replica's.

Run: python examples/replicas.py [--two-servers]
Uses PGCTX_DSN or DATABASE_URL for both pools when set.  Otherwise (or with
--two-servers) it starts two throwaway servers; the second is read-only to stand in
for a replica.  Nothing replicates to it: the example copies the rows itself, late, as
streaming replication would after some lag.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from typing import Any

import psycopg2

import pgctx
from pgctx.testing import ThrowawayServer, dsn_from_env

SCHEMA = "DROP TABLE IF EXISTS demo_orders; CREATE TABLE demo_orders (id int, item text)"


class Database:
    """The two pools of the application, created at startup."""

    def __init__(self, primary_dsn: str, replica_dsn: str) -> None:
        self.primary = pgctx.ThreadedConnectionPool(
            1, 4, primary_dsn, timeout=5, application_name="replicas-example-rw"
        )
        # BEGIN READ ONLY on every transaction: a write sent here by mistake fails even
        # when the "replica" is the primary itself (one DSN in the environment).
        self.replica = pgctx.ThreadedConnectionPool(
            1,
            4,
            replica_dsn,
            timeout=5,
            application_name="replicas-example-ro",
            configure=lambda conn: conn.set_session(readonly=True),
        )

    def reading(self) -> pgctx.ThreadedConnectionPool:
        """The pool to read from: the primary inside a write block (read-your-writes)."""
        return self.primary if pgctx.in_scope(self.primary) else self.replica

    def close(self) -> None:
        self.primary.closeall()
        self.replica.closeall()


db: Database  # set in main()


def server_port(conn: Any) -> int:
    with conn.cursor() as cur:
        cur.execute("SELECT inet_server_port()")
        return int(cur.fetchone()[0])


def add_order(order_id: int, item: str) -> None:
    # Writes always go to the primary; nested calls join the caller's block.
    with db.primary.connection() as conn, conn.cursor() as cur:
        cur.execute("INSERT INTO demo_orders VALUES (%s, %s)", (order_id, item))


def list_orders() -> tuple[int, list[str]]:
    with db.reading().connection() as conn, conn.cursor() as cur:
        cur.execute("SELECT item FROM demo_orders ORDER BY id")
        return server_port(conn), [item for (item,) in cur.fetchall()]


def report() -> int:
    # A decorated reader: the decorator takes the replica pool explicitly.
    @pgctx.with_connection(db.replica)
    def count(conn: Any = None) -> int:
        with conn.cursor() as cur:
            cur.execute("SELECT count(*) FROM demo_orders")
            return int(cur.fetchone()[0])

    return count()


def replicate(primary_dsn: str, replica_dsn: str) -> None:
    """Stand-in for streaming replication: copy the table to the replica (late)."""
    src = psycopg2.connect(primary_dsn)
    dst = psycopg2.connect(replica_dsn, options="-c default_transaction_read_only=off")
    try:
        with src.cursor() as read, dst.cursor() as write:
            read.execute("SELECT id, item FROM demo_orders")
            write.execute("DELETE FROM demo_orders")
            write.executemany("INSERT INTO demo_orders VALUES (%s, %s)", read.fetchall())
        dst.commit()
    finally:
        src.close()
        dst.close()


def main(primary_dsn: str, replica_dsn: str) -> None:
    global db
    separate = primary_dsn != replica_dsn
    for dsn in {primary_dsn, replica_dsn}:  # the schema, on the replica "by replication"
        admin = psycopg2.connect(dsn, options="-c default_transaction_read_only=off")
        with admin, admin.cursor() as cur:
            cur.execute(SCHEMA)
        admin.close()
    db = Database(primary_dsn, replica_dsn)
    try:
        add_order(1, "apple")
        port, items = list_orders()
        print(f"read from port {port} right after the write: {items}")
        if separate:
            assert items == [], "the stand-in replica has not caught up yet"
            replicate(primary_dsn, replica_dsn)
            port, items = list_orders()
            print(f"read from port {port} after replication: {items}")
        assert items == ["apple"]

        with db.primary.connection() as conn:  # a unit of work that writes, then reads
            add_order(2, "pear")
            port, items = list_orders()  # reading() picks the primary: sees its own write
            assert port == server_port(conn) and items == ["apple", "pear"]
            print(f"inside the write block, read from port {port}: {items}")

        try:
            with db.replica.connection() as conn, conn.cursor() as cur:
                cur.execute("INSERT INTO demo_orders VALUES (3, 'plum')")
        except psycopg2.errors.ReadOnlySqlTransaction as exc:
            print("a write through the replica pool fails:", str(exc).strip())
        else:
            raise AssertionError("the replica pool accepted a write")
        print("replica count:", report())
    finally:
        db.close()
        for dsn in {primary_dsn, replica_dsn}:
            admin = psycopg2.connect(dsn, options="-c default_transaction_read_only=off")
            with admin, admin.cursor() as cur:
                cur.execute("DROP TABLE demo_orders")
            admin.close()


@contextlib.contextmanager
def two_servers() -> Iterator[tuple[str, str]]:
    with (
        ThrowawayServer() as primary,
        ThrowawayServer(settings={"default_transaction_read_only": True}) as replica,
    ):
        yield primary.dsn, replica.dsn


if __name__ == "__main__":
    env_dsn = None if "--two-servers" in sys.argv[1:] else dsn_from_env()
    if env_dsn is not None:
        main(env_dsn, env_dsn)
    else:
        with two_servers() as (primary_dsn, replica_dsn):
            main(primary_dsn, replica_dsn)
