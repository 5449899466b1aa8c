"""A fault-injecting TCP proxy for the fault tests, in process and stdlib only.

One selector thread owns every socket, so faults switch atomically and ``close()`` has a
single thread to join.  Public methods hand their work to that thread and wait for it: once
``set_mode("refuse")`` returns, the port is already closed.
"""

from __future__ import annotations

import contextlib
import errno
import selectors
import socket
import struct
import threading
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

from psycopg2.extensions import make_dsn, parse_dsn

__all__ = ["MODES", "FaultProxy", "Mode"]

Mode = Literal["relay", "refuse", "hang_on_connect", "blackhole_new", "stop_relaying"]
MODES: tuple[Mode, ...] = ("relay", "refuse", "hang_on_connect", "blackhole_new", "stop_relaying")
_BUF = 64 * 1024  # per direction and connection: a slow side stops reads instead of growing
_CALL_TIMEOUT = 10.0
_T = TypeVar("_T")


@dataclass(eq=False)
class _Pair:
    """One client connection and, once it is relayed, its connection to the target."""

    client: socket.socket
    server: socket.socket | None = None
    connected: bool = False
    up: bytearray = field(default_factory=bytearray)  # client -> server
    down: bytearray = field(default_factory=bytearray)  # server -> client
    client_eof: bool = False
    server_eof: bool = False


