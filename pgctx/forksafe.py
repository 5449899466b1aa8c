"""Fork safety: a child process never uses or closes its parent's connections.

A forked child shares the parent's sockets. If the child used one, both
processes would talk on one session; if it merely closed one (explicitly, or
when the connection object is garbage-collected), libpq would send the server
a Terminate message and end the *parent's* session. So, right after a fork,
each pool in the child points its connections' file descriptors at /dev/null
(the parent's sockets stay untouched) and starts afresh. Nothing is checked on
the hot path: ``os.register_at_fork`` runs this once per fork.
"""

from __future__ import annotations

import contextlib
import os
import weakref
from typing import Any, Protocol


class ForkAware(Protocol):
    def _after_fork(self) -> None: ...


_pools: weakref.WeakSet[Any] = weakref.WeakSet()


def track(pool: ForkAware) -> None:
    """Have ``pool._after_fork()`` called in every child forked from now on."""
    _pools.add(pool)


def disown(conn: Any) -> None:
    """Detach this process from ``conn``'s socket without telling the server anything."""
    with contextlib.suppress(Exception):
        fd = conn.fileno()
        devnull = os.open(os.devnull, os.O_RDWR)
        try:
            os.dup2(devnull, fd)  # later writes (even libpq's Terminate) go nowhere
        finally:
            os.close(devnull)


def _reset_pools_in_child() -> None:
    for pool in list(_pools):
        pool._after_fork()


os.register_at_fork(after_in_child=_reset_pools_in_child)
