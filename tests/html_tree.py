"""A small HTML reader for tests: an element tree from the standard library's parser."""

from __future__ import annotations

from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path


class Element:
    """An HTML element: tag, attributes, children (elements and text)."""

    def __init__(self, tag: str, attrs: dict[str, str], parent: Element | None) -> None:
        self.tag = tag
        self.attrs = attrs
        self.parent = parent
        self.children: list[Element | str] = []

    @property
    def classes(self) -> set[str]:
        return set(self.attrs.get("class", "").split())

    def iter(self) -> Iterator[Element]:
        yield self
        for child in self.children:
            if isinstance(child, Element):
                yield from child.iter()

    def find_all(self, tag: str | None = None, cls: str | None = None) -> list[Element]:
        return [
            e
            for e in self.iter()
            if (tag is None or e.tag == tag) and (cls is None or cls in e.classes)
        ]

    def text(self, skip: tuple[str, ...] = ()) -> str:
        """The text inside, leaving out the subtrees of elements with a class in *skip*."""
        parts: list[str] = []
        for child in self.children:
            if isinstance(child, str):
                parts.append(child)
            elif not child.classes.intersection(skip) and child.tag not in ("script", "style"):
                parts.append(child.text(skip))
        return " ".join(" ".join(parts).split())


class _TreeBuilder(HTMLParser):
    VOID = frozenset(
        "area base br col embed hr img input link meta source track wbr".split()  # noqa: SIM905
    )

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.root = Element("#document", {}, None)
        self._open = self.root

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        element = Element(tag, {k: v or "" for k, v in attrs}, self._open)
        self._open.children.append(element)
        if tag not in self.VOID:
            self._open = element

    def handle_endtag(self, tag: str) -> None:
        node: Element | None = self._open
        while node is not None and node.tag != tag:
            node = node.parent
        if node is not None and node.parent is not None:  # else: a stray end tag
            self._open = node.parent

    def handle_data(self, data: str) -> None:
        self._open.children.append(data)


def parse_html(path: Path) -> Element:
    builder = _TreeBuilder()
    builder.feed(path.read_text(encoding="utf-8"))
    builder.close()
    return builder.root
