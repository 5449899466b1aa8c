"""A model-based test of the scope layer (blocks, registry, decorators, savepoints).

hypothesis builds random programs (tests/scope_programs.py): nested blocks with keys and
``separate=True``, decorated functions, coroutines, generators and async generators
(consumed fully or partly, closed, dropped), savepoints, inserts of numbered rows, raised
and caught exceptions, caught unique violations, InterfaceErrors, hand-offs to threads and
tasks, concurrent gather children, tasks and threads outliving their block, executor jobs
and current_connection() calls. The reference model (tests/scope_model.py) predicts the
trace (which blocks share a connection, what each try and child sees, where each
exception came from) and the committed rows; the interpreter (tests/scope_runner.py)
runs the program against pgctx and PostgreSQL; both must agree, and afterwards every
connection is back in the pool and none is idle in a transaction.

Variants: ``core`` (no generators, gather or InterfaceError), one per feature, ``all``,
and ``all-low-gc`` (``gc.set_threshold(50)``, abandoned generators left in reference
cycles). Run longer with ``PGCTX_MODEL_EXAMPLES=5000`` (programs per variant).

Cases the documented rules leave open are not generated (or the model refuses them):

- a yield inside a savepoint (the consumer's work would land inside it);
- dropping an async generator (its finaliser runs whenever the loop gets to it), and
  dropping a generator that shares a connection with others (its fate would depend on
  when the collector runs);
- savepoint() entered while the transaction is already failed (which error it raises);
- an InterfaceError caught without a savepoint or block around it (not a database
  error: does it fail the unit?);
- a refused concurrent use while a savepoint is open on that connection (does the
  savepoint's undo clear that failure?);
- a use beside a gather child whose hand-off used the binding (does the child itself
  hold it until it is done?);
- a late task whose innermost binding ended but an outer one, shadowed in its copied
  context, is still open (does it fall back to the outer one?).

What the variants found in the code as it was when this test was written (shrunk; k is
the connection key, "gen" a @with_connection generator, the consumer code after "|"):

- gen(key='a'): with connection(None): yield; insert(None) -> NoActiveConnection after
  the yield (the generator lost its own block);
- gen: with connection(None, separate=True): yield; current(None) -> the generator's
  outer connection, not the separate one;
- gen: yield; with connection(None) | with connection(None): next -> the generator's
  block joins a block its consumer opened after the first step;
- gen: with connection('a'): copy_context thread: insert('a') -> NoActiveConnection
  (a hand-off from a generator body does not see the generator's blocks);
- with connection(None): to_thread: gen: yield | copy_context thread: insert(None) ->
  ConcurrentUseError for a hand-off of the thread whose generator joined the block;
- async: with connection(None): gather(task: insert(None), task: insert(None)) -> no
  ConcurrentUseError for the second child, and both rows committed;
- with connection(None): try: with savepoint(None): insert(None); InterfaceError without
  SQLSTATE -> the savepoint is not rolled back: the row is committed;
- test_generators_collected_inside_a_block_entry: a deadlock (3.12, 3.13) or a crash
  (3.11) when the collector finalises an abandoned generator inside a block entry.
"""

from __future__ import annotations

import gc
import itertools
import os
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, reject, settings

import pgctx
from tests.helpers import unique_app, wait_until
from tests.scope_model import Excluded, Model
from tests.scope_programs import Features, Program, programs, render, walk
from tests.scope_runner import Runner

EXAMPLES = int(os.environ.get("PGCTX_MODEL_EXAMPLES", "300"))
_bases = itertools.count(1)
_OUTCOMES = ("caught", "child", "late", "end")


class World:
    """The server, table, executor and pool the programs run on."""

    def __init__(self, dsn: str, admin: Any, table: str, executor: ThreadPoolExecutor) -> None:
        self.dsn = dsn
        self.admin = admin
        self.table = table
        self.executor = executor
        self.app = unique_app("model")
        self.pool: Any = None
        self.fresh_pool()

    def fresh_pool(self) -> None:
        """A new pool: after a failure the old one may hold leaked connections.

        minconn=10 keeps that many idle connections open between programs (a pool closes
        returned connections beyond minconn, like psycopg2's).
        """
        if self.pool is not None and not self.pool.closed:
            self.pool.closeall()
        self.pool = pgctx.ThreadedConnectionPool(
            10, 30, self.dsn, timeout=10, application_name=self.app
        )

    def sql(self, query: str, *args: Any) -> list[Any]:
        with self.admin.cursor() as cur:
            cur.execute(query, args)
            return cur.fetchall() if cur.description else []

    def idle_in_transaction(self) -> int:
        query = (
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s"
            " AND state LIKE 'idle in transaction%%'"
        )
        return int(self.sql(query, self.app)[0][0])

    def leftovers(self) -> list[str]:
        problems = []
        if len(self.pool._used):
            problems.append(f"{len(self.pool._used)} connections still checked out")
        stats = self.pool.get_stats()
        if stats["checked_out"]:
            problems.append(f"get_stats() says checked_out={stats['checked_out']}")
        if not wait_until(lambda: self.idle_in_transaction() == 0, timeout=15):
            problems.append(f"{self.idle_in_transaction()} backends idle in transaction")
        return problems


