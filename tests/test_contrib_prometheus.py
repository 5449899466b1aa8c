"""pgctx.contrib.prometheus: a real pool on the real server, scraped by prometheus-client."""

from __future__ import annotations

import importlib
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

import pgctx
from tests.helpers import unique_app, wait_until

prometheus_client = pytest.importorskip("prometheus_client")

from pgctx.contrib.prometheus import COUNTERS, GAUGES, PoolCollector  # noqa: E402

Pool = pgctx.ThreadedConnectionPool


@pytest.fixture
def pool(dsn: str) -> Iterator[Pool]:
    p = Pool(1, 1, dsn, application_name=unique_app("prometheus"), timeout=30)
    yield p
    if not p.closed:
        p.closeall()


@pytest.fixture
def registry(pool: Pool) -> Any:
    registry = prometheus_client.CollectorRegistry()
    registry.register(PoolCollector({"main": pool}))
    return registry


def value(registry: Any, name: str, pool: str = "main") -> float | None:
    result = registry.get_sample_value(name, {"pool": pool})
    return None if result is None else float(result)


def test_every_stat_is_exported(pool: Pool) -> None:
    assert set(pool.get_stats()) == set(COUNTERS) | set(GAUGES)


def test_values_move_with_the_pool(pool: Pool, registry: Any) -> None:
    assert value(registry, "pgctx_pool_size") == 1
    assert value(registry, "pgctx_pool_max") == 1
    assert value(registry, "pgctx_connections_total") == 1
    requests = value(registry, "pgctx_requests_total")
    assert requests is not None
    with pool.connection():
        assert value(registry, "pgctx_checked_out") == 1
        assert value(registry, "pgctx_pool_available") == 0
        assert value(registry, "pgctx_requests_total") == requests + 1
    assert value(registry, "pgctx_checked_out") == 0
    assert value(registry, "pgctx_pool_available") == 1

    # a second caller waits for the only connection: queued, wait time, then a timeout
    taken = pool.getconn()
    waiter = threading.Thread(target=lambda: pool.putconn(pool.getconn()))
    waiter.start()
    assert wait_until(lambda: value(registry, "pgctx_requests_waiting") == 1)
    time.sleep(0.05)
    pool.putconn(taken)
    waiter.join(30)
    assert value(registry, "pgctx_requests_waiting") == 0
    assert value(registry, "pgctx_requests_queued_total") == 1
    waited = value(registry, "pgctx_requests_wait_seconds_total")
    assert waited is not None and 0.04 < waited < 30  # exported in seconds, not ms
    with pytest.raises(pgctx.PoolTimeout), pool.connection():
        pool.getconn(timeout=0.05)
    assert value(registry, "pgctx_requests_timeouts_total") == 1

    text = prometheus_client.generate_latest(registry).decode()
    assert "# TYPE pgctx_requests_total counter" in text
    assert 'pgctx_checked_out{pool="main"} 0.0' in text


def test_several_pools_closed_pools_and_removal(dsn: str, pool: Pool) -> None:
    other = Pool(0, 3, dsn, application_name=unique_app("prometheus"))
    collector = PoolCollector({"main": pool}, namespace="app_db")
    collector.add("other", other)
    registry = prometheus_client.CollectorRegistry()
    registry.register(collector)
    assert registry.get_sample_value("app_db_pool_max", {"pool": "other"}) == 3
    assert registry.get_sample_value("app_db_pool_max", {"pool": "main"}) == 1
    other.closeall()
    assert registry.get_sample_value("app_db_pool_size", {"pool": "other"}) == 0
    collector.remove("other")
    assert registry.get_sample_value("app_db_pool_max", {"pool": "other"}) is None
    assert "other" not in repr(collector) and "main" in repr(collector)


def test_bad_input_is_refused(pool: Pool) -> None:
    collector = PoolCollector({"main": pool})
    with pytest.raises(ValueError, match="exported already"):
        collector.add("main", pool)
    with pytest.raises(TypeError, match="get_stats"):
        collector.add("plain", object())
    with pytest.raises(TypeError, match="non-empty str"):
        collector.add("", pool)
    with pytest.raises(KeyError):
        collector.remove("missing")
    with pytest.raises(ValueError):
        PoolCollector(namespace="")


def test_describe_needs_no_pool_and_registering_twice_is_refused(pool: Pool) -> None:
    registry = prometheus_client.CollectorRegistry()
    registry.register(PoolCollector({"main": pool}))
    with pytest.raises(ValueError, match="Duplicated timeseries"):
        registry.register(PoolCollector({"other": pool}))
    names = {family.name for family in PoolCollector().describe()}
    assert "pgctx_requests" in names and "pgctx_checked_out" in names


def test_missing_prometheus_client_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(sys.modules):
        if name == "prometheus_client" or name.startswith("prometheus_client."):
            monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.delitem(sys.modules, "pgctx.contrib.prometheus")
    with pytest.raises(ImportError, match=r"pip install 'pgctx\[prometheus\]'"):
        importlib.import_module("pgctx.contrib.prometheus")
