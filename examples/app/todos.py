"""A tiny to-do app on pgctx: data functions with @pgctx.with_connection, a Flask API.

The functions use the default pool (``pgctx.set_default_pool``); ``create_app(pool)``
serves them with one lazily checked-out connection per request. Its tests, in
``test_app.py``, use the fixtures of pgctx's pytest plugin: every test runs in a
transaction that is rolled back at its end.

Run the tests:  pytest examples/app
"""

from __future__ import annotations

from typing import Any

import psycopg2.errors
from flask import Flask, jsonify, request

import pgctx
from pgctx.contrib.wsgi import ConnectionMiddleware

SCHEMA = """
CREATE TABLE IF NOT EXISTS todos (
    id serial PRIMARY KEY,
    title text NOT NULL UNIQUE,
    done boolean NOT NULL DEFAULT false
)
"""


@pgctx.with_connection
def create_schema(conn: Any = None) -> None:
    with conn.cursor() as cur:
        cur.execute(SCHEMA)


@pgctx.with_connection
def add_todo(title: str, conn: Any = None) -> int | None:
    """Add a to-do; None if one with this title exists already."""
    try:
        # The savepoint undoes only the failed INSERT, so the unit of work goes on.
        with pgctx.savepoint(), conn.cursor() as cur:
            cur.execute("INSERT INTO todos (title) VALUES (%s) RETURNING id", (title,))
            return int(cur.fetchone()[0])
    except psycopg2.errors.UniqueViolation:
        return None


@pgctx.with_connection
def complete(todo_id: int, conn: Any = None) -> bool:
    with conn.cursor() as cur:
        cur.execute("UPDATE todos SET done = true WHERE id = %s AND NOT done", (todo_id,))
        return bool(cur.rowcount)


@pgctx.with_connection
def open_todos(conn: Any = None) -> list[str]:
    with conn.cursor() as cur:
        cur.execute("SELECT title FROM todos WHERE NOT done ORDER BY id")
        return [title for (title,) in cur.fetchall()]


def create_app(pool: Any) -> Flask:
    app = Flask(__name__)

    @app.post("/todos")
    def post_todo() -> Any:
        todo_id = add_todo(request.get_json()["title"])
        if todo_id is None:
            return jsonify(error="duplicate title"), 409
        return jsonify(id=todo_id), 201

    @app.post("/todos/<int:todo_id>/done")
    def post_done(todo_id: int) -> Any:
        return ("", 204) if complete(todo_id) else (jsonify(error="no such open to-do"), 404)

    @app.get("/todos")
    def get_todos() -> Any:
        return jsonify(todos=open_todos())

    app.wsgi_app = ConnectionMiddleware(app.wsgi_app, pool)  # type: ignore[method-assign]
    return app
