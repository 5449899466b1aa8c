"""Disconnect classification against real errors from a real server."""

from __future__ import annotations

from typing import Any

import psycopg2
import psycopg2.extensions
import pytest

from pgctx.health import is_broken, is_disconnect
from tests.helpers import unique_app


class Fake(Exception):
    def __init__(self, pgcode: str | None) -> None:
        super().__init__(pgcode)
        self.pgcode = pgcode


@pytest.mark.parametrize(
    ("code", "expected"),
    [
        ("08006", True),  # connection_failure
        ("08003", True),
        ("57P01", True),  # admin_shutdown
        ("57P02", True),
        ("57P03", True),
        ("57014", False),  # query_canceled (statement timeout)
        ("40001", False),  # serialization_failure
        ("40P01", False),  # deadlock
        ("23505", False),
        ("55P03", False),
    ],
)
def test_sqlstate_classification(code: str, expected: bool) -> None:
    assert is_disconnect(Fake(code)) is expected


def test_errors_without_sqlstate() -> None:
    assert is_disconnect(psycopg2.OperationalError("server closed the connection unexpectedly"))
    assert is_disconnect(psycopg2.InterfaceError("connection already closed"))
    assert not is_disconnect(ValueError("application error"))
    assert not is_disconnect(None)


def test_real_errors(dsn: str, pg_server: Any) -> None:
    app = unique_app("health")
    conn = psycopg2.connect(dsn, application_name=app)
    try:
        assert not is_broken(conn)
        with conn.cursor() as cur:
            with pytest.raises(psycopg2.Error) as info:
                cur.execute("SELECT 1/0")
            assert not is_disconnect(info.value, conn)  # INERROR is fine to roll back
            conn.rollback()
            cur.execute("SET statement_timeout = '10ms'")
            with pytest.raises(psycopg2.errors.QueryCanceled) as info:
                cur.execute("SELECT pg_sleep(5)")
            assert not is_disconnect(info.value, conn)
            conn.rollback()
            cur.execute("SELECT 1")  # INTRANS is not broken
            assert not is_broken(conn)
        assert pg_server.terminate_backends(application_name=app) == 1
        with pytest.raises(psycopg2.OperationalError) as info, conn.cursor() as cur:
            cur.execute("SELECT 1")
        assert is_disconnect(info.value, conn)
        assert is_broken(conn)
        assert is_disconnect(ValueError("unrelated"), conn)  # the connection state decides
    finally:
        conn.close()
    assert is_broken(conn)
    assert conn.info.transaction_status == psycopg2.extensions.TRANSACTION_STATUS_UNKNOWN
