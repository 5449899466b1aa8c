"""Finalizers run by the garbage collector: handed to the janitor, never crashing or hanging.

The stress runs in a subprocess (a crash there is a return code, not a dead test run):
decorated and plain generators, sync and async, with blocks, request scopes and
savepoints, abandoned mid-iteration in reference cycles under a low GC threshold (10),
while other threads open blocks. Before the janitor, Python 3.10/3.11 crashed
(SIGSEGV: the finalizer's ContextVar.set freed the map an interrupted set was using)
and 3.12+ deadlocked on the registry's lock.
"""

from __future__ import annotations

import gc
import os
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pgctx import finalizers
from pgctx.pool import ThreadedConnectionPool
from tests.helpers import unique_app, wait_until

ROOT = Path(__file__).resolve().parents[1]

STRESS = textwrap.dedent(
    """
    import asyncio, gc, sys, threading, time
    import pgctx
    from pgctx import finalizers
    from pgctx.pool import ThreadedConnectionPool
    from pgctx.savepoint import savepoint

    dsn, n, mode, threshold = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
    pool = ThreadedConnectionPool(0, 40, dsn, timeout=60)
    stop = threading.Event()

    @pgctx.with_connection(pool)
    def decorated(holder, conn=None):
        holder.append(holder)
        with pool.connection("replica"):
            with savepoint(pool, "replica"):
                yield 1
                yield 2

    def plain(holder):
        holder.append(holder)
        with pool.scope(), pool.connection(), savepoint(pool):
            yield 1
            yield 2

    @pgctx.with_connection(pool)
    async def adecorated(holder, conn=None):
        holder.append(holder)
        async with pool.connection("replica"):
            yield 1
            yield 2

    async def aplain(holder):
        holder.append(holder)
        async with pool.connection():
            yield 1
            yield 2

    def background():
        while not stop.is_set():
            with pool.connection(), pool.connection("x"):
                pgctx.current_connection(pool, "x")

    def abandon(factory):
        holder = []
        gen = factory(holder)
        holder.append(gen)  # a reference cycle: only the cyclic collector frees it
        next(gen)

    async def aabandon(factory, hooks):
        holder = []
        saved = sys.get_asyncgen_hooks()
        if not hooks:  # then the collector closes it, not the loop
            sys.set_asyncgen_hooks(None, None)
        try:
            agen = factory(holder)
            holder.append(agen)
            await agen.__anext__()
        finally:
            sys.set_asyncgen_hooks(*saved)

    async def amain():
        for i in range(n):
            await aabandon(adecorated, i % 2 == 0)
            await aabandon(aplain, i % 2 == 0)
            async with pool.connection():
                pass
            if i % 5 == 4:  # bound what waits for an older generation's collection
                gc.collect()
                for _ in range(30000):
                    if len(pool._used) <= 2 and finalizers.janitor_idle():
                        break
                    await asyncio.sleep(0.001)

    gc.set_threshold(threshold)
    threads = [threading.Thread(target=background) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        if mode == "sync":
            for i in range(n):
                abandon(decorated)
                abandon(plain)
                with pool.connection():
                    pass
                if i % 5 == 4:
                    gc.collect()
        else:
            asyncio.run(amain())
    finally:
        stop.set()
        for t in threads:
            t.join(60)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        gc.collect()
        if not pool._used and finalizers.janitor_idle():
            break
        time.sleep(0.02)
    print("in use", len(pool._used), "janitor idle", finalizers.janitor_idle())
    """
)


@pytest.mark.timeout(400)
@pytest.mark.parametrize("mode", ["sync", "async"])
def test_abandoned_generators_collected_in_cycles_never_crash_or_hang(
    dsn: str, mode: str, tmp_path: Path
) -> None:
    script = tmp_path / "stress.py"
    script.write_text(STRESS)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-X", "faulthandler", str(script), dsn, "300", mode, "10"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,  # a deadlock shows as a TimeoutExpired, never as a hung run
    )
    assert done.returncode == 0, done.stderr[-3000:]  # -11: a crash in the collector
    assert "in use 0 janitor idle True" in done.stdout, (done.stdout, done.stderr[-3000:])


@pytest.fixture
def pool(dsn: str) -> Iterator[Any]:
    p = ThreadedConnectionPool(0, 4, dsn, application_name=unique_app("finalizers"), timeout=30)
    yield p
    p.closeall()


def test_a_refcount_finalization_stays_inline(pool: Any) -> None:
    def plain() -> Any:
        with pool.connection():
            yield 1
            yield 2

    for _ in plain():
        break  # the generator is finalized right here, not later
    assert len(pool._used) == 0


def test_in_collector_is_true_only_in_the_collecting_thread() -> None:
    seen: list[tuple[str, bool]] = []

    class Probe:
        def __del__(self) -> None:
            seen.append((threading.current_thread().name, finalizers.in_collector()))

    probe = Probe()
    probe.cycle = probe  # type: ignore[attr-defined]
    del probe
    gc.collect()
    assert seen == [(threading.current_thread().name, True)]
    assert not finalizers.in_collector()


def test_deferred_jobs_run_in_the_janitor_in_a_context_of_their_own() -> None:
    import contextvars

    var: contextvars.ContextVar[str] = contextvars.ContextVar("probe", default="unset")
    var.set("caller")
    ran = threading.Event()
    where: list[Any] = []

    def job(x: int) -> None:
        where.append((threading.current_thread().name, var.get(), x))
        var.set("job")
        ran.set()

    class Deferring:
        def __del__(self) -> None:
            finalizers.defer(job, 7)

    obj = Deferring()
    obj.cycle = obj  # type: ignore[attr-defined]
    del obj
    gc.collect()
    assert ran.wait(30)
    assert where == [("pgctx-janitor", "unset", 7)]
    assert var.get() == "caller"
    assert wait_until(finalizers.janitor_idle, 30)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
@pytest.mark.filterwarnings("ignore:.*fork.*:DeprecationWarning")  # 3.12+: threads exist
def test_janitor_is_made_again_in_a_forked_child() -> None:
    finalizers.defer(lambda: None)  # the parent's janitor exists
    assert wait_until(finalizers.janitor_idle, 30)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: a new janitor serves it
        ok = threading.Event()
        finalizers.defer(ok.set)
        os.write(write, b"1" if ok.wait(10) else b"0")
        os._exit(0)
    os.close(write)
    try:
        assert os.read(read, 1) == b"1"
    finally:
        os.close(read)
        os.waitpid(pid, 0)
