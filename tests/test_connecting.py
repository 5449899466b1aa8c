"""Connect defaults for bounded waits, and the reconnect backoff."""

from __future__ import annotations

import time
from typing import Any

import psycopg2
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pgctx.connecting import (
    BACKOFF_FIRST,
    BACKOFF_MAX,
    LIBPQ_INT_MAX,
    Backoff,
    ConnectParams,
    check_connect_arguments,
)
from pgctx.pool import ThreadedConnectionPool
from pgctx.waiting import MAX_SECONDS
from tests.helpers import unique_app, wait_backends


def test_defaults_fill_only_what_the_user_left_unset() -> None:
    params = ConnectParams(("host=db connect_timeout=7",), {"keepalives_idle": 99}, 3.5)
    kwargs = params.for_deadline(time.monotonic() + 30)
    assert "connect_timeout" not in kwargs  # set in the DSN: libpq's value stands
    assert kwargs["keepalives_idle"] == 99
    assert kwargs["keepalives"] == 1 and kwargs["tcp_user_timeout"] == 5000
    uri = ConnectParams(("postgresql://db/app?tcp_user_timeout=100",), {}, 30)
    assert "tcp_user_timeout" not in uri.for_deadline(None)


def test_connect_timeout_is_what_the_caller_has_left() -> None:
    params = ConnectParams(("host=db",), {}, None)
    assert "keepalives" not in params.for_deadline(None)  # no timeout: psycopg2's behaviour
    assert "connect_timeout" not in params.for_deadline(None)
    assert params.for_deadline(time.monotonic() + 29.5)["connect_timeout"] == 30
    assert params.for_deadline(time.monotonic() + 0.1)["connect_timeout"] == 2  # libpq minimum


def test_a_bad_dsn_gets_no_defaults() -> None:
    assert ConnectParams(("this is not a dsn",), {"a": 1}, 5).for_deadline(None) == {"a": 1}


def test_misspelt_options_fail_at_construction(dsn: str) -> None:
    with pytest.raises(psycopg2.ProgrammingError, match='invalid connection option "timout"') as e:
        ThreadedConnectionPool(0, 1, dsn, timout=1)
    assert "pgctx's own options are timeout" in str(e.value)
    check_connect_arguments((dsn,), {"cursor_factory": None, "connection_factory": None})


def test_the_pool_connects_with_the_defaults_only_when_waiting(dsn: str) -> None:
    waiting = ThreadedConnectionPool(0, 1, dsn, application_name=unique_app(), timeout=4)
    plain = ThreadedConnectionPool(0, 1, dsn, application_name=unique_app())
    try:
        conn = waiting.getconn()
        params = conn.get_dsn_parameters()
        assert params.get("connect_timeout") in ("4", "5") and params.get("keepalives") == "1"
        assert "connect_timeout" not in plain.getconn().get_dsn_parameters()
    finally:
        waiting.closeall()
        plain.closeall()


def test_backoff_grows_and_respects_the_deadline(monkeypatch: pytest.MonkeyPatch) -> None:
    pauses: list[float] = []
    monkeypatch.setattr(time, "sleep", pauses.append)
    backoff = Backoff()
    for _ in range(10):
        assert backoff.pause(time.monotonic() + 3600)
    assert BACKOFF_FIRST * 0.5 <= pauses[0] <= BACKOFF_FIRST * 1.5
    assert pauses[3] > pauses[0]
    assert max(pauses) <= BACKOFF_MAX * 1.5
    assert not Backoff().pause(time.monotonic() - 1)  # no time left: no pause


@settings(max_examples=200, deadline=None)
@given(timeout=st.floats(0, MAX_SECONDS) | st.sampled_from([24.9 * 86400, 30 * 86400, MAX_SECONDS]))
def test_derived_options_stay_within_what_libpq_accepts(timeout: float) -> None:
    """libpq reads integer options into a C int: a derived value beyond it fails every connect."""
    params = ConnectParams(("host=db",), {}, timeout)
    for deadline in (None, time.monotonic() + timeout):
        kwargs = params.for_deadline(deadline)
        assert 5000 <= kwargs["tcp_user_timeout"] <= LIBPQ_INT_MAX
        if deadline is not None:
            assert 2 <= kwargs["connect_timeout"] <= LIBPQ_INT_MAX


@pytest.mark.parametrize("timeout", [24.9 * 86400, 30 * 86400, 10**9, MAX_SECONDS])
def test_a_pool_with_a_very_long_timeout_connects(dsn: str, pg_admin: Any, timeout: float) -> None:
    """Before, the derived tcp_user_timeout overflowed: the constructor failed with a
    puzzling libpq error, and with minconn=0 every getconn retried until its deadline."""
    app = unique_app()
    pool = ThreadedConnectionPool(1, 2, dsn, application_name=app, timeout=timeout)
    try:
        conn = pool.getconn(timeout=5)
        other = pool.getconn(timeout=5)  # a new connect, bounded by the caller's 5 s
        for c in (conn, other):
            assert int(c.get_dsn_parameters()["tcp_user_timeout"]) <= LIBPQ_INT_MAX
        pool.putconn(conn)
        pool.putconn(other)
        assert wait_backends(pg_admin, app, 1) == 1  # minconn=1: the other one was closed
    finally:
        pool.closeall()
