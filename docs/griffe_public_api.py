"""Griffe extension of the docs site: the API reference shows what users import, as they read it.

With ``filters: public`` (mkdocs.yml) a module's members are the names in its
``__all__``. What this extension adds, once the whole package is loaded:

- Special members of classes (``__slots__``, ``__aenter__``, ``__doc__``...) leave the
  tree, all but ``__init__`` (whose signature is the class's). griffe counts them as
  public, and marking them private is not enough: the members of a re-exported class
  (``pgctx.ConnectionScope``) are fresh aliases that do not carry the mark.
- A class written as ``__doc__ = Other.__doc__`` gets ``Other``'s docstring, which
  static analysis does not evaluate (two pool classes of ``pgctx.pool`` do this).
- Sphinx roles in docstrings (``:class:`~pgctx.testing.ThrowawayServer```), which
  ``help()`` readers see as they are, render as code (``ThrowawayServer``) instead of
  as raw markup.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import griffe

_SPHINX_ROLE = re.compile(r":(?:py:)?(?:class|func|meth|attr|mod|exc|data|obj):`(~?)([^`]+)`")


class PublicApi(griffe.Extension):
    """Drop special members, resolve ``__doc__ = Other.__doc__``, render Sphinx roles."""

    def on_package(self, *, pkg: griffe.Module, **kwargs: Any) -> None:
        """Runs once the whole package is loaded, so that ``Other`` can be looked up."""
        for obj in _objects(pkg):
            if isinstance(obj, griffe.Class):
                _copy_assigned_docstring(obj)
                for name, member in list(obj.members.items()):
                    if member.is_special and name != "__init__":
                        obj.del_member(name)
            if obj.docstring is not None:
                obj.docstring.value = _SPHINX_ROLE.sub(_as_code, obj.docstring.value)


def _objects(obj: griffe.Object) -> Iterator[griffe.Object]:
    """*obj* and every object defined in it, recursively (aliases skipped)."""
    yield obj
    for member in list(obj.members.values()):
        if not member.is_alias:
            yield from _objects(member)  # type: ignore[arg-type]


def _as_code(match: re.Match[str]) -> str:
    short, target = match.groups()
    return f"`{target.rsplit('.', 1)[-1] if short else target}`"


def _copy_assigned_docstring(cls: griffe.Class) -> None:
    assigned = cls.members.get("__doc__")
    if cls.docstring is not None or not isinstance(assigned, griffe.Attribute):
        return
    value = assigned.value
    if not isinstance(value, griffe.ExprAttribute):
        return
    source_path = value.canonical_path.removesuffix(".__doc__")
    if source_path == value.canonical_path:
        return
    try:
        source = cls.modules_collection[source_path]
    except KeyError:
        return
    if source.docstring is not None:
        cls.docstring = griffe.Docstring(source.docstring.value, lineno=assigned.lineno, parent=cls)
