"""describe_target: what reprs show of the connect arguments, never a secret."""

from __future__ import annotations

import logging
import os
import re
import traceback
from typing import Any
from urllib.parse import quote

import psycopg2
import psycopg2.extensions
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from psycopg2.extensions import make_dsn

from pgctx._dsn import Secrets, describe_target, misreads_password, redact, secrets_of
from pgctx.connecting import check_connect_arguments
from pgctx.pool import ThreadedConnectionPool
from tests.faults.proxy import FaultProxy
from tests.helpers import unique_app


@pytest.mark.parametrize(
    ("args", "kwargs", "shown"),
    [
        (("host=db port=5433 dbname=app user=me password=hunter2",), {}, "host=db port=5433"),
        (("postgresql://me:hunter2@db:5433/app",), {}, "dbname=app user=me"),
        ((), {"dsn": "dbname=app", "password": "hunter2"}, "dbname=app"),
        ((), {"host": "db", "password": "hunter2", "sslpassword": "hunter2"}, "host=db"),
        (("password=hunter2",), {}, "<libpq defaults>"),
        (("not a dsn hunter2",), {}, "<unparseable dsn>"),
    ],
)
def test_targets_never_show_secrets(
    args: tuple[str, ...], kwargs: dict[str, str], shown: str
) -> None:
    text = describe_target(args, kwargs)
    assert shown in text
    assert "hunter2" not in text
    assert "password" not in text


# -- wording errors about connect arguments -------------------------------------------------


@pytest.mark.parametrize(
    ("dsn", "secret"),
    [
        ("postgresql://u:p%ss@host/db", "p%ss"),
        ("postgresql://u@host/db?password=p%zz0rd", "p%zz0rd"),
        ("host=h password=abc d3f-gh1", "d3f-gh1"),
    ],
)
def test_secrets_of_an_unparseable_dsn_are_guessed_and_masked(dsn: str, secret: str) -> None:
    with pytest.raises(psycopg2.ProgrammingError) as info:
        psycopg2.extensions.parse_dsn(dsn)
    assert secret in str(info.value) or secret.split()[-1] in str(info.value)  # libpq's echo
    assert secret not in redact(str(info.value), secrets_of((dsn,), {}))


@pytest.mark.parametrize(
    "dsn",
    [
        "postgresql://u:p@Qx7Zq@host/db",  # host 'Qx7Zq@host'
        "postgresql://u:pa/Qx7Zq@host/db",  # host 'u', port 'pa', dbname 'Qx7Zq@host/db'
        "postgresql://u:/Qx7Zq@host/db",  # host 'u', dbname 'Qx7Zq@host/db'
        "postgresql://u:123/Qx7Zq@host/db",  # host 'u', port '123', dbname 'Qx7Zq@host/db'
        "postgresql://u:123@Qx7Zq/Z9@host/db",  # host 'Qx7Zq' (an IPv4 number!), dbname 'Z9@...'
        "postgresql://u:pw@host/db@x",  # a database name with '@' is written db%40x
    ],
)
def test_a_uri_whose_password_libpq_misreads_is_refused(dsn: str) -> None:
    assert misreads_password(dsn, psycopg2.extensions.parse_dsn(dsn))
    with pytest.raises(psycopg2.ProgrammingError, match="must be percent-encoded") as info:
        check_connect_arguments((dsn,), {})
    assert "Qx7Zq" not in str(info.value)
    assert "Qx7Zq" not in describe_target((dsn,), {})


@pytest.mark.parametrize(
    "dsn",
    [
        "postgresql://u:p%40ss@host/db",
        "postgresql://u:pa:ss@h1:5432,h2:5433/db",
        "postgresql://u:p?s#s@host/db",
        "postgresql://u:pw@%2Fvar%2Frun/db",
        "postgresql:///db?host=/tmp&port=5433",
        "postgresql://u:pw@host/db%40x",  # a database name with '@'
        "postgresql://u:pw@host/db?application_name=a@b",  # "@" in the query string
    ],
)
def test_well_formed_uris_are_accepted(dsn: str) -> None:
    assert not misreads_password(dsn, psycopg2.extensions.parse_dsn(dsn))
    check_connect_arguments((dsn,), {})


def test_invalid_utf8_in_a_uri_gets_a_clear_error() -> None:
    with pytest.raises(psycopg2.ProgrammingError, match="not valid UTF-8"):
        check_connect_arguments(("postgresql://u:%E2%28%A1@h/d",), {})


