"""The docs site as a reader sees it: built with ``mkdocs build --strict``, then read.

- The API reference documents every public name (each ``__all__`` of pgctx, pgctx.pool,
  the contrib modules and pgctx.testing's modules) with its docstring, and a signature
  for whatever takes arguments; it shows nothing else: no module dunders, no special or
  private members, no names a module merely imports.
- No page holds a path of the build machine (the checkout, the home directory,
  ``site-packages``); every page of the navigation has content.
- The home page and the API page load in headless Chromium without a JavaScript error,
  a failed console assertion or a failed request for one of the site's own files.

The browser is driven through the DevTools protocol over a pipe (tests/browser.py):
events are structured, so nothing depends on the wording of Chromium's log lines, and
the page is read when Chromium reports the network idle, not after a fixed sleep.
Requests to other hosts (web fonts, the GitHub API) are made to fail in every run, so
that the result does not depend on the machine's network. Without Chromium those tests
are skipped, except when ``CI`` is set (then they fail): ``apt-get install -y chromium``.
"""

from __future__ import annotations

import ast
import functools
import http.server
import importlib
import importlib.util
import inspect
import os
import pkgutil
import re
import shutil
import subprocess
import sys
import threading
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml  # type: ignore[import-untyped]

from tests.browser import BROWSER_TIMEOUT, Browser, load_page, page_errors
from tests.html_tree import Element, parse_html

ROOT = Path(__file__).resolve().parent.parent

# The modules whose public names the API page documents; contrib modules and the
# public modules of pgctx.testing are found on disk, so a new one must be documented.
PUBLIC_MODULES = [
    "pgctx",
    "pgctx.pool",
    *(
        f"{package}.{info.name}"
        for package in ("pgctx.contrib", "pgctx.testing")
        for info in pkgutil.iter_modules([str(ROOT.joinpath(*package.split(".")))])
        if not info.name.startswith("_")
    ),
    "pgctx.testing",
]

# What the API page showed when griffe inspected the modules at run time.
UNWANTED = ("__cached__", "__file__", "__path__", "__all__", "__slots__", "__module__", "__doc__")


# -- the site ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The site, built the way CI builds it, into a temporary directory."""
    out = tmp_path_factory.mktemp("docs-site") / "site"
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, f"mkdocs build --strict failed:\n{result.stderr}"
    return out


@pytest.fixture(scope="module")
def api_objects(site: Path) -> dict[str, Element]:
    """The API page's documented objects: heading id -> its ``div.doc-object``."""
    page = parse_html(site / "api" / "index.html")
    objects = {}
    for div in page.find_all("div", "doc-object"):
        heading = next(c for c in div.children if isinstance(c, Element))
        if "doc-heading" not in heading.classes:
            assert "doc-module" in div.classes, f"a doc object without a heading: {div.attrs}"
            continue  # a module rendered under the page's own section heading
        objects[heading.attrs["id"]] = div
    assert objects, "the API page documents nothing"
    return objects


