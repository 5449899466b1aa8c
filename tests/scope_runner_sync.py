"""The synchronous half of the interpreter of tests/scope_runner.py, and its schedule parts.

Statements in plain frames (``s_*``) and in generator frames (``g_*``, the body of a
decorated generator: pgctx treats blocks opened there differently), threads started
with ``copy_context().run``, executor jobs, spawned threads, and the gates that force
the gather schedule.
"""

from __future__ import annotations

import asyncio
import contextvars
import threading
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import Executor
from dataclasses import dataclass, replace
from typing import Any

import pgctx
from tests.scope_programs import Node

BOUND = 20.0  # seconds; never reached when the schedule works
_STOP = object()


class ProgramError(Exception):
    """Raised by a program's ``raise`` node."""


class Stuck(Exception):
    """A wait of the forced schedule was never released."""


def tag(exc: BaseException, uid: int) -> None:
    if isinstance(exc, Exception) and getattr(exc, "_model_origin", None) is None:
        exc._model_origin = uid  # type: ignore[attr-defined]


def outcome(exc: BaseException) -> tuple[str, Any]:
    return (type(exc).__name__, getattr(exc, "_model_origin", None))


class Gate:
    """An event that threads and tasks of one loop can both wait for."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._flag = threading.Event()
        self._event = asyncio.Event()
        self._loop = loop

    def set(self) -> None:
        self._flag.set()
        self._loop.call_soon_threadsafe(self._event.set)

    def wait(self) -> None:
        if not self._flag.wait(BOUND):
            raise Stuck("a gather child waited for its turn in vain")

    async def wait_async(self) -> None:
        try:
            await asyncio.wait_for(self._event.wait(), BOUND)
        except asyncio.TimeoutError:
            raise Stuck("a gather child waited for its turn in vain") from None


@dataclass
class Ctl:
    """One gather child's pause: tell the driver it arrived, wait to be resumed."""

    arrived: Gate
    resume: Gate
    paused: bool = False

    def pause(self) -> None:
        self.paused = True
        self.arrived.set()
        self.resume.wait()

    async def pause_async(self) -> None:
        self.paused = True
        self.arrived.set()
        await self.resume.wait_async()


@dataclass
class Env:
    gen: tuple[int, list[Any], bool] | None = None  # (use_gen uid, [generator], async)
    ctl: Ctl | None = None
    late: list[Any] | None = None


