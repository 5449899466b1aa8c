"""Runs a program of tests/scope_programs.py against pgctx and the real server.

It produces the same trace as tests/scope_model.py: ("enter", uid, blocks sharing the
connection), ("cc", uid, same), ("caught", uid, outcome), ("got"/"stop", gen uid, ...),
("child", gather uid, i, outcome), ("late", spawn uid, outcome), ("end", outcome). An
outcome is "ok" or (exception class name, uid of the node it came from): every node
tags the exceptions it starts (``_model_origin``).

Code a user would write in a generator body runs in generator frames here too
(``gen_stmts``/``agen_stmts``), because pgctx tells them apart. The schedule is forced:
gather children run one at a time up to their pause (events, no sleeps), and every wait
is bounded (``BOUND``) so that a hang fails instead of blocking the run.
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
from tests.scope_programs import Node, Program

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


class Runner:
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

    def run(self, program: Program) -> list[Any]:
        contextvars.copy_context().run(self._top, program)
        return self.trace

    def _top(self, program: Program) -> None:
        end: Any = "ok"
        try:
            if program.aio:
                asyncio.run(self.arun(program.body, Env()))
            else:
                self.run_sync(program.body, Env())
        except Exception as exc:
            end = outcome(exc)
        self.trace.append(("end", end))

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

    async def agen_stmts(self, body: list[Node], env: Env) -> AsyncIterator[int]:
        for n in body:
            if n.kind == "yield":
                yield n.uid
            elif n.kind in ("block", "try", "savepoint"):
                inner = getattr(self, "ag_" + n.kind)(n, env)
                try:
                    async for item in inner:
                        yield item
                finally:
                    await inner.aclose()  # at once, not when the loop finalises it
            else:
                await self.arun([n], env)

    async def ag_block(self, n: Node, env: Env) -> AsyncIterator[int]:
        try:
            async with self.pool.connection(n.key, separate=n.separate) as conn:
                self.entered(n.uid, conn)
                inner = self.agen_stmts(n.body, env)
                try:
                    async for item in inner:
                        yield item
                finally:
                    await inner.aclose()
                    self.left(n.uid)
        except Exception as exc:
            tag(exc, n.uid)
            raise

    async def ag_try(self, n: Node, env: Env) -> AsyncIterator[int]:
        inner = self.agen_stmts(n.body, env)
        try:
            async for item in inner:
                yield item
        except Exception as exc:
            self.trace.append(("caught", n.uid, outcome(exc)))
        finally:
            await inner.aclose()

    async def ag_savepoint(self, n: Node, env: Env) -> AsyncIterator[int]:
        try:
            with pgctx.savepoint(self.pool, n.key):
                await self.arun(n.body, env)  # never a yield inside a savepoint
        except Exception as exc:
            tag(exc, n.uid)
            raise
        return
        yield  # an async generator, like the others

    # -- statements in coroutines ---------------------------------------------

    async def arun(self, body: list[Node], env: Env) -> None:
        for node in body:
            method = getattr(self, "a_" + node.kind, None)
            if method is None:
                getattr(self, "s_" + node.kind)(node, env)
            else:
                await method(node, env)

    async def a_try(self, n: Node, env: Env) -> None:
        try:
            await self.arun(n.body, env)
        except Exception as exc:
            self.trace.append(("caught", n.uid, outcome(exc)))

    async def a_block(self, n: Node, env: Env) -> None:
        try:
            scope = self.pool.connection(n.key, separate=n.separate)
            if n.aio:
                async with scope as conn:
                    await self._inside(n, conn, env)
            else:
                with scope as conn:
                    await self._inside(n, conn, env)
        except Exception as exc:
            tag(exc, n.uid)
            raise

    async def _inside(self, n: Node, conn: Any, env: Env) -> None:
        self.entered(n.uid, conn)
        try:
            await self.arun(n.body, env)
        finally:
            self.left(n.uid)

    async def a_savepoint(self, n: Node, env: Env) -> None:
        try:
            with pgctx.savepoint(self.pool, n.key):
                await self.arun(n.body, env)
        except Exception as exc:
            tag(exc, n.uid)
            raise

    async def a_call(self, n: Node, env: Env) -> None:
        if not n.aio:
            self.s_call(n, env)
            return
        runner = self

        @pgctx.with_connection(self.pool, key=n.key, separate=n.separate)
        async def call(conn: Any = None) -> None:
            await runner._inside(n, conn, env)

        try:
            await call()
        except Exception as exc:
            tag(exc, n.uid)
            raise

    async def a_use_gen(self, n: Node, env: Env) -> None:
        holder = [self.make_gen(n)]
        try:
            await self.astep(n.uid, holder, n.aio)
            await self.arun(n.consumer, replace(env, gen=(n.uid, holder, n.aio)))
            if n.end == "exhaust":
                while await self.astep(n.uid, holder, n.aio):
                    pass
        finally:
            if n.aio:
                await holder.pop().aclose()
            else:
                self.end_gen(n, holder)

    async def astep(self, uid: int, holder: list[Any], aio: bool) -> bool:
        if not aio:
            return self.step(uid, holder)
        try:
            item = await holder[0].__anext__()
        except StopAsyncIteration:
            self.trace.append(("stop", uid))
            return False
        except Exception as exc:
            tag(exc, uid)
            raise
        self.trace.append(("got", uid, item))
        return True

    async def a_next(self, n: Node, env: Env) -> None:
        assert env.gen is not None
        await self.astep(*env.gen)

    async def a_to_thread(self, n: Node, env: Env) -> None:
        await asyncio.to_thread(self.run_sync, n.body, Env(ctl=env.ctl))

    async def a_await_task(self, n: Node, env: Env) -> None:
        await asyncio.create_task(self.arun(n.body, Env(ctl=env.ctl)))

    async def a_pause(self, n: Node, env: Env) -> None:
        if env.ctl is not None and not env.ctl.paused:
            await env.ctl.pause_async()

    async def a_gather(self, n: Node, env: Env) -> None:
        loop = asyncio.get_running_loop()
        count = len(n.body)
        turn = [Gate(loop) for _ in range(count)]
        ctls = [Ctl(Gate(loop), Gate(loop)) for _ in range(count)]
        futures = []
        for child, go, ctl in zip(n.body, turn, ctls):
            if child.aio:
                work: Any = self.task_child(child, go, ctl)
            else:
                work = asyncio.to_thread(self.thread_child, child, go, ctl)
            futures.append(asyncio.ensure_future(work))

        async def driver() -> None:
            for go, ctl in zip(turn, ctls):  # one at a time up to its pause...
                go.set()
                await ctl.arrived.wait_async()
            for future, ctl in zip(futures, ctls):  # ...then each to its end
                ctl.resume.set()
                await asyncio.wait([future], timeout=BOUND)

        *results, drove = await asyncio.gather(*futures, driver(), return_exceptions=True)
        if drove is not None:
            raise drove
        for i, result in enumerate(results):
            self.trace.append(("child", n.uid, i, "ok" if result is None else outcome(result)))

    async def task_child(self, child: Node, go: Gate, ctl: Ctl) -> None:
        await go.wait_async()
        try:
            await self.arun(child.body, Env(ctl=ctl))
        finally:
            if not ctl.paused:
                await ctl.pause_async()

    def thread_child(self, child: Node, go: Gate, ctl: Ctl) -> None:
        go.wait()
        try:
            self.run_sync(child.body, Env(ctl=ctl))
        finally:
            if not ctl.paused:
                ctl.pause()

    async def a_late(self, n: Node, env: Env) -> None:
        spawned: list[Any] = []
        try:
            await self.arun(n.body, replace(env, late=spawned))
        finally:
            for item in spawned:
                if item[0] == "thread":
                    self.release_thread(*item)
                    continue
                _, s, gate, task, _ = item
                gate.set()
                result: Any = "ok"
                try:
                    await task
                except Exception as exc:
                    result = outcome(exc)
                self.trace.append(("late", s.uid, result))

    async def a_spawn(self, n: Node, env: Env) -> None:
        if not n.aio:
            self.s_spawn(n, env)
            return
        assert env.late is not None
        gate = asyncio.Event()

        async def late() -> None:
            await asyncio.wait_for(gate.wait(), BOUND)
            await self.arun(n.body, Env())

        env.late.append(("task", n, gate, asyncio.create_task(late()), None))
