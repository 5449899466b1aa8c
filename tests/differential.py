"""Helpers for the differential test of ``pgctx.pool`` against ``psycopg2.pool``.

One :class:`World` wraps one pool (psycopg2's or pgctx's) and everything handed
out by it. Connections are compared across the two worlds by position: "the
i-th distinct connection object this pool ever handed out" (or the i-th
connection the constructor opened, for idle ones never handed out yet).
Keys are normalised so that psycopg2's automatic int keys and pgctx's private
automatic keys compare equal when they carry the same number.
"""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import Mapping
from typing import Any

import psycopg2
import psycopg2.errors
import psycopg2.extensions

# Explicit keys that can never equal one of psycopg2's automatic keys (1, 2, 3, ...)
# within an example (fewer than 10_000 getconn() calls). Colliding with them is
# defect D9, tested on its own.
EXPLICIT_KEYS: tuple[Any, ...] = ("a", "b", 0, ("t", 1), 10_000)

# putconn variants for a held connection: no key, its own key, close=True, both.
PUT_MODES = ("plain", "key", "close", "key_close")

# Operation kinds, repeated to weight them (hypothesis picks uniformly): mostly
# checkouts and returns, closeall rarely, so that sequences stay open long enough.
OP_KINDS = (
    *["get"] * 4,
    *["get_key"] * 3,
    *["put"] * 5,
    *["intrans"] * 2,
    *["inerror"] * 2,
    "user_close",
    "put_foreign",
    *["double_put"] * 2,
    "put_none",
    "closeall",
)

_STATUS_NAMES = {
    psycopg2.extensions.TRANSACTION_STATUS_IDLE: "IDLE",
    psycopg2.extensions.TRANSACTION_STATUS_INTRANS: "INTRANS",
    psycopg2.extensions.TRANSACTION_STATUS_INERROR: "INERROR",
}

Label = tuple[Any, ...]
Outcome = tuple[Any, ...]


def normalize_key(key: Any) -> Label:
    """Map a pool key to a world-independent label.

    psycopg2's automatic keys are the plain ints 1, 2, 3 ...; pgctx's are private
    objects carrying the same number (whatever their representation: an int
    attribute ``number``, or the int at the end of a private tuple).
    """
    if any(type(key) is type(k) and key == k for k in EXPLICIT_KEYS):
        return ("explicit", key)
    if type(key) is int:
        return ("auto", key)
    number = getattr(key, "number", None)
    if type(number) is int:
        return ("auto", number)
    if type(key) is tuple and key and type(key[-1]) is int:
        return ("auto", key[-1])
    return ("unrecognised", repr(key))


def _status(conn: Any) -> int | None:
    return None if conn.closed else int(conn.info.transaction_status)


HOOKS = ("_connect", "_getkey", "_getconn", "_putconn", "_closeall")


def recording_subclass(base: type, hooks: frozenset[str]) -> type:
    """A subclass of ``base`` whose overrides of ``hooks`` log each call and call super().

    The same body serves psycopg2's and pgctx's classes. ``pool.hook_log`` holds
    ``(hook, args, outcome)`` with the raw objects; ``World.hook_calls`` labels them.
    """

    class Recording(base):  # type: ignore[valid-type,misc]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            self.hook_log: list[list[Any]] = []
            super().__init__(*args, **kwargs)

        def _record(self, hook: str, method: Any, args: tuple[Any, ...]) -> Any:
            entry: list[Any] = [hook, args, None]
            self.hook_log.append(entry)
            try:
                result = method(*args)
            except Exception as exc:
                entry[2] = ("raise", type(exc), str(exc))
                raise
            entry[2] = ("ok", result)
            return result

        if "_connect" in hooks:

            def _connect(self, *args: Any) -> Any:
                return self._record("_connect", super()._connect, args)

        if "_getkey" in hooks:

            def _getkey(self, *args: Any) -> Any:
                return self._record("_getkey", super()._getkey, args)

        if "_getconn" in hooks:

            def _getconn(self, *args: Any) -> Any:
                return self._record("_getconn", super()._getconn, args)

        if "_putconn" in hooks:

            def _putconn(self, *args: Any) -> Any:
                return self._record("_putconn", super()._putconn, args)

        if "_closeall" in hooks:

            def _closeall(self, *args: Any) -> Any:
                return self._record("_closeall", super()._closeall, args)

    Recording.__name__ = Recording.__qualname__ = f"Recording{base.__name__}"
    return Recording


