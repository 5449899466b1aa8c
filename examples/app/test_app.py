"""The to-do app's tests: each runs in a transaction rolled back at its end.

``pgctx_transaction`` binds one connection for the test; the app's decorated
functions, and the blocks the WSGI middleware opens for requests, join it.
"""

from __future__ import annotations

from typing import Any

import todos


def test_add_and_list(pgctx_transaction: Any) -> None:
    assert todos.add_todo("write the docs") is not None
    assert todos.add_todo("write the tests") is not None
    assert todos.open_todos() == ["write the docs", "write the tests"]


def test_each_test_starts_from_the_committed_schema_only(pgctx_transaction: Any) -> None:
    assert todos.open_todos() == []  # the rows of the test above were rolled back


def test_a_duplicate_is_refused_and_the_transaction_goes_on(pgctx_transaction: Any) -> None:
    first = todos.add_todo("once")
    assert todos.add_todo("once") is None  # undone by the app's savepoint
    assert todos.complete(first)
    assert todos.open_todos() == []


def test_data_written_by_the_test_is_seen_by_the_app(pgctx_transaction: Any, client: Any) -> None:
    with pgctx_transaction.cursor() as cur:
        cur.execute("INSERT INTO todos (title) VALUES ('seeded by the test')")
    assert client.get("/todos").get_json() == {"todos": ["seeded by the test"]}


def test_http_api(pgctx_transaction: Any, client: Any) -> None:
    created = client.post("/todos", json={"title": "ship it"})
    assert created.status_code == 201
    assert client.post("/todos", json={"title": "ship it"}).status_code == 409
    assert client.post(f"/todos/{created.get_json()['id']}/done").status_code == 204
    assert client.get("/todos").get_json() == {"todos": []}


def test_nothing_is_visible_outside_the_test(pgctx_transaction: Any, pg_admin: Any) -> None:
    todos.add_todo("uncommitted")
    with pg_admin.cursor() as cur:  # another session: sees committed data only
        cur.execute("SELECT count(*) FROM todos")
        assert cur.fetchone() == (0,)
