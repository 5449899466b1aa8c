"""Describe connection arguments, and word errors about them, without ever showing a password.

libpq's messages quote what they failed on: an invalid URI (``postgresql://u:p%ss@h/db``)
gives ``invalid percent-encoded token: "p%ss"``, an unencoded ``@`` or ``/`` in a URI's
password turns part of it into the host, port or database name, which connect errors
then quote. So the pool words these errors itself, masking anything that may be part of
a password, and refuses URIs whose password libpq would read wrongly.
"""

from __future__ import annotations

import re
from typing import Any, NamedTuple, TypeGuard
from urllib.parse import unquote

from pgctx._driver import extensions

_SECRET_KEYS = frozenset({"password", "passfile", "sslpassword"})
_SHOWN_KEYS = ("host", "hostaddr", "port", "dbname", "user", "application_name")
_URI_PREFIXES = ("postgresql://", "postgres://")
_KEYWORD_SECRET = re.compile(r"(?:ssl)?password\s*=\s*(.*)", re.DOTALL)
_QUERY_SECRET = re.compile(r"[?&](?:ssl)?password=([^&]*)")
_PORTS = re.compile(r"[0-9]*(,[0-9]*)*")
MASK = "***"
_RUN = 4  # characters in a row of a guessed secret that are masked wherever they show

MISREAD_URI = (
    "the URI's password seems to contain a character that must be percent-encoded "
    "('@', '/', '%', ...): libpq would read part of it as the host, port or database "
    "name. Encode it with urllib.parse.quote(password, safe=''), or pass password= as "
    "a keyword argument"
)


def _dsn_of(args: tuple[Any, ...], kwargs: dict[str, Any]) -> object:
    return args[0] if args else kwargs.get("dsn")


def is_uri(dsn: object) -> TypeGuard[str]:
    return isinstance(dsn, str) and dsn.startswith(_URI_PREFIXES)


def _raw_secrets(dsn: str) -> set[str]:
    """What may be a password in a DSN libpq cannot parse (a generous guess)."""
    found: set[str] = set()
    if is_uri(dsn):
        rest = dsn.split("://", 1)[1]
        if "@" in rest:  # the widest guess: up to the last '@' of the string
            userinfo = rest.rsplit("@", 1)[0]
            if ":" in userinfo:
                found.add(userinfo.split(":", 1)[1])
        found.update(_QUERY_SECRET.findall(dsn))
    else:
        match = _KEYWORD_SECRET.search(dsn)
        if match:  # everything after password=: its value may be mis-quoted
            found.add(match.group(1).strip())
    return found | {unquote(s) for s in found}


class Secrets(NamedTuple):
    """The secrets of a pool's connect arguments: known exactly, or guessed."""

    exact: tuple[str, ...] = ()  # passwords as libpq reads them
    guessed: tuple[str, ...] = ()  # spans of a DSN libpq cannot read that may hold one


def secrets_of(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Secrets:
    """Every string that is, or may contain, a secret of these connect arguments."""
    exact = {str(kwargs[k]) for k in _SECRET_KEYS if kwargs.get(k) is not None}
    guessed: set[str] = set()
    dsn = _dsn_of(args, kwargs)
    if isinstance(dsn, str) and dsn:
        try:
            parsed = extensions.parse_dsn(dsn)
        except Exception:  # unparseable (ProgrammingError, UnicodeDecodeError): guess
            guessed = _raw_secrets(dsn)
        else:
            exact.update(str(v) for k, v in parsed.items() if k in _SECRET_KEYS)
            if is_uri(dsn) and misreads_password(dsn, parsed):
                guessed = _raw_secrets(dsn)
    return Secrets(_longest_first(exact), _longest_first(guessed))


def _longest_first(found: set[str]) -> tuple[str, ...]:
    return tuple(sorted((s for s in found if s), key=len, reverse=True))


def misreads_password(uri: str, parsed: dict[str, str]) -> bool:
    """Whether libpq's reading of a URI shows an unencoded '@' or '/' in its password.

    libpq ends the user info at the first '@' or '/': a '/' in the password makes the
    rest of it the path (``u:pa/ss@h/db``: host 'u', port 'pa', dbname 'ss@h/db'), a
    second '@' puts it in the host. So an '@' in the host or in the path, or a port
    that is not a number, means the password was misread.
    """
    if "@" in parsed.get("host", ""):
        return True
    if not _PORTS.fullmatch(parsed.get("port", "")):
        return True
    rest = uri.split("://", 1)[1]
    slash = rest.find("/")
    if slash < 0:
        return False
    path = rest[slash:].split("?", 1)[0]
    return "@" in path  # a literal '@' in a database name is written %40


def redact(text: str, secrets: Secrets) -> str:
    """``text`` with every secret masked, and every run of 4 characters of a guessed one.

    libpq quotes spans of a DSN it cannot read, which may start inside a password
    and end after it (``"p%ss@host"``): so for a guessed secret any 4 characters
    in a row of it are masked, wherever they show.
    """
    for secret in secrets.exact:  # longest first
        if len(secret) >= 3:  # shorter ones would mask ordinary words, and tell little
            text = text.replace(secret, MASK)
    hidden = [False] * len(text)
    for secret in (s for s in secrets.guessed if len(s) >= 3):
        for piece in {secret[i : i + _RUN] for i in range(max(1, len(secret) - _RUN + 1))}:
            start = text.find(piece)
            while start >= 0:
                hidden[start : start + len(piece)] = [True] * len(piece)
                start = text.find(piece, start + 1)
    if not any(hidden):
        return text
    out: list[str] = []
    for index, char in enumerate(text):
        if not hidden[index]:
            out.append(char)
        elif index == 0 or not hidden[index - 1]:
            out.append(MASK)
    return "".join(out)


def scrubbed(exc: BaseException, secrets: Secrets) -> BaseException | None:
    """A copy of ``exc`` (same type) with its message redacted; None if nothing is hidden.

    The caller raises the copy outside its ``except`` block, so that the original
    is not kept as its ``__context__``.
    """
    text = str(exc)
    clean = redact(text, secrets)
    if clean == text:
        return None
    try:
        return type(exc)(clean)
    except Exception:  # an exception type that takes other arguments
        return RuntimeError(clean)


def _shown_value(value: object, secrets: Secrets) -> str:
    text = str(value)
    return MASK if any(s in text for s in secrets.exact) else text


def describe_target(args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
    """Return 'host=... dbname=...' for the arguments a pool passes to connect().

    Only a few harmless keys are shown; secrets are never included, even when
    the DSN cannot be parsed or is a URI whose password libpq misreads (then it
    is not shown at all); a value that may hold part of a password is masked.
    """
    params: dict[str, Any] = {}
    dsn = _dsn_of(args, kwargs)
    if isinstance(dsn, str) and dsn:
        try:
            params.update(extensions.parse_dsn(dsn))
        except Exception:
            return "<unparseable dsn>"
        if is_uri(dsn) and misreads_password(dsn, params):
            return "<URI with a misread password>"  # its host, port, dbname hold parts of it
    params.update({k: v for k, v in kwargs.items() if k != "dsn"})
    secrets = secrets_of(args, kwargs)
    shown = [
        f"{k}={_shown_value(params[k], secrets)}"
        for k in _SHOWN_KEYS
        if k in params and k not in _SECRET_KEYS
    ]
    return " ".join(shown) or "<libpq defaults>"
