"""A Flask app with one lazily checked-out connection per request.

Run:  python examples/flask_app.py          (serves on http://127.0.0.1:5000)
      python examples/flask_app.py --check  (a few requests through the test client)
Uses PGCTX_DSN or DATABASE_URL when set, else starts a throwaway server.
"""

from __future__ import annotations

import sys
from typing import Any

from flask import Flask, jsonify, request

import pgctx
from pgctx.contrib.wsgi import ConnectionMiddleware
from pgctx.testing import throwaway_or_env


@pgctx.with_connection
def add_item(name: str, conn: Any = None) -> int:
    with conn.cursor() as cur:
        cur.execute("INSERT INTO items (name) VALUES (%s) RETURNING id", (name,))
        return int(cur.fetchone()[0])


@pgctx.with_connection
def list_items(conn: Any = None) -> list[str]:
    with conn.cursor() as cur:
        cur.execute("SELECT name FROM items ORDER BY id")
        return [name for (name,) in cur.fetchall()]


def create_app(pool: Any) -> Flask:
    app = Flask(__name__)

    @app.post("/items")
    def post_item() -> Any:
        item_id = add_item(request.get_json()["name"])  # committed when it returns
        return jsonify(id=item_id), 201

    @app.get("/items")
    def get_items() -> Any:
        return jsonify(items=list_items())

    # Each request: its own copied context and pool.scope(); the connection is
    # checked out on first use and put away when the response is closed.
    app.wsgi_app = ConnectionMiddleware(app.wsgi_app, pool)  # type: ignore[method-assign]
    return app


def main(dsn: str, check: bool) -> None:
    pool = pgctx.ThreadedConnectionPool(1, 8, dsn, timeout=10)
    pgctx.set_default_pool(pool)
    try:
        with pool.connection() as conn, conn.cursor() as cur:
            cur.execute("DROP TABLE IF EXISTS items")
            cur.execute("CREATE TABLE items (id serial PRIMARY KEY, name text)")
        app = create_app(pool)
        if check:
            client = app.test_client()
            assert client.post("/items", json={"name": "apple"}).status_code == 201
            assert client.get("/items").get_json()["items"] == ["apple"]
            print("ok")
        else:
            app.run(host="127.0.0.1", port=5000, threaded=True)
    finally:
        pool.closeall()


if __name__ == "__main__":
    with throwaway_or_env() as dsn:
        main(dsn, "--check" in sys.argv)
