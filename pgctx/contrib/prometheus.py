"""Export pools' ``get_stats()`` to Prometheus: a collector for prometheus-client.

::

    from prometheus_client import REGISTRY
    from pgctx.contrib.prometheus import PoolCollector

    REGISTRY.register(PoolCollector({"main": pool, "replica": replica_pool}))

Each scrape calls ``get_stats()`` on every pool and exports its counters (names ending
in ``_total``; milliseconds become seconds) and gauges, labelled with the pool's name.
Needs the ``prometheus`` extra: ``pip install 'pgctx[prometheus]'``.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Mapping
from typing import Any

try:
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
    from prometheus_client.registry import Collector
except ImportError as exc:  # tested with the module hidden
    raise ImportError(
        "pgctx.contrib.prometheus needs prometheus-client: pip install 'pgctx[prometheus]'"
    ) from exc

__all__ = ["COUNTERS", "GAUGES", "PoolCollector"]

COUNTERS: dict[str, tuple[str, str, float]] = {
    "requests_num": ("requests", "Connection requests (getconn calls).", 1.0),
    "requests_queued": ("requests_queued", "Requests that had to wait for a connection.", 1.0),
    "requests_wait_ms": (
        "requests_wait_seconds",
        "Time requests spent waiting for a connection.",
        0.001,
    ),
    "requests_timeouts": ("requests_timeouts", "Requests that ended in PoolTimeout.", 1.0),
    "requests_errors": ("requests_errors", "Requests refused with TooManyWaiters.", 1.0),
    "returns_bad": (
        "returns_bad",
        "Connections returned broken, or whose rollback or reset failed.",
        1.0,
    ),
    "connections_num": ("connections", "Connections opened.", 1.0),
    "connections_ms": ("connections_seconds", "Time spent opening connections.", 0.001),
    "connections_errors": ("connections_errors", "Failed connection attempts.", 1.0),
    "connections_lost": (
        "connections_lost",
        "Connections found broken on checkout (closed while idle, failed check).",
        1.0,
    ),
    "connections_discarded": (
        "connections_discarded",
        "Connections closed by the pool (close=True, beyond the idle limit).",
        1.0,
    ),
    "connections_recycled": (
        "connections_recycled",
        "Connections closed for max_lifetime or max_idle.",
        1.0,
    ),
    "leaks_reported": ("leaks_reported", "Connections reported as leaked (leak_timeout).", 1.0),
}
"""get_stats() counter -> (metric name after the namespace, help, scale to base units)."""

GAUGES: dict[str, tuple[str, str]] = {
    "pool_min": ("pool_min", "The pool's minconn."),
    "pool_max": ("pool_max", "The pool's maxconn."),
    "pool_size": ("pool_size", "Connections open or being opened."),
    "pool_available": ("pool_available", "Idle connections in the pool."),
    "checked_out": ("checked_out", "Connections checked out."),
    "requests_waiting": ("requests_waiting", "Callers waiting for a connection."),
}
"""get_stats() gauge -> (metric name after the namespace, help)."""


class PoolCollector(Collector):
    """A prometheus-client collector for the ``get_stats()`` of named pools.

    ``pools`` maps a name (the value of the ``pool`` label) to a pool; more can be
    added with :meth:`add` and dropped with :meth:`remove`. Metric names start with
    ``namespace`` (``pgctx_requests_total``, ``pgctx_checked_out``, ...).
    """

    def __init__(
        self,
        pools: Mapping[str, Any] | None = None,
        *,
        namespace: str = "pgctx",
        label: str = "pool",
    ) -> None:
        if not namespace or not label:
            raise ValueError("namespace and label must be non-empty strings")
        self._namespace = namespace
        self._label = label
        self._pools: dict[str, Any] = {}
        self._lock = threading.Lock()
        for name, pool in (pools or {}).items():
            self.add(name, pool)

    def __repr__(self) -> str:
        return f"<PoolCollector namespace={self._namespace!r} pools={sorted(self._pools)!r}>"

    def add(self, name: str, pool: Any) -> None:
        """Export ``pool`` under ``name``; a name can be used only once."""
        if not isinstance(name, str) or not name:
            raise TypeError(f"a pool's name must be a non-empty str, got {name!r}")
        if not callable(getattr(pool, "get_stats", None)):
            raise TypeError(
                f"{pool!r} has no get_stats(): export a pgctx pool (pgctx.pool classes)"
            )
        with self._lock:
            if name in self._pools:
                raise ValueError(f"a pool named {name!r} is exported already")
            self._pools[name] = pool

    def remove(self, name: str) -> None:
        """Stop exporting the pool named ``name`` (KeyError if there is none)."""
        with self._lock:
            del self._pools[name]

    def describe(self) -> Iterator[Metric]:
        """The metric families, without samples (prometheus-client calls this on register)."""
        return iter(self._families({}))

    def collect(self) -> Iterator[Metric]:
        """One ``get_stats()`` snapshot of every pool, as metric families."""
        with self._lock:
            pools = list(self._pools.items())
        return iter(self._families({name: pool.get_stats() for name, pool in pools}))

    def _families(self, stats: Mapping[str, Mapping[str, float]]) -> list[Metric]:
        families: list[Metric] = []
        labels = [self._label]
        for key, (name, doc, scale) in COUNTERS.items():
            counter = CounterMetricFamily(f"{self._namespace}_{name}", doc, labels=labels)
            for pool_name, values in stats.items():
                if key in values:
                    counter.add_metric([pool_name], values[key] * scale)
            families.append(counter)
        for key, (name, doc) in GAUGES.items():
            gauge = GaugeMetricFamily(f"{self._namespace}_{name}", doc, labels=labels)
            for pool_name, values in stats.items():
                if key in values:
                    gauge.add_metric([pool_name], values[key])
            families.append(gauge)
        return families
