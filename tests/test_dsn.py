"""describe_target: what reprs show of the connect arguments, never a secret."""

from __future__ import annotations

import pytest

from pgctx._dsn import describe_target


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