class FaultProxy:
    """Relays 127.0.0.1:``port`` to the server of *dsn*; faults are switched with set_mode().

    Modes: ``relay``; ``refuse`` (port closed: ECONNREFUSED); ``hang_on_connect``, alias
    ``blackhole_new`` (new connections are accepted but never relayed); ``stop_relaying``
    (no byte passes on any connection and new ones are held too).  Nothing is lost: back in
    ``relay``, held bytes are delivered and held connections reach the server, like TCP after
    a healed partition.  ``reset_all()`` aborts every connection with a RST.

    This kernel still ACKs what it is sent, so client TCP keepalives and ``tcp_user_timeout``
    never fire in ``stop_relaying``: a blocked query ends only on relay, reset_all() or close().
    """

    def __init__(self, dsn: str) -> None:
        params = parse_dsn(dsn)
        host = params.get("hostaddr") or params.get("host") or "127.0.0.1"
        if "," in host or host.startswith("/"):
            raise ValueError(f"need one TCP host in the DSN, got {host!r}")
        addr = socket.getaddrinfo(host, int(params.get("port", 5432)), type=socket.SOCK_STREAM)
        self._family: socket.AddressFamily = addr[0][0]
        self._target: tuple[Any, ...] = addr[0][4]
        self._params = params
        self._mode: Mode = "relay"
        self._lock = threading.Lock()  # guards _pairs against readers in other threads
        self._pairs: set[_Pair] = set()
        self._events: dict[socket.socket, int] = {}
        self._sel = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._sel.register(self._wake_r, selectors.EVENT_READ, None)
        self._calls: list[tuple[Callable[[], Any], Future[Any]]] = []
        self._stop = False
        self._closed = False  # set by the thread when it takes no more calls
        self._error: BaseException | None = None
        self._listener: socket.socket | None = None
        self._port = 0
        self._listen()
        self._thread = threading.Thread(
            target=self._run, name=f"faultproxy-{self._port}", daemon=True
        )
        self._thread.start()

    # -- public API (any thread) ------------------------------------------------------

    @property
    def port(self) -> int:
        return self._port

    @property
    def dsn(self) -> str:
        """The target's DSN pointing at the proxy instead."""
        params = {k: v for k, v in self._params.items() if k != "hostaddr"}
        return str(make_dsn(**{**params, "host": "127.0.0.1", "port": str(self._port)}))

    @property
    def mode(self) -> Mode:
        return self._mode

    @property
    def connections(self) -> int:
        """Live client connections relayed to the target."""
        with self._lock:
            return sum(1 for p in self._pairs if p.connected)

    @property
    def pending(self) -> int:
        """Live client connections held, never relayed (hang/stop modes)."""
        with self._lock:
            return sum(1 for p in self._pairs if not p.connected)

    def set_mode(self, mode: Mode) -> None:
        """Switch the fault; done on the proxy thread before this returns."""
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}")
        self._call(lambda: self._apply_mode(mode))

    def reset_all(self) -> int:
        """Abort every live connection, both sides, with a TCP RST; return how many."""
        return self._call(self._reset_all)

    def close(self, timeout: float = 5.0) -> None:
        """Close every socket (FIN) and join the thread; raise if the thread failed."""
        if self._thread.is_alive():
            self._stop = True
            self._wake()
            self._thread.join(timeout)
            if self._thread.is_alive():
                raise RuntimeError("fault proxy thread did not stop")
        if self._error is not None:
            raise RuntimeError("fault proxy thread failed") from self._error

    def __enter__(self) -> FaultProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<FaultProxy 127.0.0.1:{self._port} -> {self._target} {self._mode}>"

    def _call(self, fn: Callable[[], _T]) -> _T:
        fut: Future[_T] = Future()
        with self._lock:
            if self._closed:
                raise RuntimeError("fault proxy is closed") from self._error
            self._calls.append((fn, fut))
        self._wake()
        return fut.result(_CALL_TIMEOUT)

    def _wake(self) -> None:
        with contextlib.suppress(OSError):  # a wake-up is already pending, or we are closed
            self._wake_w.send(b"x")

    # -- proxy thread ---------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while not self._stop:
                for key, mask in self._sel.select():
                    if key.data is None:
                        self._drain_wake()
                    elif key.data == "listen":
                        if self._listener is not None:  # may be closed earlier in this batch
                            self._accept()
                    else:
                        # an earlier event of this batch may have closed or muted the socket
                        sock = key.fileobj
                        assert isinstance(sock, socket.socket)
                        if mask & self._events.get(sock, 0):
                            self._io(key.data, sock, mask & self._events[sock])
        except BaseException as exc:  # kept for close() to re-raise
            self._error = exc
        finally:
            self._shutdown()

    def _drain_wake(self) -> None:
        with contextlib.suppress(BlockingIOError):
            self._wake_r.recv(4096)  # more pending wake-ups only cost another turn
        with self._lock:
            calls, self._calls = self._calls, []
        for fn, fut in calls:
            try:
                fut.set_result(fn())
            except Exception as exc:
                fut.set_exception(exc)

    def _listen(self) -> None:
        lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            lsock.bind(("127.0.0.1", self._port))  # 0 the first time, then the same port
            lsock.listen(64)
            lsock.setblocking(False)
        except BaseException:
            lsock.close()
            raise
        self._port = lsock.getsockname()[1]
        self._listener = lsock
        self._sel.register(lsock, selectors.EVENT_READ, "listen")

    def _unlisten(self) -> None:
        if self._listener is not None:
            self._sel.unregister(self._listener)
            self._listener.close()  # also RSTs connections still in the accept queue
            self._listener = None

    def _apply_mode(self, mode: Mode) -> None:
        if mode == "refuse":
            self._unlisten()
        elif self._listener is None:
            self._listen()
        self._mode = mode
        for pair in list(self._pairs):
            self._refresh(pair)

    def _accept(self) -> None:
        assert self._listener is not None
        while True:
            try:
                sock, _ = self._listener.accept()
            except (BlockingIOError, ConnectionAbortedError):
                return
            sock.setblocking(False)
            pair = _Pair(sock)
            with self._lock:
                self._pairs.add(pair)
            self._refresh(pair)

    def _connect(self, pair: _Pair) -> None:
        sock = socket.socket(self._family, socket.SOCK_STREAM)
        sock.setblocking(False)
        pair.server = sock
        err = sock.connect_ex(self._target)
        if err not in (0, errno.EINPROGRESS):
            self._drop(pair)
        elif err == 0:
            pair.connected = True

    def _io(self, pair: _Pair, sock: socket.socket, mask: int) -> None:
        """Finish a connect, or move bytes between *sock* and the pair's buffers."""
        inbox, outbox = (pair.up, pair.down) if sock is pair.client else (pair.down, pair.up)
        try:
            if sock is pair.server and not pair.connected:
                if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
                    self._drop(pair)  # target down: the client sees its connection closed
                    return
                pair.connected = True
            elif mask & selectors.EVENT_READ:
                data = sock.recv(_BUF - len(inbox))
                inbox += data
                if not data and sock is pair.client:
                    pair.client_eof = True
                elif not data:
                    pair.server_eof = True
            if mask & selectors.EVENT_WRITE and pair.connected and outbox:
                del outbox[: sock.send(outbox)]
        except OSError:
            self._drop(pair, rst=True)  # a reset on one side is passed on to the other as a reset
            return
        if pair in self._pairs:
            self._refresh(pair)

    def _refresh(self, pair: _Pair) -> None:
        """Close a finished pair, start a due connect, or update the selector interest."""
        relay = self._mode != "stop_relaying"
        if (pair.client_eof and (not pair.up or pair.server is None)) or (
            pair.server_eof and not pair.down
        ):
            self._drop(pair)  # one side closed and all it sent was passed on
            return
        if pair.server is None and self._mode == "relay":
            self._connect(pair)
            if pair not in self._pairs:
                return
        c_ev = s_ev = 0
        held = pair.server is None  # read only to notice the client leaving
        if (held or (pair.connected and relay)) and not pair.client_eof and len(pair.up) < _BUF:
            c_ev |= selectors.EVENT_READ
        if pair.connected and relay:
            c_ev |= selectors.EVENT_WRITE if pair.down else 0
            s_ev |= selectors.EVENT_WRITE if pair.up else 0
            if not pair.server_eof and len(pair.down) < _BUF:
                s_ev |= selectors.EVENT_READ
        elif pair.server is not None and not pair.connected:
            s_ev = selectors.EVENT_WRITE  # wait for the connect to finish
        self._interest(pair.client, c_ev, pair)
        if pair.server is not None:
            self._interest(pair.server, s_ev, pair)

    def _interest(self, sock: socket.socket, events: int, pair: _Pair) -> None:
        old = self._events.get(sock, 0)
        if events == old:
            return
        if old and events:
            self._sel.modify(sock, events, pair)
        elif events:
            self._sel.register(sock, events, pair)
        else:
            self._sel.unregister(sock)
        self._events[sock] = events

    def _drop(self, pair: _Pair, rst: bool = False) -> None:
        with self._lock:
            if pair not in self._pairs:
                return
            self._pairs.discard(pair)
        for sock in (pair.client, pair.server):
            if sock is None:
                continue
            if self._events.pop(sock, 0):
                self._sel.unregister(sock)
            if rst:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.close()

    def _reset_all(self) -> int:
        pairs = list(self._pairs)
        for pair in pairs:
            self._drop(pair, rst=True)
        return len(pairs)

    def _shutdown(self) -> None:
        for pair in list(self._pairs):
            self._drop(pair)
        self._unlisten()
        with self._lock:
            self._closed = True
            calls, self._calls = self._calls, []
        for _, fut in calls:
            fut.set_exception(RuntimeError("fault proxy is closed"))
        self._sel.close()
        self._wake_r.close()
        self._wake_w.close()
