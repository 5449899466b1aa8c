"""Pool statistics: plain counters bumped under the pool lock, cheap enough to keep on.

Names follow psycopg_pool's ``get_stats()`` where the meaning is the same.
"""

from __future__ import annotations


class PoolStats:
    """Monotonic counters of one pool (gauges are computed by ``get_stats``)."""

    __slots__ = (
        "connections_discarded",
        "connections_errors",
        "connections_lost",
        "connections_ms",
        "connections_num",
        "connections_recycled",
        "leaks_reported",
        "requests_errors",
        "requests_num",
        "requests_queued",
        "requests_timeouts",
        "requests_wait_ms",
        "returns_bad",
    )

    def __init__(self) -> None:
        self.requests_num = 0  # getconn calls
        self.requests_queued = 0  # ... that had to wait
        self.requests_wait_ms = 0.0  # total time spent waiting
        self.requests_timeouts = 0  # ... that ended in PoolTimeout
        self.requests_errors = 0  # refused: TooManyWaiters
        self.returns_bad = 0  # returned broken, or whose rollback/reset failed
        self.connections_num = 0  # opened
        self.connections_ms = 0.0  # total time spent connecting
        self.connections_errors = 0  # failed connects (and failed configure)
        self.connections_lost = 0  # found broken: closed while idle, failed check
        self.connections_discarded = 0  # closed by the pool: close=True, beyond the idle limit
        self.connections_recycled = 0  # closed for max_lifetime or max_idle
        self.leaks_reported = 0  # leak_timeout reports

    def as_dict(self) -> dict[str, float]:
        return {name: getattr(self, name) for name in self.__slots__}

    def snapshot(
        self, minconn: int, maxconn: int, idle: int, used: int, connecting: int, waiting: int
    ) -> dict[str, float]:
        """The counters plus the pool's current sizes (``get_stats()``)."""
        stats = self.as_dict()
        stats.update(
            pool_min=minconn,
            pool_max=maxconn,
            pool_size=idle + used + connecting,
            pool_available=idle,
            checked_out=used,
            requests_waiting=waiting,
        )
        return stats