def test_redact_masks_secrets_and_leaves_other_messages_alone() -> None:
    text = 'invalid connection option "timout"'
    assert redact(text, Secrets(("hunter2",), ("hunter2",))) == text
    assert redact(text, Secrets()) == text
    assert redact('token: "x%hunter2"', Secrets(("hunter2",))) == 'token: "x%***"'
    # a guessed secret: any 4 characters of it in a row are masked, wherever they are
    assert redact('token: "hunter2@host"', Secrets((), ("p:hunter2",))) == 'token: "***@host"'
    assert redact("ab", Secrets((), ("ab",))) == "ab"  # too short to tell anything


# -- no password in any error, log record or repr of a pool ------------------------------

CHUNK = st.text(alphabet="ABCDEFGHJKMNPQRSTUVWXYZ23456789", min_size=6, max_size=6)
SEPARATORS = st.sampled_from(
    ["%", "@", "/", ":", "'", '"', " ", "\\", "=", "?", "#", "&", "é", "€"]
)
PASSWORDS = st.lists(st.tuples(CHUNK, SEPARATORS), min_size=1, max_size=3).map(
    lambda parts: "".join(chunk + sep for chunk, sep in parts) + "Z9"
)
FORMS = ["kv-dsn", "kv-kwarg", "kv-raw", "uri-raw", "uri-encoded", "uri-query", "uri-kwarg"]


def connect_arguments(form: str, password: str, target: dict[str, str]) -> Any:
    host, port, user, db = (target[k] for k in ("host", "port", "user", "dbname"))
    encoded = quote(password, safe="")
    uri = f"postgresql://{user}@{host}:{port}/{db}"
    return {
        "kv-dsn": ((make_dsn(host=host, port=port, user=user, dbname=db, password=password),), {}),
        "kv-kwarg": (
            (make_dsn(host=host, port=port, user=user, dbname=db),),
            {"password": password},
        ),
        "kv-raw": ((f"host={host} port={port} user={user} dbname={db} password={password}",), {}),
        "uri-raw": ((f"postgresql://{user}:{password}@{host}:{port}/{db}",), {}),
        "uri-encoded": ((f"postgresql://{user}:{encoded}@{host}:{port}/{db}",), {}),
        "uri-query": ((f"{uri}?password={encoded}",), {}),
        "uri-kwarg": ((uri,), {"password": password}),
    }[form]


def texts_of(exc: BaseException) -> str:
    return "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))


@settings(
    max_examples=int(os.environ.get("PGCTX_DSN_EXAMPLES", "40")),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(password=PASSWORDS, form=st.sampled_from(FORMS))
def test_no_password_in_errors_logs_or_reprs(
    dsn: str, caplog: pytest.LogCaptureFixture, password: str, form: str
) -> None:
    """Constructor errors, connect errors, PoolTimeout's "last error", the refill's log
    records and reprs, for key/value DSNs and URIs, with the password in the DSN and in
    password=. Connects go through a proxy that is switched to refusing connections."""
    shown: list[str] = []
    with FaultProxy(dsn) as proxy:
        target = {
            **psycopg2.extensions.parse_dsn(dsn),
            "host": "127.0.0.1",
            "port": str(proxy.port),
        }
        args, kwargs = connect_arguments(form, password, target)
        kwargs["application_name"] = unique_app("dsn")
        caplog.clear()
        with caplog.at_level(logging.DEBUG, logger="pgctx"):
            pools = []
            try:
                for minconn, timeout in ((1, 0.1), (0, None)):
                    pools.append(
                        ThreadedConnectionPool(minconn, 2, *args, timeout=timeout, **kwargs)
                    )
            except (psycopg2.Error, ValueError) as exc:  # e.g. an invalid or misread URI
                event(f"{form}: refused at construction")
                shown.append(texts_of(exc))
            proxy.set_mode("refuse")
            for pool in pools:
                shown += [repr(pool), pool._label, str(pool.get_stats())]
                for conn in list(pool._pool):
                    pool._pool.remove(conn)
                    pool._close(conn)
                pool._maintain()  # the refill fails and logs it
                try:
                    pool.getconn()
                except psycopg2.Error as exc:  # PoolTimeout, or libpq's error at once
                    shown.append(texts_of(exc))
                pool.closeall()
        formatter = logging.Formatter("%(message)s %(pgctx_pool)s")
        for record in caplog.records:
            shown.append(formatter.format(record) if hasattr(record, "pgctx_pool") else "")
            shown.append(logging.Formatter().format(record))
    text = "\n".join(shown)
    assert text  # something was said
    assert password not in text
    assert quote(password, safe="") not in text
    if form != "kv-raw":  # a raw key/value DSN is read as other options: fragments show
        for chunk in re.findall(r"[A-Z0-9]{6}", password):
            assert chunk not in text, f"part of the password shows: {chunk}"