class SyncRunner:
    """Runs statements and records the trace; see Runner for the whole interpreter."""

    def __init__(
        self, pool: Any, table: str, base: int, executor: Executor, cyclic_drops: bool
    ) -> None:
        self.pool = pool
        self.base = base
        self.executor = executor
        self.cyclic_drops = cyclic_drops  # abandoned generators are left in a reference cycle
        self.insert_sql = f"INSERT INTO {table} VALUES (%s)"
        self.trace: list[Any] = []
        self._open: dict[int, Any] = {}  # uid -> connection of the blocks inside now
        self._left: list[int] = []  # appended by finalisers too: never iterate _open there

    def shared(self, conn: Any) -> tuple[int, ...]:
        while self._left:
            self._open.pop(self._left.pop(), None)
        return tuple(sorted(uid for uid, held in self._open.items() if held is conn))

    def entered(self, uid: int, conn: Any) -> None:
        self.trace.append(("enter", uid, self.shared(conn)))
        self._open[uid] = conn

    def left(self, uid: int) -> None:
        self._left.append(uid)

    # -- statements in plain frames --------------------------------------------

    def run_sync(self, body: list[Node], env: Env) -> None:
        for node in body:
            getattr(self, "s_" + node.kind)(node, env)

    def _insert(self, n: Node, row: int) -> None:
        try:
            conn = pgctx.current_connection(self.pool, n.key)
            with conn.cursor() as cur:
                cur.execute(self.insert_sql, (row,))
        except Exception as exc:
            tag(exc, n.uid)
            raise

    def s_insert(self, n: Node, env: Env) -> None:
        self._insert(n, self.base + n.uid)

    def s_dup(self, n: Node, env: Env) -> None:
        self._insert(n, self.base)  # committed before the program starts

    def s_iface(self, n: Node, env: Env) -> None:
        try:
            cur = pgctx.current_connection(self.pool, n.key).cursor()
            cur.close()
            cur.execute("SELECT 1")  # InterfaceError: cursor already closed (no SQLSTATE)
        except Exception as exc:
            tag(exc, n.uid)
            raise

    def s_raise(self, n: Node, env: Env) -> None:
        exc = ProgramError(n.uid)
        tag(exc, n.uid)
        raise exc

    def s_current(self, n: Node, env: Env) -> None:
        try:
            conn = pgctx.current_connection(self.pool, n.key)
        except Exception as exc:
            tag(exc, n.uid)
            raise
        self.trace.append(("cc", n.uid, self.shared(conn)))

    def s_try(self, n: Node, env: Env) -> None:
        try:
            self.run_sync(n.body, env)
        except Exception as exc:
            self.trace.append(("caught", n.uid, outcome(exc)))

    def s_block(self, n: Node, env: Env) -> None:
        try:
            with self.pool.connection(n.key, separate=n.separate) as conn:
                self.entered(n.uid, conn)
                try:
                    self.run_sync(n.body, env)
                finally:
                    self.left(n.uid)
        except Exception as exc:
            tag(exc, n.uid)
            raise

    def s_savepoint(self, n: Node, env: Env) -> None:
        try:
            with pgctx.savepoint(self.pool, n.key):
                self.run_sync(n.body, env)
        except Exception as exc:
            tag(exc, n.uid)
            raise

    def s_call(self, n: Node, env: Env) -> None:
        runner = self

        @pgctx.with_connection(self.pool, key=n.key, separate=n.separate)
        def call(conn: Any = None) -> None:
            runner.entered(n.uid, conn)
            try:
                runner.run_sync(n.body, env)
            finally:
                runner.left(n.uid)

        try:
            call()
        except Exception as exc:
            tag(exc, n.uid)
            raise

    def s_use_gen(self, n: Node, env: Env) -> None:
        holder = [self.make_gen(n)]
        try:
            self.step(n.uid, holder)
            self.run_sync(n.consumer, replace(env, gen=(n.uid, holder, False)))
            if n.end == "exhaust":
                while self.step(n.uid, holder):
                    pass
        finally:
            self.end_gen(n, holder)

    def step(self, uid: int, holder: list[Any]) -> bool:
        try:
            item = next(holder[0], _STOP)
        except Exception as exc:
            tag(exc, uid)  # raised by the generator's own block (its body tags its own)
            raise
        if item is _STOP:
            self.trace.append(("stop", uid))
            return False
        self.trace.append(("got", uid, item))
        return True

    def end_gen(self, n: Node, holder: list[Any]) -> None:
        gen = holder.pop()
        if n.end != "drop":
            gen.close()
        elif self.cyclic_drops:
            cycle: list[Any] = [gen]
            cycle.append(cycle)  # only the cyclic garbage collector frees it, whenever
        # else the last reference goes when this frame ends

    def s_next(self, n: Node, env: Env) -> None:
        assert env.gen is not None and not env.gen[2]
        self.step(env.gen[0], env.gen[1])

    def s_ctx_thread(self, n: Node, env: Env) -> None:
        box: dict[str, BaseException] = {}
        ctx = contextvars.copy_context()

        def target() -> None:
            try:
                ctx.run(self.run_sync, n.body, Env(ctl=env.ctl))
            except BaseException as exc:
                box["error"] = exc

        thread = threading.Thread(target=target, daemon=True)
        thread.start()
        thread.join(BOUND)
        if thread.is_alive():
            raise Stuck("a copy_context thread never ended")
        if "error" in box:
            raise box.pop("error")

    def s_submit(self, n: Node, env: Env) -> None:
        self.executor.submit(self.run_sync, n.body, Env()).result(BOUND)

    def s_pause(self, n: Node, env: Env) -> None:
        if env.ctl is not None and not env.ctl.paused:
            env.ctl.pause()

    def s_late(self, n: Node, env: Env) -> None:
        spawned: list[Any] = []
        try:
            self.run_sync(n.body, replace(env, late=spawned))
        finally:
            for item in spawned:
                self.release_thread(*item)

    def s_spawn(self, n: Node, env: Env) -> None:
        assert env.late is not None
        gate = threading.Event()
        box: dict[str, BaseException] = {}
        ctx = contextvars.copy_context()  # the context as it is now, inside the blocks

        def target() -> None:
            if not gate.wait(BOUND):
                box["error"] = Stuck("a spawned thread was never released")
                return
            try:
                ctx.run(self.run_sync, n.body, Env())
            except BaseException as exc:
                box["error"] = exc

        thread = threading.Thread(target=target, daemon=True)
        thread.start()
        env.late.append(("thread", n, gate, thread, box))

    def release_thread(self, kind: str, n: Node, gate: Any, thread: Any, box: Any) -> None:
        gate.set()
        thread.join(BOUND)
        if thread.is_alive():
            raise Stuck("a spawned thread never ended")
        error = box.get("error")
        self.trace.append(("late", n.uid, "ok" if error is None else outcome(error)))

    # -- generator bodies: the same statements, in generator frames -----------

    def make_gen(self, n: Node) -> Any:
        runner = self
        decorate = pgctx.with_connection(self.pool, key=n.key, separate=n.separate)
        if n.aio:

            @decorate
            async def agen(conn: Any = None) -> AsyncIterator[int]:
                runner.entered(n.uid, conn)
                try:
                    inner = runner.agen_stmts(n.body, Env())
                    try:
                        async for item in inner:
                            yield item
                    finally:
                        await inner.aclose()
                finally:
                    runner.left(n.uid)

            return agen()

        @decorate
        def gen(conn: Any = None) -> Iterator[int]:
            runner.entered(n.uid, conn)
            try:
                yield from runner.gen_stmts(n.body, Env())
            finally:
                runner.left(n.uid)

        return gen()

    def gen_stmts(self, body: list[Node], env: Env) -> Iterator[int]:
        for n in body:
            if n.kind == "yield":
                yield n.uid
            elif n.kind in ("block", "try", "savepoint"):
                yield from getattr(self, "g_" + n.kind)(n, env)
            else:
                getattr(self, "s_" + n.kind)(n, env)

    def g_block(self, n: Node, env: Env) -> Iterator[int]:
        try:
            with self.pool.connection(n.key, separate=n.separate) as conn:
                self.entered(n.uid, conn)
                try:
                    yield from self.gen_stmts(n.body, env)
                finally:
                    self.left(n.uid)
        except Exception as exc:
            tag(exc, n.uid)
            raise

    def g_try(self, n: Node, env: Env) -> Iterator[int]:
        try:
            yield from self.gen_stmts(n.body, env)
        except Exception as exc:
            self.trace.append(("caught", n.uid, outcome(exc)))

    def g_savepoint(self, n: Node, env: Env) -> Iterator[int]:
        try:
            with pgctx.savepoint(self.pool, n.key):
                yield from self.gen_stmts(n.body, env)
        except Exception as exc:
            tag(exc, n.uid)
            raise
