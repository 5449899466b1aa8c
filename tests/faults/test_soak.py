"""A bounded chaos soak: many threads borrow while backends are killed at random.

24+ worker threads share a small pool reached through the fault proxy. For the first
60 % of the run a fault thread kills random backends of the pool (``pg_terminate_backend``)
and now and then resets every proxied session at once. The invariants, checked while it
runs and at the end:

* exclusivity: no connection object and no backend pid is ever held by two borrowers at
  once, and a token each borrower stores in its session reads back unchanged;
* bounds: never more than ``maxconn`` connections checked out or open, and never more
  than ``maxconn`` server sessions for the pool once closed ones have gone;
* liveness: every thread finishes and every thread got work done;
* recovery: no error at all once the faults have stopped (after a short grace period);
* no leak: nothing checked out at the end, no server session left after ``closeall()``.

It runs for ``PGCTX_SOAK_SECONDS`` (default 5) seconds.
"""

from __future__ import annotations

import os
import random
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import psycopg2
import pytest

from pgctx.errors import PoolTimeout
from pgctx.health import check_connection, is_disconnect, reset_session
from pgctx.pool import ThreadedConnectionPool
from pgctx.testing import PgServer
from tests.faults.proxy import FaultProxy
from tests.helpers import backends, unique_app, wait_backends

SECONDS = float(os.environ.get("PGCTX_SOAK_SECONDS", "5"))
THREADS = 24
MAXCONN = 6
FAULT_SHARE = 0.6  # faults during the first 60 % of the run
GRACE = 1.0  # seconds after the last fault before errors count as failures


