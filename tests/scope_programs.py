"""Random programs over the scope layer, for the model-based test (tests/test_scope_model.py).

A program is a tree of :class:`Node` s: with-blocks, savepoints, decorated functions and
generators, child threads and tasks, inserts, raises and catches. The hypothesis strategy
:func:`programs` builds them; every node gets a number (``uid``) that names it in traces,
in the printed program and in the table (an insert writes row ``base + uid``).

Where a construct may appear is decided here, so that every generated program has one
meaning under the documented rules (the cases the rules leave open are never built, or
are refused by the reference model): yields only at a generator body's own level and
never inside a savepoint, pauses only where waiting cannot block the event loop, an
abandoned (dropped) generator only when it uses nothing but its own connection.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from hypothesis import strategies as st

KEYS: tuple[Any, ...] = (None, "a")
_ANY = object()  # Where.own_key when blocks of any key may be built


@dataclass(eq=False)
class Node:
    """One statement. ``kind`` picks the meaning of the other fields (see KINDS)."""

    kind: str
    key: Any = None
    separate: bool = False
    aio: bool = False  # async with / async def / async generator / task (else thread)
    body: list[Node] = field(default_factory=list)
    consumer: list[Node] = field(default_factory=list)  # use_gen: the code iterating it
    end: str = ""  # use_gen: "exhaust", "close" or "drop", after the consumer code
    uid: int = field(default=0, init=False)


# kind -> what it does (the interpreter in tests/scope_runner.py, the model in
# tests/scope_model.py):
KINDS = {
    "insert": "current_connection(pool, key), INSERT row base+uid",
    "dup": "current_connection(pool, key), INSERT the committed row base: UniqueViolation",
    "iface": "current_connection(pool, key), use a closed cursor: InterfaceError, no SQLSTATE",
    "raise": "raise ProgramError",
    "current": "current_connection(pool, key); trace which open blocks share it",
    "try": "try: body / except Exception: trace what was caught",
    "block": "with (or async with) pool.connection(key, separate=...): body",
    "savepoint": "with pgctx.savepoint(pool, key): body",
    "call": "a @with_connection(pool, key=, separate=) function (async def if aio), called",
    "use_gen": "a decorated (async) generator: first step, consumer code, then end",
    "yield": "yield uid (generator bodies only)",
    "next": "one more step of the innermost use_gen (consumer code only)",
    "to_thread": "await asyncio.to_thread(body)",
    "ctx_thread": "Thread(target=copy_context().run, args=(body,)): start, join",
    "await_task": "await asyncio.create_task(body)",
    "submit": "executor.submit(body).result() (no context copied)",
    "gather": "asyncio.gather of the body's 'child' nodes (tasks, or to_thread if not aio)",
    "child": "one gather child; runs until its first pause while its siblings wait",
    "pause": "the enclosing gather child waits here until every sibling paused or ended",
    "late": "body; then every 'spawn' in it is released and waited for, in order",
    "spawn": "a task (aio) or copy_context thread started here, run when its late ends",
}


@dataclass(frozen=True)
class Features:
    """Which constructs a variant builds."""

    generators: bool = False
    drops: bool = False  # abandoned generators
    gather: bool = False
    iface: bool = False


@dataclass(frozen=True)
class Where:
    """What may be built at one place of a program."""

    features: Features
    aio: bool
    depth: int = 0
    gen: str | None = None  # "sync"/"async": a generator body's own level (yield allowed)
    pause: str | None = None  # "task"/"thread": inside a gather child, pausing allowed
    consumer: bool = False  # consumer code of a use_gen (next allowed)
    late: bool = False  # inside a late, same thread or task (spawn allowed)
    own_key: Any = _ANY  # dropped generator body: only blocks of this key or separate
    gather_ok: bool = True
    bound: frozenset[Any] = frozenset()  # keys that blocks around here (probably) bound
    guarded: bool = False  # a try (or a gather or late) catches what is raised here

    def binding(self, key: Any) -> Where:
        return replace(self, bound=self.bound | {key})

    def inner(self) -> Where:
        return replace(self, depth=self.depth + 1)

    def sync_function(self) -> Where:
        """A function body run in this thread (pausing there would block the loop)."""
        return replace(
            self,
            aio=False,
            depth=self.depth + 1,
            gen=None,
            consumer=False,
            late=False,
            pause="thread" if self.pause == "thread" else None,
        )

    def thread(self, pause: str | None) -> Where:
        return replace(
            self,
            aio=False,
            depth=self.depth + 1,
            gen=None,
            consumer=False,
            late=False,
            pause=pause,
            gather_ok=False,
        )


class Program:
    """A whole program: sync, or ``asyncio.run()`` of an async one."""

    def __init__(self, aio: bool, body: list[Node]) -> None:
        self.aio = aio
        self.body = body

    def __repr__(self) -> str:
        return "\n" + render(self)


MAX_DEPTH = 4


def _kinds(w: Where) -> list[str]:
    """The kinds that may be built at ``w``, repeated to weight them (simple ones first,
    so that shrinking turns statements into inserts)."""
    f = w.features
    free = w.own_key is _ANY  # not inside an abandoned generator's body
    # Outside any block these only raise NoActiveConnection: build them less there.
    bound = bool(w.bound)
    uses = 4 if bound else int(w.depth > 0)  # never a lone NoActiveConnection program
    kinds = ["insert"] * uses + ["current"] * (uses // 2 or int(w.depth > 0))
    # Failures mostly where something catches them: uncaught, they end the program.
    fails = 2 * w.guarded
    kinds += ["raise"] * (fails + 1) + ["dup"] * (fails * bound)
    if f.iface and bound:
        kinds += ["iface"] * fails
    if w.gen is not None:
        kinds += ["yield"] * 4 + ["across_yield"] * 2
    if w.consumer:
        kinds += ["next"] * 3 + ["step_inside"] * 2
    if w.pause is not None:
        kinds += ["pause"] * 3
    if w.late:
        kinds += ["spawn"] * 2
    if w.depth >= MAX_DEPTH:
        return kinds
    kinds += ["block"] * (4 if bound else 8) + ["try"] * (1 if w.guarded else 3)
    kinds += ["savepoint", "guard", "failed_join"] * (2 * bound)
    if not free:
        return kinds
    # Hand-offs from a generator body must see the generator's own blocks.
    handoffs = 3 if w.gen is not None else 1
    kinds += ["call"] * 3 + ["ctx_thread"] * handoffs + ["late"]
    if w.depth <= 1:
        kinds.append("submit")
    if f.generators and w.gen is None and not w.consumer:
        kinds += ["use_gen"] * 2
    if w.aio:
        kinds += ["to_thread", "await_task"] * handoffs
        if f.gather and w.gather_ok and w.gen is None and w.depth <= 2:
            kinds += ["gather"] * (4 * bound)  # children that meet on their parent's connection
    return kinds


def _used_key(draw: Any, w: Where) -> Any:
    """A key for current_connection() and savepoint(): mostly one bound around here.

    Both draws happen whatever ``w`` is, so that shrinking an enclosing statement away
    leaves this one's choices meaning the same.
    """
    key, stray = draw(st.sampled_from(KEYS)), draw(st.integers(0, 9)) >= 8
    if key in w.bound or not w.bound or stray:
        return key
    return sorted(w.bound, key=str)[0]


def _key(draw: Any, w: Where) -> tuple[Any, bool]:
    if w.own_key is not _ANY:
        separate = draw(st.booleans())
        return (draw(st.sampled_from(KEYS)) if separate else w.own_key), separate
    return draw(st.sampled_from(KEYS)), draw(st.sampled_from([False, False, True]))


def _body(draw: Any, w: Where, min_size: int = 0) -> list[Node]:
    size = 4 if w.depth <= 1 else 3 if w.depth <= 2 else 2
    return draw(st.lists(statement(w), min_size=min_size, max_size=size))


@st.composite
def statement(draw: Any, w: Where) -> Node:
    return _build(draw, w, draw(st.sampled_from(_kinds(w))))


def _build(draw: Any, w: Where, kind: str) -> Node:
    if kind in ("insert", "current", "dup", "iface"):
        return Node(kind, key=_used_key(draw, w))
    if kind in ("raise", "yield", "next", "pause"):
        return Node(kind)
    if kind == "across_yield":  # a generator's own block stays open while it is suspended
        key, separate = _key(draw, w)
        if w.own_key is _ANY:
            separate = draw(st.booleans())
        inner = w.inner().binding(key)
        body = [*_body(draw, inner), Node("yield"), *_body(draw, inner, 1)]
        return Node("block", key=key, separate=separate, body=body)
    if kind == "step_inside":  # the generator's next step runs inside a newer block
        key, separate = _key(draw, w)
        rest = _body(draw, w.inner().binding(key))
        return Node("block", key=key, separate=separate, body=[Node("next"), *rest])
    if kind == "try":
        return Node(kind, body=_body(draw, replace(w.inner(), guarded=True), 1))
    if kind == "block":
        key, separate = _key(draw, w)
        aio = w.aio and draw(st.booleans())
        body = _body(draw, w.inner().binding(key))
        return Node(kind, key=key, separate=separate, aio=aio, body=body)
    if kind == "savepoint":  # never a yield inside: the consumer would run inside it
        body = _body(draw, replace(w.inner(), gen=None), 1)
        return Node(kind, key=_used_key(draw, w), body=body)
    if kind == "failed_join":  # try: with the same connection (joined): ...; risky()
        key = _used_key(draw, w)
        body = _body(draw, w.inner().binding(key))
        body.append(Node(_risky(draw, w), key=key))
        return Node("try", body=[Node("block", key=key, body=body)])
    if kind == "guard":  # the documented idiom: try: with savepoint(): ...; risky()
        key = _used_key(draw, w)
        body = [Node("insert", key=key), *_body(draw, replace(w.inner(), gen=None).binding(key))]
        risky = Node(_risky(draw, w), key=key)
        if draw(st.integers(0, 2)) == 2:  # swallowed inside: the savepoint must not release
            risky = Node("try", body=[risky])
        body.append(risky)
        return Node("try", body=[Node("savepoint", key=key, body=body)])
    if kind == "call":
        key, separate = _key(draw, w)
        aio = w.aio and draw(st.booleans())
        inner = (
            replace(w.inner(), gen=None, consumer=False, late=False) if aio else w.sync_function()
        )
        return Node(kind, key=key, separate=separate, aio=aio, body=_body(draw, inner.binding(key)))
    if kind == "use_gen":
        return _use_gen(draw, w)
    if kind == "to_thread":
        return Node(kind, body=_body(draw, w.thread("thread" if w.pause else None), 1))
    if kind == "ctx_thread":  # its parent blocks in join(): no pause unless that is a thread
        return Node(kind, body=_body(draw, w.thread("thread" if w.pause == "thread" else None), 1))
    if kind == "await_task":
        inner = replace(w.inner(), gen=None, consumer=False, late=False)
        return Node(kind, body=_body(draw, inner, 1))
    if kind == "submit":  # an executor job sees no binding
        return Node(kind, body=_body(draw, replace(w.thread(None), bound=frozenset()), 1))
    if kind == "gather":
        children = [_child(draw, w, draw(st.booleans())) for _ in range(draw(st.integers(2, 3)))]
        return Node(kind, body=children)
    if kind == "late":
        return Node(kind, body=_body(draw, replace(w.inner(), late=True, gen=None), 1))
    assert kind == "spawn"
    aio = w.aio and draw(st.booleans())
    inner = (
        replace(w.inner(), gen=None, consumer=False, late=False, pause=None, gather_ok=False)
        if aio
        else w.thread(None)
    )
    return Node(kind, aio=aio, body=_body(draw, replace(inner, guarded=True), 1))


def _child(draw: Any, w: Where, thread: bool) -> Node:
    """A gather child; it mostly starts by using a binding of its parent, or by holding
    a block open across its pause, so that siblings meet on one connection."""
    if thread:
        inner = w.thread("thread")
    else:
        inner = replace(
            w.inner(), gen=None, consumer=False, late=False, pause="task", gather_ok=False
        )
    inner = replace(inner, guarded=True)  # gather(return_exceptions=True)
    lead = draw(st.sampled_from(["use", "hold", "none"]))
    key = _used_key(draw, inner)
    body: list[Node] = []
    if lead == "use":
        body.append(Node(draw(st.sampled_from(["insert", "current"])), key=key))
    elif lead == "hold":
        held = inner.inner().binding(key)
        block = [*_body(draw, held), Node("pause"), *_body(draw, held)]
        body.append(Node("block", key=key, separate=draw(st.booleans()), body=block))
    body += _body(draw, inner, 0 if body else 1)
    return Node("child", aio=not thread, body=body)


def _risky(draw: Any, w: Where) -> str:
    return draw(
        st.sampled_from(["raise", "dup", "iface"] if w.features.iface else ["raise", "dup"])
    )


def _use_gen(draw: Any, w: Where) -> Node:
    aio = w.aio and draw(st.booleans())
    ends = ["exhaust", "exhaust", "close"]
    if w.features.drops and not aio:  # an async generator's finaliser runs when the loop says
        ends.append("drop")
    end = draw(st.sampled_from(ends))
    if end == "drop":  # self-contained: its fate cannot depend on when it is collected
        key, separate = draw(st.sampled_from(KEYS)), True
        own: Any = key
    else:
        key, separate = _key(draw, w)
        own = _ANY
    body_where = replace(
        w.inner(),
        aio=aio,
        gen="async" if aio else "sync",
        pause=None,
        consumer=False,
        late=False,
        own_key=own,
        gather_ok=False,
    )
    body = _body(draw, body_where.binding(key), 1)
    consumer = _body(draw, replace(w.inner(), consumer=True, gen=None))
    return Node(
        "use_gen", key=key, separate=separate, aio=aio, body=body, consumer=consumer, end=end
    )


@st.composite
def programs(draw: Any, features: Features) -> Program:
    aio = draw(st.sampled_from([True, True, False] if features.gather else [True, False]))
    body = draw(st.lists(statement(Where(features, aio)), min_size=1, max_size=5))
    featured = [
        kind
        for kind, on in (
            ("use_gen", features.generators),
            ("gather", features.gather and aio),
            ("guard", features.iface),
        )
        if on
    ]
    # Most programs of a variant hold that variant's construct, in a block (a draw that
    # shrinks to "no", so that shrunk programs keep it only when it matters).
    if featured and draw(st.integers(0, 3)):
        key = draw(st.sampled_from(KEYS))
        inner = Where(features, aio, depth=1, bound=frozenset([key]))
        node = _build(draw, inner, draw(st.sampled_from(featured)))
        body.insert(draw(st.integers(0, len(body))), Node("block", key=key, body=[node]))
    program = Program(aio, body)
    number(program)
    return program


def walk(nodes: list[Node]) -> Any:
    for node in nodes:
        yield node
        yield from walk(node.body)
        yield from walk(node.consumer)


def number(program: Program) -> None:
    """Give every node its uid, in reading order, from 1."""
    for uid, node in enumerate(walk(program.body), start=1):
        node.uid = uid


def render(program: Program) -> str:
    """The program as indented pseudo-Python, each line ending with its node's uid."""
    lines = [f"{'async ' if program.aio else ''}program:"]
    _render(program.body, 1, lines)
    return "\n".join(lines)


def _head(n: Node) -> str:
    k = repr(n.key)
    sep = ", separate=True" if n.separate else ""
    if n.kind == "block":
        return f"{'async ' if n.aio else ''}with connection({k}{sep}):"
    if n.kind == "savepoint":
        return f"with savepoint({k}):"
    if n.kind == "call":
        return f"@with_connection(key={k}{sep}) {'async ' if n.aio else ''}def, called:"
    if n.kind == "use_gen":
        return f"@with_connection(key={k}{sep}) {'async ' if n.aio else ''}generator, then {n.end}:"
    if n.kind in ("child", "spawn"):
        return f"{n.kind} {'task' if n.aio else 'thread'}:"
    if n.body:
        return f"{n.kind}:"
    return f"{n.kind}({k})" if n.kind in ("insert", "dup", "iface", "current") else n.kind


def _render(nodes: list[Node], depth: int, lines: list[str]) -> None:
    pad = "    " * depth
    for n in nodes:
        lines.append(f"{pad}{_head(n)}  #{n.uid}")
        _render(n.body, depth + 1, lines)
        if n.kind == "use_gen":
            lines.append(f"{pad}  consumer (after the first step):")
            _render(n.consumer, depth + 1, lines)
