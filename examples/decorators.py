"""@with_connection on functions, methods, generators and coroutines.

Run: python examples/decorators.py
Uses PGCTX_DSN or DATABASE_URL when set, else starts a throwaway server.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pgctx
from pgctx.testing import throwaway_or_env


@pgctx.with_connection
def create_schema(conn: Any = None) -> None:
    with conn.cursor() as cur:
        cur.execute("DROP TABLE IF EXISTS notes")
        cur.execute("CREATE TABLE notes (id serial PRIMARY KEY, body text)")


@pgctx.with_connection
def add_note(body: str) -> int:
    # No `conn` parameter: ask the registry for the connection of this block.
    with pgctx.current_connection().cursor() as cur:
        cur.execute("INSERT INTO notes (body) VALUES (%s) RETURNING id", (body,))
        return int(cur.fetchone()[0])


@pgctx.with_connection
def add_many(bodies: list[str], conn: Any = None) -> list[int]:
    return [add_note(b) for b in bodies]  # nested calls share this transaction


@pgctx.with_connection
def all_notes(conn: Any = None) -> Iterator[str]:
    # The connection is held from the first next() until the generator ends.
    with conn.cursor() as cur:
        cur.execute("SELECT body FROM notes ORDER BY id")
        for (body,) in cur:
            yield body


class NoteRepository:
    @pgctx.with_connection
    def count(self, conn: Any = None) -> int:
        with conn.cursor() as cur:
            cur.execute("SELECT count(*) FROM notes")
            return int(cur.fetchone()[0])

    @pgctx.with_connection  # above @classmethod
    @classmethod
    def latest(cls, conn: Any = None) -> str:
        with conn.cursor() as cur:
            cur.execute("SELECT body FROM notes ORDER BY id DESC LIMIT 1")
            return str(cur.fetchone()[0])


@pgctx.with_connection
async def count_async(conn: Any = None) -> int:
    # psycopg2 blocks: keep queries short in coroutines, or hand work to a thread.
    total = await asyncio.to_thread(NoteRepository().count)  # joins this block
    return total


def main(dsn: str) -> None:
    pool = pgctx.ThreadedConnectionPool(1, 4, dsn, timeout=10)
    pgctx.set_default_pool(pool)
    try:
        create_schema()
        print("ids", add_many(["first", "second", "third"]))
        print("notes", list(all_notes()))
        print("count", NoteRepository().count(), "latest", NoteRepository.latest())
        print("async count", asyncio.run(count_async()))
        with pool.connection() as conn:  # an explicit connection is respected too
            print("explicit", NoteRepository().count(conn=conn))
        create_schema()
    finally:
        pgctx.set_default_pool(None)
        pool.closeall()


if __name__ == "__main__":
    with throwaway_or_env() as dsn:
        main(dsn)