class World:
    """One pool under test plus the bookkeeping needed to compare it with its twin."""

    def __init__(
        self,
        module: Any,
        cls_name: str,
        minconn: int,
        maxconn: int,
        dsn: str,
        app: str,
        hooks: frozenset[str] | None = None,
    ) -> None:
        self.app = app
        self.foreign_app = f"{app}-foreign"
        self.dsn = dsn
        cls = getattr(module, cls_name)
        if hooks is not None:
            cls = recording_subclass(cls, hooks)
        self.pool = cls(minconn, maxconn, dsn, application_name=app)
        self.logged = 0  # hook_log entries already reported by hook_calls()
        self.initial: list[Any] = list(self.pool._pool)  # opened by the constructor
        self.handed: list[Any] = []  # distinct connections handed out, in order
        self.foreign: list[Any] = []

    # -- identification -------------------------------------------------------------

    def label(self, conn: Any) -> Label:
        for i, c in enumerate(self.handed):
            if c is conn:
                return ("handed", i)
        for i, c in enumerate(self.initial):
            if c is conn:
                return ("initial", i)
        for i, c in enumerate(self.foreign):
            if c is conn:
                return ("foreign", i)
        return ("unknown", type(conn).__name__)

    def _label_of_id(self, ident: int) -> Label:
        for conn in (*self.handed, *self.initial, *self.foreign):
            if id(conn) == ident:
                return self.label(conn)
        return ("unknown-id",)

    def tracked(self) -> list[Any]:
        """Every distinct pool connection this world knows of (not the foreign ones)."""
        seen: dict[int, Any] = {}
        for conn in (*self.initial, *self.handed):
            seen.setdefault(id(conn), conn)
        return list(seen.values())

    def held(self) -> list[int]:
        """Positions (in ``handed``) of the connections checked out now."""
        used = self.pool._used.values()
        return [i for i, c in enumerate(self.handed) if any(u is c for u in used)]

    def held_open(self) -> list[int]:
        return [i for i in self.held() if not self.handed[i].closed]

    def released(self) -> list[int]:
        held = set(self.held())
        return [i for i in range(len(self.handed)) if i not in held]

    # -- operations -----------------------------------------------------------------

    def resolve(self, raw: tuple[str, int, str, Any]) -> tuple[Any, ...]:
        """Turn a generated operation into a concrete one (indexes become positions)."""
        kind, index, mode, key = raw
        if kind == "get":
            return ("get",)
        if kind == "get_key":
            return ("get_key", key)
        if kind in ("put", "intrans", "inerror", "user_close", "double_put"):
            if kind == "put":
                candidates = self.held()
            elif kind == "double_put":
                candidates = self.released()
            else:
                candidates = self.held_open()
            if not candidates:
                return ("skip", kind)
            pos = candidates[index % len(candidates)]
            return (kind, pos, mode) if kind == "put" else (kind, pos)
        return (kind,)

    def apply(self, op: tuple[Any, ...]) -> Outcome:
        """Run one concrete operation; return everything observable about its outcome."""
        try:
            return ("ok", self._apply(op))
        except Exception as exc:  # compared, not swallowed: both worlds must raise alike
            return ("raise", type(exc), str(exc))

    def _register(self, conn: Any) -> Label:
        for i, c in enumerate(self.handed):
            if c is conn:
                return ("existing", i)
        origin = self.label(conn)[0]  # "initial", "foreign" (adopted!) or "unknown" (opened now)
        self.handed.append(conn)
        return ("new", len(self.handed) - 1, "opened" if origin == "unknown" else origin)

    def _apply(self, op: tuple[Any, ...]) -> Any:
        pool = self.pool
        kind = op[0]
        if kind == "skip":
            return None
        if kind == "get":
            return self._register(pool.getconn())
        if kind == "get_key":
            return self._register(pool.getconn(op[1]))
        if kind == "put":
            conn = self.handed[op[1]]
            mode = op[2]
            kwargs: dict[str, Any] = {}
            if mode in ("key", "key_close"):
                kwargs["key"] = pool._rused[id(conn)]
            if mode in ("close", "key_close"):
                kwargs["close"] = True
            return pool.putconn(conn, **kwargs)
        if kind == "intrans":
            conn = self.handed[op[1]]
            conn.cursor().execute("SELECT 1")
            return ("status", _status(conn))
        if kind == "inerror":
            conn = self.handed[op[1]]
            with contextlib.suppress(psycopg2.errors.DivisionByZero):
                conn.cursor().execute("SELECT 1/0")
            return ("status", _status(conn))
        if kind == "user_close":
            conn = self.handed[op[1]]
            conn.close()
            return ("closed", conn.closed)
        if kind == "put_foreign":
            if not self.foreign:
                self.foreign.append(psycopg2.connect(self.dsn, application_name=self.foreign_app))
            return pool.putconn(self.foreign[0])
        if kind == "double_put":
            return pool.putconn(self.handed[op[1]])
        if kind == "put_none":
            return pool.putconn(None)
        if kind == "closeall":
            return pool.closeall()
        raise AssertionError(f"unknown operation {op!r}")

    # -- observation ----------------------------------------------------------------

    def _describe_value(self, value: Any) -> Any:
        if isinstance(value, psycopg2.extensions.connection):
            return ("conn", self.label(value))
        if value is None or isinstance(value, bool):
            return value
        return normalize_key(value)

    def hook_calls(self) -> list[tuple[Any, ...]]:
        """The hook calls logged since the last call, world-independent (empty without hooks)."""
        log = getattr(self.pool, "hook_log", [])
        new, self.logged = log[self.logged :], len(log)
        calls = []
        for hook, args, outcome in new:
            if outcome is not None and outcome[0] == "ok":
                outcome = ("ok", self._describe_value(outcome[1]))
            calls.append((hook, tuple(self._describe_value(a) for a in args), outcome))
        return calls

    def describe(self, op: tuple[Any, ...]) -> str:
        """A coverage label for ``op`` (hypothesis events): the state of its connection."""
        if op[0] not in ("put", "double_put"):
            return op[0] if op[0] != "skip" else f"skip {op[1]}"
        conn = self.handed[op[1]]
        where = (
            "idle"
            if any(c is conn for c in self.pool._pool)
            else "held"
            if any(c is conn for c in self.pool._used.values())
            else "out"
        )
        status = "closed" if conn.closed else _STATUS_NAMES.get(conn.get_transaction_status(), "?")
        mode = f" {op[2]}" if op[0] == "put" else ""
        return f"{op[0]}{mode} {status} {where} idle={len(self.pool._pool)}"

    def snapshot(self) -> dict[str, Any]:
        """Everything observable about the pool and its connections, world-independent."""
        pool = self.pool
        return {
            "pool.closed": pool.closed,
            "_keys": pool._keys,
            "len(_pool)": len(pool._pool),
            "len(_used)": len(pool._used),
            "len(_rused)": len(pool._rused),
            "_pool": [self.label(c) for c in pool._pool],
            "_used": {normalize_key(k): self.label(c) for k, c in pool._used.items()},
            "_rused": {self._label_of_id(i): normalize_key(k) for i, k in pool._rused.items()},
            "handed.closed": [c.closed for c in self.handed],
            "handed.status": [_status(c) for c in self.handed],
            "initial.closed": [c.closed for c in self.initial],
            "foreign.closed": [c.closed for c in self.foreign],
        }

    def expected_backends(self) -> dict[str, int]:
        return {
            self.app: sum(1 for c in self.tracked() if not c.closed),
            self.foreign_app: sum(1 for c in self.foreign if not c.closed),
        }

    def cleanup(self) -> None:
        """Close everything, whatever state the example left (best effort)."""
        if not self.pool.closed:
            with contextlib.suppress(Exception):
                self.pool.closeall()
        for conn in (*self.tracked(), *self.foreign):
            with contextlib.suppress(Exception):
                conn.close()


def unique_app(prefix: str) -> str:
    """An application_name no other pool uses, so its backends can be counted."""
    return f"pgctx-test-{prefix}-{uuid.uuid4().hex[:12]}"


def backend_counts(admin: Any, apps: list[str]) -> dict[str, int]:
    """Number of server backends per application_name (0 for names with none)."""
    with admin.cursor() as cur:
        cur.execute(
            "SELECT application_name, count(*) FROM pg_stat_activity "
            "WHERE application_name = ANY(%s) GROUP BY application_name",
            (apps,),
        )
        counts = dict(cur.fetchall())
    return {app: int(counts.get(app, 0)) for app in apps}


def settle_backend_counts(
    admin: Any, expected: Mapping[str, int], timeout: float = 10.0
) -> dict[str, int]:
    """Poll until the server shows ``expected`` backends per name, or ``timeout`` passes.

    Backends leave pg_stat_activity asynchronously after a close, so the count is
    polled; the last observation is returned either way for the caller to assert on.
    """
    apps = list(expected)
    deadline = time.monotonic() + timeout
    while True:
        observed = backend_counts(admin, apps)
        if observed == dict(expected) or time.monotonic() > deadline:
            return observed
        time.sleep(0.002)
