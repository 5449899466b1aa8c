"""The reference model: what the documented rules say a program of tests/scope_programs.py does.

It runs a program on paper, deterministically, in the order the interpreter's schedule
forces (gather children run one at a time up to their pause, then finish one at a
time), and returns the trace the real run must produce and the rows that must end up
committed. The rules it encodes (DESIGN.md, docs/connections.md, decorators.md,
concurrency.md):

- a block joins the binding visible for its key (unless ``separate``), else opens one;
  the outermost block commits on a clean exit, unless the unit failed: an exception
  escaped a joined block, a database error left the transaction failed, or a
  concurrent use was refused; then it rolls back and raises TransactionAborted. An
  exception leaving the outermost block rolls back and propagates;
- a savepoint undoes its part (rows, failed transaction, failure mark) when an
  exception leaves it, and also on a clean exit after a failure inside it, then
  raising TransactionAborted;
- a decorated generator opens (or joins) its block at its first step, sees the
  consumer's context as it was then plus its own blocks, which persist across
  yields; its consumer never sees them; close() ends its blocks without failing a
  joined unit;
- a child thread or task sees the parent's bindings; one that uses a binding (block,
  current_connection, savepoint) holds it until it is done; another that uses it
  meanwhile gets ConcurrentUseError and fails the unit; hand-offs in sequence join;
- a binding whose block ended is never visible; executor jobs see nothing.

Where the rules are silent, the model raises :class:`Excluded` and the program is
not used (see the questions in the test module's docstring).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Any

from tests.scope_programs import Node, Program

CAPACITY = 20  # bindings open at once (the test pool has more connections than this)
LEAVES = frozenset(["insert", "dup", "iface", "raise", "current", "next", "spawn"])


class Excluded(Exception):
    """The program reaches a case the rules leave open: do not use it."""


class MErr(Exception):
    """An exception of the modelled program: its kind and the node it came from."""

    def __init__(self, kind: str, origin: int, iface: Binding | None = None) -> None:
        super().__init__(kind, origin)
        self.kind = kind
        self.origin = origin
        self.iface = iface  # an InterfaceError: the binding whose connection raised it
        self.settled = False  # it left a savepoint or joined block of that binding

    @property
    def outcome(self) -> tuple[str, int]:
        return (self.kind, self.origin)


class Entity:
    """A thread or task of the program (generators run in their consumer's)."""

    def __init__(self, parent: Entity | None, concurrent: bool) -> None:
        self.parent = parent
        self.concurrent = concurrent  # a gather child: runs beside its siblings
        self.done = False
        self.holds: list[Binding] = []

    def lineage(self) -> list[Entity]:
        """Its ancestors, nearest first."""
        found, e = [], self.parent
        while e is not None:
            found.append(e)
            e = e.parent
        return found


class Binding:
    """One connection checked out by an outermost block, and its transaction."""

    def __init__(self, key: Any, opener: Entity) -> None:
        self.key = key
        self.blocks: list[int] = []  # uids of the blocks inside it now
        self.holders = [opener]  # who may use it now: the last one
        self.shadows: list[Entity] = []  # see check_use
        self.rows: list[int] = []  # inserted in the open transaction
        self.savepoints: list[tuple[int, bool]] = []  # (rows before, failed before)
        self.aborted = False  # the unit of work failed
        self.inerror = False  # the PostgreSQL transaction failed
        self.released = False


@dataclass
class Ctl:
    paused: bool = False


@dataclass
class Env:
    gen: tuple[int, list[Any]] | None = None  # the use_gen whose consumer code this is
    ctl: Ctl | None = None  # the gather child this runs in
    late: list[tuple[Node, dict[Any, Any]]] | None = None  # spawns of the enclosing late


@dataclass
class Kid:
    entity: Entity
    steps: Iterator[Any]
    over: bool = False
    outcome: Any = "ok"
    error: MErr | None = None


@dataclass
class Model:
    program: Program
    trace: list[Any] = field(default_factory=list)
    committed: set[int] = field(default_factory=set)
    live: int = 0

    def run(self) -> tuple[list[Any], set[int]]:
        root = Entity(None, False)
        end: Any = "ok"
        try:
            for token in self.stmts(self.program.body, root, {}, Env()):
                raise AssertionError(f"suspended at the top level: {token}")
        except MErr as exc:
            end = exc.outcome
        self.trace.append(("end", end))
        return self.trace, self.committed

    def stmts(self, body: list[Node], ent: Entity, ctx: dict[Any, Any], env: Env) -> Iterator[Any]:
        for node in body:
            run = getattr(self, "_" + node.kind)
            if node.kind in LEAVES:
                run(node, ent, ctx, env)
            else:
                yield from run(node, ent, ctx, env)

    # -- bindings -------------------------------------------------------------

    def lookup(self, ctx: dict[Any, Any], key: Any) -> Binding | None:
        chain = ctx.get(key, ())
        for i in range(len(chain) - 1, -1, -1):
            if not chain[i].released:
                if i != len(chain) - 1:
                    raise Excluded("fallback to a binding shadowed by one that ended")
                return chain[i]  # type: ignore[no-any-return]
        return None

    def check_use(self, b: Binding, ent: Entity, uid: int) -> None:
        for other in b.shadows:
            # A concurrent child whose hand-off used the binding: whether the child
            # itself now holds it (until done) or only its hand-off did is not said.
            if not other.done and other is not ent and other not in ent.lineage():
                raise Excluded("use beside a gather child whose hand-off used the binding")
        top = b.holders[-1]
        if top is ent:
            return
        lineage = ent.lineage()
        if top in lineage:
            b.shadows += [e for e in lineage[: lineage.index(top)] if e.concurrent]
            b.holders.append(ent)
            ent.holds.append(b)
            return
        if b.savepoints:
            raise Excluded("a concurrent use refused while a savepoint is open")
        b.aborted = True
        raise MErr("ConcurrentUseError", uid)

    def use(self, ctx: dict[Any, Any], key: Any, ent: Entity, uid: int) -> Binding:
        b = self.lookup(ctx, key)
        if b is None:
            raise MErr("NoActiveConnection", uid)
        self.check_use(b, ent, uid)
        return b

    def finish(self, ent: Entity) -> None:
        ent.done = True
        for b in ent.holds:
            if ent in b.holders:
                b.holders.remove(ent)

    def enter(
        self, key: Any, separate: bool, ent: Entity, ctx: dict[Any, Any], uid: int
    ) -> tuple[Binding, bool]:
        b = None if separate else self.lookup(ctx, key)
        opener = b is None
        if b is None:
            b = Binding(key, ent)
            self.live += 1
            if self.live > CAPACITY:
                raise Excluded("more connections at once than the test pool holds")
        else:
            self.check_use(b, ent, uid)
        self.trace.append(("enter", uid, tuple(sorted(b.blocks))))
        b.blocks.append(uid)
        return b, opener

    def leave(self, b: Binding, uid: int, opener: bool, exc: BaseException | None) -> None:
        b.blocks.remove(uid)
        if isinstance(exc, MErr) and exc.iface is b:
            exc.settled = True
        if not opener:
            if isinstance(exc, MErr):
                b.aborted = True
            return
        if b.blocks:
            raise AssertionError("the generator never lets an opener end before its joiners")
        b.released = True
        self.live -= 1
        if exc is not None:
            return  # rolled back (or the connection closed)
        if b.aborted or b.inerror:
            raise MErr("TransactionAborted", uid)
        self.committed.update(b.rows)

    def caught(self, exc: MErr) -> None:
        """``exc`` is swallowed here."""
        if exc.iface is not None and not exc.settled and not exc.iface.released:
            # Not a database error (the transaction is fine), but a psycopg2 error:
            # whether catching it without a savepoint fails the unit is not said.
            raise Excluded("InterfaceError caught without a savepoint or block around it")

    # -- leaves ---------------------------------------------------------------

    def _insert(self, n: Node, ent: Entity, ctx: dict[Any, Any], env: Env) -> None:
        b = self.use(ctx, n.key, ent, n.uid)
        if b.inerror:
            raise MErr("InFailedSqlTransaction", n.uid)
        b.rows.append(n.uid)

    def _dup(self, n: Node, ent: Entity, ctx: dict[Any, Any], env: Env) -> None:
        b = self.use(ctx, n.key, ent, n.uid)
        if b.inerror:
            raise MErr("InFailedSqlTransaction", n.uid)
        b.inerror = True
        raise MErr("UniqueViolation", n.uid)

    def _iface(self, n: Node, ent: Entity, ctx: dict[Any, Any], env: Env) -> None:
        raise MErr("InterfaceError", n.uid, self.use(ctx, n.key, ent, n.uid))

    def _raise(self, n: Node, ent: Entity, ctx: dict[Any, Any], env: Env) -> None:
        raise MErr("ProgramError", n.uid)

    def _current(self, n: Node, ent: Entity, ctx: dict[Any, Any], env: Env) -> None:
        b = self.use(ctx, n.key, ent, n.uid)
        self.trace.append(("cc", n.uid, tuple(sorted(b.blocks))))

    def _next(self, n: Node, ent: Entity, ctx: dict[Any, Any], env: Env) -> None:
        assert env.gen is not None
        self.step(*env.gen)

    def _spawn(self, n: Node, ent: Entity, ctx: dict[Any, Any], env: Env) -> None:
        assert env.late is not None
        env.late.append((n, dict(ctx)))

    # -- compound statements --------------------------------------------------

    def _try(self, n: Node, ent: Entity, ctx: dict[Any, Any], env: Env) -> Iterator[Any]:
        try:
            yield from self.stmts(n.body, ent, ctx, env)
        except MErr as exc:
            self.caught(exc)
            self.trace.append(("caught", n.uid, exc.outcome))

    def _block(self, n: Node, ent: Entity, ctx: dict[Any, Any], env: Env) -> Iterator[Any]:
        b, opener = self.enter(n.key, n.separate, ent, ctx, n.uid)
        inner = {**ctx, n.key: (*ctx.get(n.key, ()), b)}
        try:
            yield from self.stmts(n.body, ent, inner, env)
        except (MErr, GeneratorExit) as exc:
            self.leave(b, n.uid, opener, exc)
            raise
        self.leave(b, n.uid, opener, None)

    _call = _block  # a decorated function or coroutine is a block around its body

    def _savepoint(self, n: Node, ent: Entity, ctx: dict[Any, Any], env: Env) -> Iterator[Any]:
        b = self.use(ctx, n.key, ent, n.uid)
        if b.inerror:
            raise Excluded("savepoint() in a failed transaction (what it raises is not said)")
        mark = (len(b.rows), b.aborted)
        b.savepoints.append(mark)
        try:
            yield from self.stmts(n.body, ent, ctx, env)
        except MErr as exc:
            self.undo(b, mark)
            if exc.iface is b:
                exc.settled = True
            raise
        if (b.aborted and not mark[1]) or b.inerror:
            self.undo(b, mark)
            raise MErr("TransactionAborted", n.uid)
        b.savepoints.pop()

    def undo(self, b: Binding, mark: tuple[int, bool]) -> None:
        del b.rows[mark[0] :]
        b.inerror = False
        b.aborted = mark[1]
        b.savepoints.pop()

    def _use_gen(self, n: Node, ent: Entity, ctx: dict[Any, Any], env: Env) -> Iterator[Any]:
        holder = [self.gen_run(n, ent, dict(ctx))]
        try:
            self.step(n.uid, holder)
            yield from self.stmts(n.consumer, ent, ctx, replace(env, gen=(n.uid, holder)))
            if n.end == "exhaust":
                while self.step(n.uid, holder):
                    pass
        finally:
            holder[0].close()  # "drop": only self-contained generators, so as good as close

    def gen_run(self, n: Node, ent: Entity, ctx: dict[Any, Any]) -> Iterator[Any]:
        b, opener = self.enter(n.key, n.separate, ent, ctx, n.uid)
        inner = {**ctx, n.key: (*ctx.get(n.key, ()), b)}
        try:
            yield from self.stmts(n.body, ent, inner, Env())
        except (MErr, GeneratorExit) as exc:
            self.leave(b, n.uid, opener, exc)
            raise
        self.leave(b, n.uid, opener, None)

    def step(self, uid: int, holder: list[Any]) -> bool:
        try:
            token = next(holder[0])
        except StopIteration:
            self.trace.append(("stop", uid))
            return False
        assert token[0] == "yield", token
        self.trace.append(("got", uid, token[1]))
        return True

    def _yield(self, n: Node, ent: Entity, ctx: dict[Any, Any], env: Env) -> Iterator[Any]:
        yield ("yield", n.uid)

    def _pause(self, n: Node, ent: Entity, ctx: dict[Any, Any], env: Env) -> Iterator[Any]:
        if env.ctl is not None and not env.ctl.paused:
            env.ctl.paused = True
            yield ("pause",)

    def _to_thread(self, n: Node, ent: Entity, ctx: dict[Any, Any], env: Env) -> Iterator[Any]:
        child = Entity(ent, False)
        try:
            yield from self.stmts(n.body, child, dict(ctx), Env(ctl=env.ctl))
        finally:
            self.finish(child)

    _ctx_thread = _await_task = _to_thread

    def _submit(self, n: Node, ent: Entity, ctx: dict[Any, Any], env: Env) -> Iterator[Any]:
        child = Entity(None, False)  # an executor job: no context is copied
        try:
            yield from self.stmts(n.body, child, {}, Env())
        finally:
            self.finish(child)

    def _gather(self, n: Node, ent: Entity, ctx: dict[Any, Any], env: Env) -> Iterator[Any]:
        kids = []
        for c in n.body:
            e = Entity(ent, True)
            kids.append(Kid(e, self.stmts(c.body, e, dict(ctx), Env(ctl=Ctl()))))
        for kid in kids:  # each runs up to its pause (or its end) while the others wait
            self.advance(kid)
        for kid in kids:  # then each finishes, one after the other
            if not kid.over:
                self.advance(kid)
                assert kid.over
            self.finish(kid.entity)
        for i, kid in enumerate(kids):
            if kid.error is not None:
                self.caught(kid.error)
            self.trace.append(("child", n.uid, i, kid.outcome))
        yield from ()

    def advance(self, kid: Kid) -> None:
        try:
            token = next(kid.steps)
        except StopIteration:
            kid.over = True
        except MErr as exc:
            kid.over, kid.outcome, kid.error = True, exc.outcome, exc
        else:
            assert token == ("pause",), token

    def _late(self, n: Node, ent: Entity, ctx: dict[Any, Any], env: Env) -> Iterator[Any]:
        spawned: list[tuple[Node, dict[Any, Any]]] = []
        try:
            yield from self.stmts(n.body, ent, ctx, replace(env, late=spawned))
        finally:
            for s, seen in spawned:  # released one at a time; the parent waits for each
                child = Entity(ent, False)
                outcome: Any = "ok"
                try:
                    for token in self.stmts(s.body, child, seen, Env()):
                        raise AssertionError(f"a spawned body suspended: {token}")
                except MErr as exc:
                    self.caught(exc)
                    outcome = exc.outcome
                finally:
                    self.finish(child)
                self.trace.append(("late", s.uid, outcome))
