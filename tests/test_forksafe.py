"""disown(): a forked child detaches from a connection without ending the parent's session."""

from __future__ import annotations

import os
from typing import Any

import psycopg2
import pytest

from pgctx import forksafe


def _pid(conn: Any) -> int:
    with conn.cursor() as cur:
        cur.execute("SELECT pg_backend_pid()")
        (pid,) = cur.fetchone()
    conn.rollback()
    return int(pid)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_child_closing_a_disowned_connection_leaves_the_parents_session(dsn: str) -> None:
    conn = psycopg2.connect(dsn)
    try:
        pid = _pid(conn)
        child = os.fork()
        if child == 0:  # the child: disown, then close and exit as careless code would
            forksafe.disown(conn)
            try:
                conn.close()
            finally:
                os._exit(0)
        _, status = os.waitpid(child, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert _pid(conn) == pid  # the parent's session survived the child's close
    finally:
        conn.close()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_without_disown_a_childs_close_ends_the_parents_session(dsn: str) -> None:
    """Why disown exists: libpq's Terminate message goes to the shared socket."""
    conn = psycopg2.connect(dsn)
    try:
        _pid(conn)
        child = os.fork()
        if child == 0:
            try:
                conn.close()
            finally:
                os._exit(0)
        os.waitpid(child, 0)
        with pytest.raises(psycopg2.OperationalError):
            _pid(conn)
    finally:
        conn.close()
