"""with-blocks: units of work, nesting, savepoints, separate connections.

Run: python examples/with_blocks.py
Uses PGCTX_DSN or DATABASE_URL when set, else starts a throwaway server.
"""

from __future__ import annotations

import psycopg2

import pgctx
from pgctx.testing import throwaway_or_env


def main(dsn: str) -> None:
    pool = pgctx.ThreadedConnectionPool(1, 4, dsn, timeout=10)
    try:
        with pool.connection() as conn, conn.cursor() as cur:
            cur.execute("DROP TABLE IF EXISTS accounts")
            cur.execute("CREATE TABLE accounts (name text PRIMARY KEY, balance int)")
        # Clean exit: committed.

        with pool.connection() as conn:
            with conn.cursor() as cur:
                cur.execute("INSERT INTO accounts VALUES ('alice', 100), ('bob', 0)")
            with pool.connection() as same:  # nested: joins, commits nothing itself
                assert same is conn
                with same.cursor() as cur:
                    cur.execute("UPDATE accounts SET balance = balance + 10 WHERE name='bob'")
        # Both statements committed together by the outermost block.

        try:
            with pool.connection() as conn, conn.cursor() as cur:
                cur.execute("UPDATE accounts SET balance = 0")
                raise RuntimeError("something went wrong")
        except RuntimeError:
            print("rolled back; the connection went back to the pool")

        with pool.connection() as conn:
            try:
                with pgctx.savepoint(pool), conn.cursor() as cur:
                    cur.execute("INSERT INTO accounts VALUES ('alice', 1)")  # duplicate
            except psycopg2.errors.UniqueViolation:
                print("duplicate ignored inside a savepoint; the unit of work goes on")
            with conn.cursor() as cur:
                cur.execute("INSERT INTO accounts VALUES ('carol', 5)")

        try:
            with pool.connection():
                try:
                    with pool.connection():
                        raise ValueError("inner block failed")
                except ValueError:
                    pass  # swallowed: the outer block must not commit as if all went well
        except pgctx.TransactionAborted as exc:
            print("outer block refused to commit:", type(exc.__cause__).__name__)

        with pool.connection() as conn, conn.cursor() as cur:
            cur.execute("SELECT name, balance FROM accounts ORDER BY name")
            print(cur.fetchall())
            with pool.connection(separate=True) as audit, audit.cursor() as acur:
                acur.execute("SELECT count(*) FROM accounts")  # its own transaction
            cur.execute("DROP TABLE accounts")
    finally:
        pool.closeall()


if __name__ == "__main__":
    with throwaway_or_env() as dsn:
        main(dsn)