@dataclass
class Ledger:
    """Who holds what, and everything that went wrong; shared by all threads."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    conns: dict[int, int] = field(default_factory=dict)  # id(conn) -> thread ident
    pids: dict[int, int] = field(default_factory=dict)  # backend pid -> thread ident
    violations: list[str] = field(default_factory=list)
    late_errors: list[str] = field(default_factory=list)  # errors after faults + grace
    fault_errors: int = 0
    iterations: dict[int, int] = field(default_factory=dict)
    max_checked_out: int = 0
    max_open: int = 0
    last_fault: float = 0.0

    def violation(self, text: str) -> None:
        with self.lock:
            self.violations.append(text)

    def take(self, conn: Any) -> None:
        me = threading.get_ident()
        with self.lock:
            if id(conn) in self.conns:
                self.violations.append(f"connection {id(conn):#x} lent to two borrowers")
            self.conns[id(conn)] = me
            pid = conn.info.backend_pid  # no round trip
            if pid in self.pids:
                self.violations.append(f"backend {pid} lent to two borrowers")
            self.pids[pid] = me

    def give(self, conn: Any, pid: int) -> None:
        with self.lock:
            self.conns.pop(id(conn), None)
            self.pids.pop(pid, None)

    def error(self, exc: BaseException, when: float) -> None:
        with self.lock:
            if self.last_fault and when > self.last_fault + GRACE and not faults_on.is_set():
                self.late_errors.append(repr(exc))
            else:
                self.fault_errors += 1


faults_on = threading.Event()


def work(pool: ThreadedConnectionPool, ledger: Ledger, stop: threading.Event) -> None:
    me = threading.get_ident()
    rng = random.Random(me)
    ledger.iterations[me] = 0
    while not stop.is_set():
        try:
            conn = pool.getconn()
        except PoolTimeout as exc:
            ledger.error(exc, time.monotonic())
            continue
        ledger.take(conn)
        pid = conn.info.backend_pid
        token = uuid.uuid4().hex
        close = False
        try:
            with conn.cursor() as cur:
                cur.execute("SELECT set_config('soak.owner', %s, false)", (token,))
                if rng.random() < 0.2:
                    cur.execute("SELECT pg_sleep(%s)", (rng.uniform(0.001, 0.02),))
                cur.execute("SELECT current_setting('soak.owner'), pg_backend_pid()")
                seen, server_pid = cur.fetchone() or (None, None)
            if seen != token or server_pid != pid:
                ledger.violation(f"session shared: token {seen!r} != {token!r}")
            conn.commit()
            with ledger.lock:
                ledger.iterations[me] += 1
        except psycopg2.Error as exc:
            if not is_disconnect(exc, conn):
                ledger.violation(f"not a disconnect: {exc!r}")
            ledger.error(exc, time.monotonic())
            close = rng.random() < 0.5  # both return paths for broken connections
        except BaseException as exc:
            ledger.violation(f"unexpected {exc!r}")
            raise
        finally:
            ledger.give(conn, pid)
            pool.putconn(conn, close=close)


def inject_faults(
    pg_server: PgServer, proxy: FaultProxy, admin: Any, app: str, ledger: Ledger, until: float
) -> None:
    rng = random.Random(1234)
    faults_on.set()
    try:
        while time.monotonic() < until:
            if rng.random() < 0.15:
                proxy.reset_all()
            else:
                with admin.cursor() as cur:
                    cur.execute(
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                        "WHERE application_name = %s ORDER BY random() LIMIT %s",
                        (app, rng.randint(1, 2)),
                    )
            ledger.last_fault = time.monotonic()
            time.sleep(rng.uniform(0.05, 0.25))
    finally:
        faults_on.clear()


def sample_bounds(pool: ThreadedConnectionPool, ledger: Ledger, stop: threading.Event) -> None:
    while not stop.wait(0.02):
        stats = pool.get_stats()
        with ledger.lock:
            ledger.max_checked_out = max(ledger.max_checked_out, int(stats["checked_out"]))
            ledger.max_open = max(ledger.max_open, int(stats["pool_size"]))


POLICIES: dict[str, dict[str, Any]] = {
    # waiting only: the psycopg2-compatible return path plus FIFO hand-off
    "waiting": {},
    # every policy that runs on checkout, on return or in the background
    "policies": {
        "check": check_connection,
        "check_after_idle": 0.05,
        "reset": reset_session,
        "max_lifetime": max(1.0, SECONDS / 4),
        "leak_timeout": SECONDS * 10,
    },
}


@pytest.mark.parametrize("policies", list(POLICIES))
def test_soak_random_backend_kills(
    pg_server: PgServer, proxy: FaultProxy, pg_admin: Any, policies: str
) -> None:
    app = unique_app("soak")
    pool = ThreadedConnectionPool(
        2, MAXCONN, proxy.dsn, application_name=app, timeout=10, **POLICIES[policies]
    )
    ledger = Ledger()
    stop = threading.Event()
    started = time.monotonic()
    workers = [
        threading.Thread(target=work, args=(pool, ledger, stop), daemon=True)
        for _ in range(THREADS)
    ]
    sampler = threading.Thread(target=sample_bounds, args=(pool, ledger, stop), daemon=True)
    try:
        for thread in [*workers, sampler]:
            thread.start()
        inject_faults(pg_server, proxy, pg_admin, app, ledger, started + SECONDS * FAULT_SHARE)
        server_peak = 0
        while time.monotonic() < started + SECONDS:  # the quiet window
            server_peak = max(server_peak, backends(pg_admin, app))
            time.sleep(0.05)
    finally:
        stop.set()
        for thread in [*workers, sampler]:
            thread.join(30)
    assert not any(t.is_alive() for t in [*workers, sampler]), "a thread never finished"
    stats = pool.get_stats()
    print(  # shown with -s: what the run did
        f"soak {SECONDS:g} s: {sum(ledger.iterations.values())} borrows, "
        f"slowest thread {min(ledger.iterations.values(), default=0)}, "
        f"{ledger.fault_errors} errors under faults, lost {stats['connections_lost']}, "
        f"bad returns {stats['returns_bad']}, recycled {stats['connections_recycled']}, "
        f"opened {stats['connections_num']}, peaks {ledger.max_checked_out}/"
        f"{ledger.max_open}/{server_peak}"
    )

    assert ledger.violations == []
    assert ledger.late_errors == []  # recovered fully once the faults stopped
    assert ledger.fault_errors > 0  # the faults did hit borrowers: the soak tested something
    assert min(ledger.iterations.values()) > 0, "a thread starved"
    assert len(ledger.iterations) == THREADS
    assert ledger.max_checked_out <= MAXCONN
    assert ledger.max_open <= MAXCONN
    assert server_peak <= MAXCONN
    assert (stats["checked_out"], stats["requests_waiting"]) == (0, 0)
    assert stats["pool_size"] <= MAXCONN
    assert stats["connections_lost"] + stats["returns_bad"] > 0
    assert stats["leaks_reported"] == 0
    assert len(pool._pool) == len({id(c) for c in pool._pool})  # no duplicate idle entries
    pool.closeall()
    assert wait_backends(pg_admin, app, 0) == 0


@pytest.fixture(autouse=True)
def _no_faults_left_on() -> None:
    faults_on.clear()