@pytest.fixture(scope="module")
def executor() -> Iterator[ThreadPoolExecutor]:
    with ThreadPoolExecutor(max_workers=2, thread_name_prefix="model-submit") as pool:
        yield pool


@pytest.fixture
def world(dsn: str, pg_admin: Any, table: str, executor: ThreadPoolExecutor) -> Iterator[World]:
    w = World(dsn, pg_admin, table, executor)
    yield w
    if not w.pool.closed:
        w.pool.closeall()


def _first_difference(expected: list[Any], actual: list[Any]) -> str:
    for i, (want, got) in enumerate(zip(expected, actual, strict=False)):
        if want != got:
            return f"event {i}: the model says {want}, the run did {got}"
    if len(expected) != len(actual):
        i = min(len(expected), len(actual))
        return f"event {i}: one trace ends ({len(expected)} vs {len(actual)} events)"
    return "the traces agree"


def run_one(world: World, program: Program, gc_mode: bool) -> None:
    try:
        expected, committed = Model(program).run()
    except Excluded as exc:
        event(f"excluded: {exc}")
        reject()
    for kind in sorted({e[-1][0] for e in expected if e[0] in _OUTCOMES and e[-1] != "ok"}):
        event(f"outcome seen: {kind}")
    base = next(_bases) * 1000  # uids stay below 1000; row `base` is the duplicate
    world.sql(f"INSERT INTO {world.table} VALUES (%s)", base)
    runner = Runner(world.pool, world.table, base, world.executor, cyclic_drops=gc_mode)
    threshold = gc.get_threshold()
    gc.freeze()  # what exists now is never collected: keeps collections cheap and on topic
    try:
        if gc_mode:
            gc.set_threshold(50)
        try:
            actual = runner.run(program)
        finally:
            gc.set_threshold(*threshold)
        if gc_mode or any(n.end == "drop" for n in walk(program.body)):
            gc.collect()  # abandoned generators give their connection back when collected
    finally:
        gc.unfreeze()
    problems = world.leftovers()
    query = f"SELECT x - %s FROM {world.table} WHERE x > %s AND x < %s"
    rows = {x for (x,) in world.sql(query, base, base, base + 1000)}
    if problems or actual != expected or rows != committed:
        world.fresh_pool()
        raise AssertionError(
            "\n".join(
                [
                    "the run differs from the model:",
                    render(program),
                    _first_difference(expected, actual),
                    f"committed rows: model {sorted(committed)}, server {sorted(rows)}",
                    *problems,
                    "model trace:",
                    *(f"  {e}" for e in expected),
                    "actual trace:",
                    *(f"  {e}" for e in actual),
                ]
            )
        )


# What the variants still find (strict=False xfails until it is fixed; see the report
# in the module docstring for the shrunk program).
GENERATOR_DEFECT = (
    "a thread started with copy_context().run from a decorated generator's body after a "
    "yield, inside a separate=True block the body still holds, does not write into that "
    "block's transaction (the row the model expects committed is missing)"
)
EVERYTHING = Features(generators=True, drops=True, gather=True, iface=True)


def _known(*defects: str) -> Any:
    return pytest.mark.xfail(strict=False, reason="; ".join(defects))


VARIANTS = [
    pytest.param(Features(), False, id="core"),
    pytest.param(Features(generators=True), False, id="generators", marks=_known(GENERATOR_DEFECT)),
    pytest.param(Features(gather=True), False, id="gather"),
    pytest.param(Features(iface=True), False, id="interface-error"),
    pytest.param(
        EVERYTHING,
        False,
        id="all",
        marks=_known(GENERATOR_DEFECT),
    ),
    pytest.param(
        EVERYTHING,
        True,  # gc.set_threshold(50), abandoned generators left in reference cycles
        id="all-low-gc",
        marks=_known(GENERATOR_DEFECT),
    ),
]


@pytest.mark.timeout(max(600, 2 * EXAMPLES))
@pytest.mark.parametrize(("features", "gc_mode"), VARIANTS)
def test_programs_match_the_model(world: World, features: Features, gc_mode: bool) -> None:
    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        print_blob=True,
        database=None,  # the variants share one test function: keep their examples apart
        suppress_health_check=[
            HealthCheck.too_slow,
            HealthCheck.filter_too_much,
            HealthCheck.data_too_large,
            HealthCheck.function_scoped_fixture,
        ],
    )
    @given(program=programs(features))
    def check(program: Program) -> None:
        run_one(world, program, gc_mode)

    check()


def test_generators_collected_inside_a_block_entry(dsn: str) -> None:
    """The low-GC variant's case made deterministic: the collector frees an abandoned
    decorated generator exactly inside a hand-off's block entry (tests/scope_gc_probe.py,
    in a child process, since a deadlock or a crash cannot be caught in this one)."""
    root = Path(__file__).resolve().parent.parent
    probe = [sys.executable, "-m", "tests.scope_gc_probe", dsn]
    done = subprocess.run(probe, cwd=root, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"exit {done.returncode}:\n{done.stdout}\n{done.stderr[-3000:]}"
