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

import collections
import ctypes
import faulthandler
import itertools
import math
import os
import random
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import psycopg2
import psycopg2.errors
import pytest

from pgctx import savepoint, with_connection
from pgctx.errors import PoolTimeout, TransactionAborted
from pgctx.health import check_connection, is_disconnect, reset_session
from pgctx.pool import ThreadedConnectionPool
from pgctx.testing import PgServer, ThrowawayServer
from tests.faults.proxy import FaultProxy
from tests.helpers import backends, insert, unique_app, wait_backends, wait_until

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


# -- with-blocks and decorators, backend kills, a server restart and async interrupts ------

BLOCK_THREADS = 16
SEPARATE_AT_ONCE = 2  # threads that hold one connection while taking a second (no deadlock)


class Interrupt(KeyboardInterrupt):
    """The KeyboardInterrupt the injector raises in workers (told apart in the counts)."""


@dataclass
class Intervals:
    """Who held which connection when: the exclusivity check that interrupts cannot fool.

    A worker appends one record per connection it took, in a single C call once its unit
    is done, so a unit cut short by an interrupt leaves no record (and no false alarm);
    two records of one connection (same object, same backend pid) that overlap mean it
    was lent to two borrowers at once.
    """

    clock: Any = field(default_factory=lambda: itertools.count())
    records: list[tuple[int, int, int, int, Any]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # errors that should never happen
    late_errors: list[str] = field(default_factory=list)
    fault_errors: collections.Counter[str] = field(default_factory=collections.Counter)
    interrupts_caught: list[int] = field(default_factory=list)
    units: collections.Counter[int] = field(default_factory=collections.Counter)
    quiet_since: float = math.inf  # no fault of any kind after this (plus GRACE)

    def overlaps(self) -> list[str]:
        by_conn: dict[tuple[int, int], list[tuple[int, int, int]]] = {}
        for pid, conn_id, start, end, _conn in self.records:
            by_conn.setdefault((pid, conn_id), []).append((start, end, 0))
        found = []
        for key, spans in by_conn.items():
            spans.sort()
            for (s1, e1, _), (s2, e2, _) in itertools.pairwise(spans):
                if s2 < e1:
                    found.append(f"connection {key} held twice at once: {s1}-{e1}, {s2}-{e2}")
        return found

    def failed(self, exc: BaseException) -> None:
        if time.monotonic() > self.quiet_since + GRACE:
            self.late_errors.append(repr(exc))
        else:
            self.fault_errors[type(exc).__name__] += 1


def make_units(pool: ThreadedConnectionPool, log: Intervals, table: str) -> list[Any]:
    """The units of work a worker picks from; each checks its session is its own."""

    def held(conn: Any, start: int) -> tuple[int, int, int, int, Any]:
        return (conn.info.backend_pid, id(conn), start, next(log.clock), conn)

    def own_session(conn: Any, rng: random.Random) -> None:
        token = uuid.uuid4().hex
        with conn.cursor() as cur:
            cur.execute("SELECT set_config('soak.owner', %s, false)", (token,))
            if rng.random() < 0.3:
                cur.execute("SELECT pg_sleep(%s)", (rng.uniform(0.001, 0.01),))
            cur.execute("SELECT current_setting('soak.owner')")
            (seen,) = cur.fetchone() or (None,)
        if seen != token:
            log.problems.append(f"session shared: token {seen!r} != {token!r}")

    def block(rng: random.Random) -> None:
        with pool.connection() as conn:
            start = next(log.clock)
            own_session(conn, rng)
            log.records.append(held(conn, start))

    @with_connection(pool)
    def nested(x: int, rng: random.Random, conn: Any = None) -> None:
        with savepoint(pool):
            insert(conn, table, x)
        try:
            with savepoint(pool), conn.cursor() as cur:
                cur.execute(f"INSERT INTO {table} VALUES (%s)", (x,))  # a duplicate
        except psycopg2.errors.UniqueViolation:
            pass  # rolled back to the savepoint; the unit goes on

    @with_connection(pool)
    def decorated(rng: random.Random, conn: Any = None) -> None:
        start = next(log.clock)
        own_session(conn, rng)
        nested(rng.getrandbits(62), rng)  # joins this connection
        log.records.append(held(conn, start))

    gate = threading.BoundedSemaphore(SEPARATE_AT_ONCE)

    def separate(rng: random.Random) -> None:
        with gate, pool.connection() as outer:
            start = next(log.clock)
            with pool.connection(separate=True) as inner:
                inner_start = next(log.clock)
                if inner is outer:
                    log.problems.append("separate=True joined the outer connection")
                own_session(inner, rng)
                log.records.append(held(inner, inner_start))
            own_session(outer, rng)
            log.records.append(held(outer, start))

    return [block, block, decorated, decorated, separate]


def block_worker(units: list[Any], log: Intervals, stop: threading.Event) -> None:
    me = threading.get_ident()
    rng = random.Random(me)
    while True:  # an interrupt may land anywhere, also in this loop: go round again
        try:
            while not stop.is_set():
                try:
                    rng.choice(units)(rng)
                    log.units[me] += 1
                except Interrupt:
                    log.interrupts_caught.append(1)
                except (psycopg2.Error, TransactionAborted) as exc:
                    log.failed(exc)  # disconnects, PoolTimeout while the server is down
                except Exception as exc:
                    log.problems.append(f"unexpected {exc!r}")
            return
        except Interrupt:
            log.interrupts_caught.append(1)


def interrupt_threads(threads: list[threading.Thread], until: float, seed: int) -> int:
    """Raise Interrupt in random workers at random bytecode boundaries until ``until``."""
    rng = random.Random(seed)
    raise_in = ctypes.pythonapi.PyThreadState_SetAsyncExc
    sent = 0
    while time.monotonic() < until:
        thread = rng.choice(threads)
        if thread.ident is not None and thread.is_alive():
            sent += raise_in(ctypes.c_ulong(thread.ident), ctypes.py_object(Interrupt))
        time.sleep(rng.uniform(0.002, 0.02))
    return sent


def kill_backends(server: ThrowawayServer, app: str, until: float, seed: int) -> int:
    rng = random.Random(seed)
    killed = 0
    admin = None
    try:
        while time.monotonic() < until:
            try:
                admin = admin or server.connect()
                with admin.cursor() as cur:
                    cur.execute(
                        "SELECT count(pg_terminate_backend(pid)) FROM ("
                        "SELECT pid FROM pg_stat_activity WHERE application_name = %s "
                        "ORDER BY random() LIMIT %s) AS victims",
                        (app, rng.randint(1, 2)),
                    )
                    killed += (cur.fetchone() or (0,))[0]
            except psycopg2.OperationalError:  # the server is restarting
                if admin is not None:
                    admin.close()
                admin = None
            time.sleep(rng.uniform(0.05, 0.25))
    finally:
        if admin is not None:
            admin.close()
    return killed


def test_soak_blocks_and_decorators_with_kills_a_restart_and_interrupts(
    private_pg_server: ThrowawayServer,
) -> None:
    server = private_pg_server
    app = unique_app("soak-blocks")
    table = f"soak_{uuid.uuid4().hex[:8]}"
    admin = server.connect()
    with admin.cursor() as cur:
        cur.execute(f"CREATE TABLE {table} (x bigint PRIMARY KEY)")
    minconn = 2
    pool = ThreadedConnectionPool(
        minconn,
        MAXCONN,
        server.dsn,
        application_name=app,
        timeout=5,
        check=check_connection,
        max_lifetime=max(1.0, SECONDS / 4),
    )
    log = Intervals()
    stop = threading.Event()
    units = make_units(pool, log, table)
    workers = [
        threading.Thread(target=block_worker, args=(units, log, stop), daemon=True)
        for _ in range(BLOCK_THREADS)
    ]
    ledger = Ledger()
    sampler = threading.Thread(target=sample_bounds, args=(pool, ledger, stop), daemon=True)
    started = time.monotonic()
    faults_end = started + SECONDS * FAULT_SHARE
    results: dict[str, int] = {}

    def run(name: str, fn: Any, *args: Any) -> threading.Thread:
        thread = threading.Thread(target=lambda: results.__setitem__(name, fn(*args)))
        thread.start()
        return thread

    try:
        for thread in [*workers, sampler]:
            thread.start()
        faulters = [
            run("interrupts", interrupt_threads, workers, faults_end, 7),
            run("killed", kill_backends, server, app, faults_end, 11),
        ]
        time.sleep(SECONDS * FAULT_SHARE / 2)  # the restart comes in the middle of the faults
        server.restart("fast")
        admin.close()
        admin = server.connect()
        for thread in faulters:
            thread.join(SECONDS + 60)
        log.quiet_since = time.monotonic()
        server_peak = 0
        while time.monotonic() < started + SECONDS:  # the quiet window
            server_peak = max(server_peak, backends(admin, app))
            time.sleep(0.05)
    finally:
        stop.set()
        deadline = time.monotonic() + 60
        for thread in [*workers, sampler]:
            thread.join(max(0.0, deadline - time.monotonic()))
    alive = [t for t in [*workers, sampler] if t.is_alive()]
    if alive:  # show where they are stuck
        faulthandler.dump_traceback(all_threads=True)
    try:
        print(  # shown with -s: what the run did
            f"soak-blocks {SECONDS:g} s: {sum(log.units.values())} units, "
            f"{len(log.records)} holds, slowest thread {min(log.units.values(), default=0)}, "
            f"interrupts sent {results.get('interrupts')} caught {len(log.interrupts_caught)}, "
            f"killed {results.get('killed')}, errors under faults {dict(log.fault_errors)}, "
            f"stats {pool.get_stats()}"
        )
        assert alive == [], "a thread never finished"
        assert log.problems == []
        assert log.overlaps() == []
        assert log.late_errors == []  # recovered fully once the faults stopped
        assert results.get("interrupts", 0) > 0 and log.interrupts_caught
        assert results.get("killed", 0) > 0
        assert ledger.max_checked_out <= MAXCONN and ledger.max_open <= MAXCONN
        assert server_peak <= MAXCONN
        # no leak: what the pool accounts for is what the server has, and nothing is out
        assert wait_until(lambda: pool._connecting == 0, 30)
        with pool._lock:
            assert (pool._used, len(pool._waiters)) == ({}, 0)
        assert wait_until(lambda: len(pool._pool) >= minconn, 30)  # refilled to minconn
        assert wait_backends(admin, app, len(pool._pool), 30) == len(pool._pool)
        assert len(pool._pool) <= MAXCONN
        conns = [pool.getconn() for _ in range(MAXCONN)]  # every slot usable
        for conn in conns:
            pool.putconn(conn)
        assert pool._maintenance is not None and pool._maintenance._thread.is_alive()
    finally:
        pool.closeall()
        admin.close()
