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
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

import pgctx
from tests.scope_programs import Node, Program
from tests.scope_runner_sync import BOUND, Ctl, Env, Gate, SyncRunner, outcome, tag

__all__ = ["Runner"]


class Runner(SyncRunner):
    """The interpreter: SyncRunner plus coroutines, async generators, tasks and gather."""

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
        for child, go, ctl in zip(n.body, turn, ctls, strict=True):
            if child.aio:
                work: Any = self.task_child(child, go, ctl)
            else:
                work = asyncio.to_thread(self.thread_child, child, go, ctl)
            futures.append(asyncio.ensure_future(work))

        async def driver() -> None:
            for go, ctl in zip(turn, ctls, strict=True):  # one at a time up to its pause...
                go.set()
                await ctl.arrived.wait_async()
            for future, ctl in zip(futures, ctls, strict=True):  # ...then each to its end
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