def _module_names(module: str) -> list[str]:
    """The public names of *module*: its ``__all__``, else the functions and classes it
    defines without a leading underscore (the pytest plugin's fixtures)."""
    spec = importlib.util.find_spec(module)
    assert spec is not None and spec.origin is not None, module
    tree = ast.parse(Path(spec.origin).read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.Assign | ast.AnnAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            if any(isinstance(t, ast.Name) and t.id == "__all__" for t in targets):
                assert node.value is not None
                return list(ast.literal_eval(node.value))
    return [
        node.name
        for node in tree.body
        if isinstance(node, ast.FunctionDef | ast.ClassDef) and not node.name.startswith("_")
    ]


PUBLIC_NAMES = [(module, name) for module in PUBLIC_MODULES for name in _module_names(module)]


def _documented_as(module: str, name: str) -> set[str]:
    """Every page id under which ``module.name`` may be documented: its own path, the path
    of the same object in another public module (``pgctx.X`` is ``pgctx.pool.X``), and
    its definition's path (``pgctx.savepoint``, the function, shadows its submodule)."""
    obj = getattr(importlib.import_module(module), name)
    ids = {f"{module}.{name}"}
    for other in PUBLIC_MODULES:
        if getattr(importlib.import_module(other), name, None) is obj:
            ids.add(f"{other}.{name}")
    qualname = getattr(obj, "__qualname__", None)
    if isinstance(getattr(obj, "__module__", None), str) and isinstance(qualname, str):
        ids.add(f"{obj.__module__}.{qualname}")
    return ids


def _contents(div: Element) -> Element:
    return next(c for c in div.children if isinstance(c, Element) and "doc-contents" in c.classes)


def _docstring(div: Element) -> str:
    """The object's own docstring text: not its bases, not its members'."""
    return _contents(div).text(skip=("doc-children", "doc-class-bases"))


def _signatures(div: Element) -> list[Element]:
    """The object's own signature blocks (several for overloads)."""
    return [
        c
        for c in div.children
        if isinstance(c, Element) and c.classes & {"doc-signature", "doc-overloads"}
    ]


def _takes_arguments(obj: Any) -> bool:
    """Functions, and classes whose constructor pgctx defines (not exceptions, mixins)."""
    if inspect.isclass(obj):
        return any(
            "__init__" in vars(klass) and klass.__module__.startswith("pgctx")
            for klass in obj.__mro__
        )
    return callable(obj)


@pytest.mark.parametrize(("module", "name"), PUBLIC_NAMES, ids=[".".join(p) for p in PUBLIC_NAMES])
def test_every_public_name_is_documented(
    api_objects: dict[str, Element], module: str, name: str
) -> None:
    ids = _documented_as(module, name)
    found = [i for i in ids if i in api_objects]
    assert found, (
        f"{module}.{name} is not on the API page (looked for {sorted(ids)}): "
        f"docs/api.md needs a '::: {module}' block"
    )
    obj = getattr(importlib.import_module(module), name)
    for page_id in found:
        div = api_objects[page_id]
        docstring = _docstring(div)
        assert docstring, f"{page_id} is on the API page without its docstring"
        if not (inspect.isclass(obj) or callable(obj)):
            # Inspecting a value at run time gives its type's docstring ("dict() -> new
            # empty dictionary"), which says nothing about the name.
            type_doc = " ".join((type(obj).__doc__ or "").split())
            assert not (type_doc and docstring.startswith(type_doc[:30])), (
                f"{page_id} is documented by its type's docstring: {docstring[:80]!r}"
            )
        if _takes_arguments(obj):
            assert _signatures(div), f"{page_id} is on the API page without its signature"


def _allowed(page_id: str, public_ids: set[str]) -> bool:
    """Whether *page_id* is a public module, a public name, or a public member of one."""
    parent, _, member = page_id.rpartition(".")
    return (
        page_id in PUBLIC_MODULES
        or page_id in public_ids
        or (parent in public_ids and not member.startswith("_"))
    )


def test_api_page_shows_nothing_but_the_public_api(api_objects: dict[str, Element]) -> None:
    public_ids = set().union(*(_documented_as(module, name) for module, name in PUBLIC_NAMES))
    unwanted = sorted(p for p in api_objects if not _allowed(p, public_ids))
    assert not unwanted, f"the API page documents names that are not public API: {unwanted}"
    for page_id, div in api_objects.items():
        assert not page_id.rsplit(".", 1)[-1].startswith("_"), page_id
        assert _docstring(div), f"{page_id} is on the API page without a docstring"
        if "doc-function" in div.classes:
            assert _signatures(div), f"{page_id} is on the API page without a signature"


def test_api_page_text_has_no_dunders_or_raw_markup(site: Path) -> None:
    page = parse_html(site / "api" / "index.html")
    article = page.find_all("article")[0]
    text = article.text()
    for word in UNWANTED:
        assert word not in text, f"{word} is shown on the API page"
    toc = " ".join(e.text() for e in page.find_all("nav", "md-nav--secondary"))
    assert "__" not in toc, f"the API page's table of contents lists dunders: {toc}"
    roles = re.findall(r":(?:class|func|meth|attr|mod|exc):`[^`]*`", text)
    assert not roles, f"raw Sphinx roles on the API page: {roles}"


def _text_files(site: Path) -> Iterator[tuple[Path, str]]:
    for path in sorted(site.rglob("*")):
        if path.suffix in (".html", ".json", ".xml", ".txt", ".js", ".css"):
            yield path, path.read_text(encoding="utf-8", errors="replace")
        elif path.name == "objects.inv":  # four header lines, then zlib-compressed lines
            compressed = path.read_bytes().split(b"\n", 4)[4]
            yield path, zlib.decompress(compressed).decode()


def test_no_page_holds_a_path_of_the_build_machine(site: Path) -> None:
    home = Path.home()
    machine_paths = [
        re.escape(str(ROOT)),
        re.escape(str(home)) + r"/" if home != Path("/") else None,
        r"(?<![\w.])/root/",  # paths, not the URL paths of samples ('/home')
        r"(?<![\w.])/home/[\w.-]+/",
        r"site-packages",
        r"dist-packages",
    ]
    pattern = re.compile("|".join(p for p in machine_paths if p))
    found = []
    for path, text in _text_files(site):
        for match in pattern.finditer(text):
            snippet = text[max(0, match.start() - 60) : match.end() + 60]
            found.append(f"{path.relative_to(site)}: ...{snippet}...")
    assert not found, "paths of the build machine in the site:\n" + "\n".join(found[:20])


def _nav_pages(nav: list[Any]) -> Iterator[tuple[str, str]]:
    for entry in nav:
        if isinstance(entry, str):  # a bare "page.md" entry
            yield entry, entry
            continue
        for title, target in entry.items():
            if isinstance(target, list):
                yield from _nav_pages(target)
            elif target.endswith(".md"):  # not an external link
                yield title, target


NAV = list(_nav_pages(yaml.safe_load((ROOT / "mkdocs.yml").read_text())["nav"]))


@pytest.mark.parametrize(("title", "source"), NAV, ids=[s for _, s in NAV])
def test_every_nav_page_has_content(site: Path, title: str, source: str) -> None:
    html = site / source.removesuffix(".md").removesuffix("index") / "index.html"
    assert html.is_file(), f"nav entry {title!r} ({source}) was not built"
    article = parse_html(html).find_all("article")
    assert article, f"{source}: no article"
    body = article[0].text(skip=("headerlink",))
    headings = " ".join(h.text() for h in article[0].find_all("h1"))
    assert len(body) - len(headings) > 40, f"{source} is empty: {body!r}"


TRACKER_REFERENCE = re.compile(r"\bissues?\s*#?\d+|(?<![\w&])#\d+\b", re.IGNORECASE)


def test_pages_speak_to_users_not_of_tracker_numbers(site: Path) -> None:
    """Names say what a thing is ("Targets"), not where it was asked for ("issue 5")."""
    found = []
    for _title, source in NAV:
        html = site / source.removesuffix(".md").removesuffix("index") / "index.html"
        text = parse_html(html).find_all("article")[0].text()
        found += [f"{source}: {m.group()!r}" for m in TRACKER_REFERENCE.finditer(text)]
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    found += [f"README.md: {m.group()!r}" for m in TRACKER_REFERENCE.finditer(readme)]
    assert not found, f"tracker references in the docs: {found}"


# -- in a browser ------------------------------------------------------------------------


def _find_chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        found = shutil.which(name)
        if found:
            return found
    message = "chromium is not installed (Debian: apt-get install -y chromium)"
    if os.environ.get("CI"):
        pytest.fail(f"CI is set, so the browser tests must run: {message}", pytrace=False)
    pytest.skip(message)


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def served(site: Path) -> Iterator[str]:
    """The built site over HTTP on 127.0.0.1, as a reader's browser gets it."""
    handler = functools.partial(_QuietHandler, directory=str(site))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(BROWSER_TIMEOUT)


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Browser]:
    executable = _find_chromium()
    browser = Browser(executable, tmp_path_factory.mktemp("chromium-profile"))
    try:
        yield browser
    finally:
        browser.close()


@pytest.mark.parametrize("path", ["", "api/"], ids=["home", "api"])
def test_page_loads_in_chromium_without_errors(browser: Browser, served: str, path: str) -> None:
    session, events = load_page(browser, served + path)
    assert not page_errors(events, served), f"/{path}: {page_errors(events, served)}"
    # The page rendered, and the theme's JavaScript ran (it defines document$).
    probe = browser.send(
        "Runtime.evaluate",
        session,
        expression="[document.querySelector('article')?.innerText.length ?? 0, "
        "typeof document$, document.title]",
        returnByValue=True,
    )["result"]["value"]
    text_length, theme, title = probe
    assert text_length > 100, f"/{path} rendered {text_length} characters: {title}"
    assert theme == "object", f"/{path}: the theme's JavaScript did not run"
