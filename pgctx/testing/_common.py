"""What throwaway and existing test servers share."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from psycopg2.extensions import connection as Connection

__all__ = ["ExistingServer", "PgServer", "ServerError", "mask_dsn"]

_PASSWORD_KV = re.compile(r"(password\s*=\s*)('(?:[^'\\]|\\.)*'|\S+)", re.IGNORECASE)
_PASSWORD_URL = re.compile(r"(://[^:/@\s]*:)[^@/\s]*@")


def mask_dsn(dsn: str) -> str:
    """Return *dsn* with any password replaced by ``***`` (for reprs and messages)."""
    return _PASSWORD_URL.sub(r"\1***@", _PASSWORD_KV.sub(r"\1***", dsn))


class ServerError(RuntimeError):
    """The throwaway server failed to initialise, start or stop."""


class PgServer:
    """A PostgreSQL server reachable by ``dsn``, with helpers for tests."""

    @property
    def dsn(self) -> str:
        raise NotImplementedError

    def connect(self, **kwargs: Any) -> Connection:
        """An autocommit superuser connection (keyword args go to psycopg2.connect)."""
        return _connect(self.dsn, **kwargs)

    def terminate_backends(self, application_name: str | None = None) -> int:
        """pg_terminate_backend() other client backends, or only those of application_name.

        Returns how many.  On a shared server pass application_name to spare other sessions.
        """
        sql = (
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
            " WHERE pid <> pg_backend_pid() AND backend_type = 'client backend'"
        )
        if application_name is not None:
            sql += " AND application_name = %(app)s"
        conn = self.connect()
        try:
            with conn.cursor() as cur:
                cur.execute(sql, {"app": application_name})
                row = cur.fetchone()
                return int(row[0]) if row else 0
        finally:
            conn.close()


class ExistingServer(PgServer):
    """An already running server given by DSN (``PGCTX_TEST_DSN``): no stop or restart."""

    def __init__(self, dsn: str) -> None:
        self._dsn = dsn

    @property
    def dsn(self) -> str:
        return self._dsn

    @property
    def socket_dsn(self) -> str:
        return self._dsn

    def __repr__(self) -> str:
        return f"<ExistingServer {mask_dsn(self._dsn)!r}>"


def _connect(dsn: str, **kwargs: Any) -> Connection:
    import psycopg2

    conn: Connection = psycopg2.connect(dsn, **kwargs)
    conn.autocommit = True
    return conn
