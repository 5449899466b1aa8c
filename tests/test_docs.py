"""Every Python sample in docs/*.md and README.md runs against the session's server.

How a page's samples are run (the rules for whoever writes docs):

- The fenced ``python`` blocks of a page run in document order, in one namespace, like
  a script: a block may use what an earlier block of the same page defined.
- The namespace starts with ``dsn`` bound: a DSN of the session's server whose
  ``search_path`` is a schema of the page's own, dropped after it, so samples can
  create tables with plain names. ``PGCTX_DSN``/``PGCTX_TEST_DSN`` are set to it too.
  Hidden code can also call ``doc_sql("CREATE TABLE ...")`` (autocommit, that schema).
- Hidden code, e.g. to create the tables a sample needs, goes in an HTML comment that
  the site does not show; it runs at its place in the page::

      <!-- pgctx-doc-setup
      with pgctx.ThreadedConnectionPool(...)...
      -->

  (``pgctx-doc-check`` and ``pgctx-doc-cleanup`` work the same way: for hidden
  assertions after a sample, and for code at the end of a page.)
- A block that cannot run starts with a visible ``# doc: no-run (reason)`` line; such
  blocks are reported as skipped with their reason. Keep them rare.
- A block whose only line is a pymdownx.snippets include (``--8<-- "examples/..."``)
  shows an example file; the file must be one the suite runs (tests/test_examples.py,
  or examples/app/ through tests/test_plugin.py).
- After a page, every pgctx pool left in its namespace must have nothing checked out;
  it is closed, and the default pool is cleared.
- Any other fence needs a language; Python-like ones other than ``python`` are refused,
  so that no sample can slip past these rules.
"""

from __future__ import annotations

import re
import textwrap
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg2
import psycopg2.extensions
import pytest

import pgctx
from tests.test_examples import RUNS

ROOT = Path(__file__).resolve().parent.parent
PAGES = [*sorted((ROOT / "docs").glob("*.md")), ROOT / "README.md"]

FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})(?P<info>.*)$")
HIDDEN = re.compile(r"^\s*<!--\s*pgctx-doc-(?:setup|check|cleanup)\s*$")
NO_RUN = re.compile(r"^#\s*doc:\s*no-run\s*\((?P<reason>.+)\)\s*$")
INCLUDE = re.compile(r'^-{2}8<-{2}\s+"(?P<path>[^"]+)"\s*$')
PYTHON = {"python"}
PYTHON_LIKE = {"py", "python3", "py3", "pycon", "pyi", "ipython"}
OTHER = {"sh", "bash", "console", "shell", "text", "toml", "yaml", "ini", "sql", "json"}


@dataclass
class Chunk:
    kind: str  # "run" (shown), "hidden", "no-run", "include"
    line: int  # 1-based line of the code's first line in the page
    code: str
    note: str = ""  # the reason of a no-run block, the path of an include


def rel(page: Path) -> str:
    return page.relative_to(ROOT).as_posix()


def parse(page: Path) -> tuple[list[Chunk], list[str]]:
    """The page's Python chunks in document order, and the problems found."""
    lines = page.read_text(encoding="utf-8").splitlines()
    chunks: list[Chunk] = []
    problems: list[str] = []
    i = 0
    while i < len(lines):
        where = f"{rel(page)}:{i + 1}"
        if HIDDEN.match(lines[i]):
            end = next((j for j in range(i + 1, len(lines)) if lines[j].strip() == "-->"), None)
            if end is None:
                problems.append(f"{where}: hidden code comment without a closing '-->' line")
                break
            code = textwrap.dedent("\n".join(lines[i + 1 : end]))
            chunks.append(Chunk("hidden", i + 2, code))
            i = end + 1
            continue
        if "pgctx-doc-" in lines[i]:
            problems.append(
                f"{where}: write hidden code as '<!-- pgctx-doc-setup', the code, '-->'"
            )
        match = FENCE.match(lines[i])
        if match is None:
            i += 1
            continue
        indent, fence, info = match["indent"], match["fence"], match["info"].strip()
        closing = re.compile(rf"^[ \t]*{re.escape(fence[0])}{{{len(fence)},}}[ \t]*$")
        end = next((j for j in range(i + 1, len(lines)) if closing.match(lines[j])), None)
        if end is None:
            problems.append(f"{where}: fence without an end")
            break
        body = [
            line[len(indent) :] if line.startswith(indent) else line for line in lines[i + 1 : end]
        ]
        code = textwrap.dedent("\n".join(body))
        language = info.split()[0].lstrip(".{").rstrip("}").lower() if info else ""
        if language in PYTHON:
            chunks.append(classify(code, i + 2, where, problems))
        elif language in PYTHON_LIKE:
            problems.append(f"{where}: write ```python (the docs test runs only those)")
        elif language not in OTHER:
            problems.append(
                f"{where}: fence language {language or '(none)'!r}: name one of "
                f"{sorted(PYTHON | OTHER)} (or add it to OTHER in tests/test_docs.py)"
            )
        i = end + 1
    return chunks, problems


