"""The generated part of docs/benchmarks.md (and of results.md): one run, rendered."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench.report import (
    check_table,
    contention_table,
    dedicated_line,
    memory_table,
    not_ahead,
    overhead_table,
    spike_table,
    targets_table,
    tight_table,
)

BUSY_LOAD = 0.5  # a load average above this at the start makes a run preliminary


def render(res: dict[str, Any], images: dict[str, str]) -> str:
    """The Markdown of one run: status, machine, targets, tables, charts, where we trail."""
    m = res["machine"]
    kind = "quick (`--quick`)" if res["quick"] else "full"
    out = [
        f"Run of {res['started']}, {kind}, {res['elapsed_s']:.0f} s: `{res['command']}`",
        "",
    ]
    busy = m["load_average"][0] >= BUSY_LOAD
    if res["quick"] or busy:
        why = []
        if res["quick"]:
            why.append("a `--quick` run (few rounds, short windows)")
        if busy:
            why.append(
                f"the machine was busy (load average {m['load_average'][0]:.2f} at the start)"
            )
        out += [
            f"> **Preliminary numbers**: {' and '.join(why)}. Rerun the full benchmark",
            "> (`python bench/run.py --docs`) on a quiet machine before quoting them.",
            "",
        ]
    load = ", ".join(f"{x:.2f}" for x in m["load_average"])
    out += [
        "### Machine and versions",
        "",
        f"- CPU: {m['cpu']}, {m['cpus']} CPUs; {m['os']}; {m['python']}",
        f"- PostgreSQL {m['postgresql']}, {m['server']}; {m['pinning'] or 'no pinning'}",
        f"- load average at the start: {load}",
        "- " + ", ".join(f"{k} {v}" for k, v in m["versions"].items()),
    ]
    out += [f"- {note}" for note in m["notes"]]
    out += ["", "### Targets", "", targets_table(res), ""]
    if "tight" in res:
        a = res["tight"]
        out += [
            "### (a) Checkout + return, no query",
            "",
            f"Median of {a['rounds']} rounds of {a['n']:,} iterations; µs per iteration, and "
            "how many times pgctx's time.",
            "",
            tight_table(a),
            "",
        ]
        if "tight" in images:
            out += [f"![tight loop]({images['tight']})", ""]
    if "overhead" in res:
        b = res["overhead"]
        out += [
            "### (b) Overhead per real request",
            "",
            "Pooled request time minus the same `SELECT 1` on a held connection, µs "
            f"(the pooled request's own median in brackets); median of {b['rounds']} rounds "
            f"of {b['n']:,} alternating requests.",
            "",
            overhead_table(b),
            "",
        ]
    if "contention" in res:
        c = res["contention"]
        out += [
            "### (c) Contention: threads on 4 connections",
            "",
            f"Median of {c['rounds']} rounds of {c['duration']:g} s; the longest wait and the "
            "starved count also as the worst round. " + dedicated_line(c),
            "",
        ]
        for t in sorted(c["stats"].get("pgctx", {}), key=int):
            out += [f"**{t} threads**", "", contention_table(c, t), ""]
        if "contention" in images:
            out += [f"![contention]({images['contention']})", ""]
    if "memory" in res:
        d = res["memory"]
        out += [
            "### (d) Client memory per pooled connection",
            "",
            f"Marginal cost of one more connection (pools of {d['small']} and {d['large']}), "
            f"median of {d['rounds']} rounds.",
            "",
            memory_table(d),
            "",
        ]
    if "spike" in res:
        e = res["spike"]
        out += [
            "### (e) Spike",
            "",
            f"{e['clients']} clients at once on a warm pool of {e['minconn']} (max "
            f"{e['maxconn']}), {e['connect_ms']:g} ms per connect, {e['work_ms']:g} ms of work "
            f"each; median of {e['rounds']} rounds.",
            "",
            spike_table(e),
            "",
        ]
    if "check" in res:
        f = res["check"]
        out += [
            "### (f) The cost of `check`",
            "",
            f"getconn + putconn, median of {f['rounds']} rounds of {f['n']:,}.",
            "",
            check_table(f),
            "",
        ]
    behind = not_ahead(res)
    out += ["### Where pgctx is not ahead in this run", ""]
    out += [f"- {line}" for line in behind] if behind else ["- nowhere measured"]
    return "\n".join(out) + "\n"


def write_docs(doc: Path, section: str, begin: str, end: str) -> None:
    """Replace the text between the ``begin`` and ``end`` markers of ``doc``."""
    text = doc.read_text() if doc.exists() else f"{begin}\n{end}\n"
    head, sep, rest = text.partition(begin)
    if not sep:
        head, rest = text.rstrip() + "\n\n", f"\n{end}\n"
    _, sep2, tail = rest.partition(end)
    if not sep2:
        tail = "\n"
    doc.write_text(f"{head}{begin}\n\n{section}\n{end}{tail}")
