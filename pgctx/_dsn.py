"""Describe connection arguments without ever showing a password."""

from __future__ import annotations

from typing import Any

from pgctx._driver import extensions

_SECRET_KEYS = frozenset({"password", "passfile", "sslpassword"})
_SHOWN_KEYS = ("host", "hostaddr", "port", "dbname", "user", "application_name")


def describe_target(args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
    """Return 'host=... dbname=...' for the arguments a pool passes to connect().

    Only a few harmless keys are shown; secrets are never included, even when
    the DSN cannot be parsed (then it is not shown at all).
    """
    params: dict[str, Any] = {}
    dsn = args[0] if args else kwargs.get("dsn")
    if isinstance(dsn, str) and dsn:
        try:
            params.update(extensions.parse_dsn(dsn))
        except Exception:
            return "<unparseable dsn>"
    params.update({k: v for k, v in kwargs.items() if k != "dsn"})
    shown = [f"{k}={params[k]}" for k in _SHOWN_KEYS if k in params and k not in _SECRET_KEYS]
    return " ".join(shown) or "<libpq defaults>"