def classify(code: str, line: int, where: str, problems: list[str]) -> Chunk:
    stripped = code.strip()
    first = stripped.splitlines()[0] if stripped else ""
    include = INCLUDE.match(stripped)
    if include is not None:
        path = include["path"]
        if not is_run_example(path):
            problems.append(f"{where}: included {path!r} is not an example the suite runs")
        return Chunk("include", line, code, path)
    no_run = NO_RUN.match(first)
    if no_run is not None:
        return Chunk("no-run", line, code, no_run["reason"])
    if first.startswith("#") and "no-run" in first:
        problems.append(f"{where}: write the excuse as '# doc: no-run (reason)'")
    return Chunk("run", line, code)


def is_run_example(path: str) -> bool:
    if not (ROOT / path).is_file():
        return False
    run_by_test_examples = {f"examples/{name}" for name, _ in RUNS}
    return path in run_by_test_examples or (
        path.startswith("examples/app/") and path.endswith(".py")
    )


PARSED = {page: parse(page) for page in PAGES}
RUNNABLE = [page for page in PAGES if any(c.kind in ("run", "hidden") for c in PARSED[page][0])]
EXCUSED = [(page, chunk) for page in PAGES for chunk in PARSED[page][0] if chunk.kind == "no-run"]


def test_every_fence_is_run_included_or_excused() -> None:
    problems = [problem for page in PAGES for problem in PARSED[page][1]]
    assert not problems, "\n".join(problems)
    assert RUNNABLE, "no runnable samples found: is the parser broken?"


@pytest.mark.parametrize(("page", "chunk"), EXCUSED, ids=[f"{rel(p)}:{c.line}" for p, c in EXCUSED])
def test_excused_sample(page: Path, chunk: Chunk) -> None:
    compile(chunk.code, rel(page), "exec")  # it must still be valid Python
    pytest.skip(f"{rel(page)}:{chunk.line} is not run: {chunk.note}")


def page_dsn(dsn: str, schema: str) -> str:
    options = psycopg2.extensions.parse_dsn(dsn).get("options", "")
    return psycopg2.extensions.make_dsn(dsn, options=f"{options} -c search_path={schema}".strip())


@pytest.fixture
def schema(pg_admin: Any) -> Iterator[str]:
    name = f"docs_{uuid.uuid4().hex[:12]}"
    with pg_admin.cursor() as cur:
        cur.execute(f"CREATE SCHEMA {name}")
    yield name
    with pg_admin.cursor() as cur:
        cur.execute(f"DROP SCHEMA {name} CASCADE")


@pytest.mark.parametrize("page", RUNNABLE, ids=[rel(p) for p in RUNNABLE])
def test_page_samples_run(
    page: Path, dsn: str, schema: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    sample_dsn = page_dsn(dsn, schema)
    for name in ("PGCTX_DSN", "PGCTX_TEST_DSN"):
        monkeypatch.setenv(name, sample_dsn)
    monkeypatch.delenv("DATABASE_URL", raising=False)

    def doc_sql(statement: str) -> None:
        conn = psycopg2.connect(sample_dsn)
        try:
            conn.autocommit = True
            with conn.cursor() as cur:
                cur.execute(statement)
        finally:
            conn.close()

    namespace: dict[str, Any] = {"__name__": "docs_sample", "dsn": sample_dsn, "doc_sql": doc_sql}
    try:
        for chunk in PARSED[page][0]:
            if chunk.kind in ("run", "hidden"):
                # Padded so that tracebacks point at the page's own line numbers.
                source = "\n" * (chunk.line - 1) + chunk.code
                exec(compile(source, str(page), "exec"), namespace)
    finally:
        pgctx.set_default_pool(None)
        leaks = close_pools(namespace)
    assert not leaks, f"samples of {rel(page)} left connections checked out: {leaks}"


def close_pools(namespace: dict[str, Any]) -> dict[str, int]:
    leaks: dict[str, int] = {}
    for name, value in namespace.items():
        if isinstance(value, pgctx.AbstractConnectionPool) and not value.closed:
            used = int(value.get_stats()["checked_out"])
            if used:
                leaks[name] = used
            value.closeall()
    return leaks
