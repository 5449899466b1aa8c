"""Headless Chromium for tests, driven through the DevTools protocol over a pipe.

``--remote-debugging-pipe`` makes Chromium read commands on fd 3 and write replies and
events on fd 4, NUL-separated JSON: no websocket client is needed, and events arrive
structured (``Runtime.exceptionThrown``, ``Log.entryAdded``...), so nothing depends on
the wording of Chromium's log lines.
"""

from __future__ import annotations

import fcntl
import json
import os
import queue
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

BROWSER_TIMEOUT = 60.0  # seconds; never reached when things work
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    # Other hosts (web fonts, the GitHub API) fail the same way with and without a network.
    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
]


class Browser:
    """Headless Chromium driven through the DevTools protocol on fds 3 and 4."""

    def __init__(self, executable: str, user_data_dir: Path) -> None:
        # Chromium reads commands on fd 3 and writes replies and events on fd 4. The
        # child's ends are first moved to fds >= 5, then a small Python trampoline
        # renumbers them (subprocess cannot) and execs Chromium.
        to_chrome_r, self._to_chrome = os.pipe()
        self._from_chrome, from_chrome_w = os.pipe()
        child_ends = [
            fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 5) for fd in (to_chrome_r, from_chrome_w)
        ]
        os.close(to_chrome_r)
        os.close(from_chrome_w)
        trampoline = (
            "import os, sys; a, b = int(sys.argv[1]), int(sys.argv[2]); "
            "os.dup2(a, 3); os.dup2(b, 4); os.close(a); os.close(b); "
            "os.execvp(sys.argv[3], sys.argv[3:])"
        )
        self.log = user_data_dir.with_name(user_data_dir.name + ".log")
        with self.log.open("wb") as log:
            self.process = subprocess.Popen(
                [
                    sys.executable,
                    "-c",
                    trampoline,
                    *map(str, child_ends),
                    executable,
                    *CHROMIUM_FLAGS,
                    f"--user-data-dir={user_data_dir}",
                    "--remote-debugging-pipe",
                    "about:blank",
                ],
                pass_fds=child_ends,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
            )
        for fd in child_ends:
            os.close(fd)
        self._messages: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self._next_id = 0
        self.events: list[dict[str, Any]] = []

    def _read(self) -> None:
        buffer = b""
        with os.fdopen(self._from_chrome, "rb", buffering=0) as pipe:
            while chunk := pipe.read(1 << 16):
                buffer += chunk
                *messages, buffer = buffer.split(b"\0")
                for message in messages:
                    self._messages.put(json.loads(message))
        self._messages.put(None)

    def _next(self) -> dict[str, Any]:
        try:
            message = self._messages.get(timeout=BROWSER_TIMEOUT)
        except queue.Empty:
            raise AssertionError(f"chromium said nothing for {BROWSER_TIMEOUT} s") from None
        if message is None:
            log = self.log.read_text(errors="replace")[-4000:]
            raise AssertionError(f"chromium exited ({self.process.wait()}):\n{log}")
        return message

    def send(self, method: str, session: str | None = None, **params: Any) -> dict[str, Any]:
        """Send a command and wait for its reply; events meanwhile go to ``events``."""
        self._next_id += 1
        command: dict[str, Any] = {"id": self._next_id, "method": method, "params": params}
        if session is not None:
            command["sessionId"] = session
        os.write(self._to_chrome, json.dumps(command).encode() + b"\0")
        while True:
            message = self._next()
            if message.get("id") == self._next_id:
                assert "error" not in message, f"{method}: {message['error']}"
                return message["result"]  # type: ignore[no-any-return]
            self.events.append(message)

    def wait_for(self, method: str, **expected: Any) -> dict[str, Any]:
        """The first event *method* whose params include *expected*, past or coming."""
        seen = 0
        while True:
            for event in self.events[seen:]:
                params = event.get("params", {})
                if event.get("method") == method and expected.items() <= params.items():
                    return params  # type: ignore[no-any-return]
            seen = len(self.events)
            self.events.append(self._next())

    def close(self) -> None:
        try:
            if self.process.poll() is None:
                self.send("Browser.close")
            self.process.wait(BROWSER_TIMEOUT)
        except (AssertionError, OSError, subprocess.TimeoutExpired):
            self.process.kill()
            self.process.wait(BROWSER_TIMEOUT)
        finally:
            os.close(self._to_chrome)
            self._reader.join(BROWSER_TIMEOUT)


def load_page(browser: Browser, url: str) -> tuple[str, list[dict[str, Any]]]:
    """Open *url* in a new tab, wait until its network is idle; return (session, events)."""
    target = browser.send("Target.createTarget", url="about:blank")["targetId"]
    session = browser.send("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
    for domain in ("Runtime", "Log", "Page"):
        browser.send(f"{domain}.enable", session)
    browser.send("Page.setLifecycleEventsEnabled", session, enabled=True)
    start = len(browser.events)
    loader = browser.send("Page.navigate", session, url=url)
    assert "errorText" not in loader, f"{url}: {loader['errorText']}"
    browser.wait_for("Page.lifecycleEvent", name="networkIdle", loaderId=loader["loaderId"])
    return session, [e for e in browser.events[start:] if e.get("sessionId") == session]


def page_errors(events: list[dict[str, Any]], origin: str) -> list[str]:
    """JavaScript exceptions, console errors and failed loads of the site's own files."""
    errors = []
    for event in events:
        method, params = event.get("method"), event.get("params", {})
        if method == "Runtime.exceptionThrown":
            details = params["exceptionDetails"]
            errors.append(f"uncaught: {details.get('exception', {}).get('description', details)}")
        elif method == "Runtime.consoleAPICalled" and params["type"] in ("error", "assert"):
            values = [a.get("value", a.get("description")) for a in params["args"]]
            errors.append(f"console.{params['type']}: {values}")
        elif method == "Log.entryAdded" and params["entry"]["level"] == "error":
            entry = params["entry"]
            url = entry.get("url", "")
            if entry["source"] == "network" and url and not url.startswith(origin):
                continue  # another host, unreachable on purpose (see --host-resolver-rules)
            errors.append(f"{entry['source']}: {entry['text']} {url}")
    return errors
