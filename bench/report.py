"""Markdown tables of the results, the targets of issue 5 with pass/fail, where pgctx trails."""

from __future__ import annotations

import math
from typing import Any

from bench.peers import LABELS, NAMES

VARIANT_LABELS = {"getconn": "getconn + putconn", "block": "with-block", "decorated": "decorated"}


def _num(x: Any, digits: int = 2) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "—"
    if isinstance(x, int) or (isinstance(x, float) and abs(x) >= 100):
        return f"{x:,.0f}"
    return f"{x:.{digits}f}"


def _ratio(x: float | None) -> str:
    return "—" if x is None or math.isnan(x) else f"{x:.2f}x"


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


# -- targets -------------------------------------------------------------------------------


def targets(res: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets as (what, ratio or value, goal, pass) from this run's results."""
    out: list[dict[str, Any]] = []

    def add(what: str, value: float | None, goal: str, ok: bool | None, shown: str) -> None:
        out.append({"what": what, "value": value, "goal": goal, "ok": ok, "shown": shown})

    a = res.get("tight", {}).get("us")
    if a:
        r = a["psycopg_pool"]["block"] / a["pgctx"]["block"]
        add("with-block: psycopg_pool's time / pgctx's", r, "≥ 3x", r >= 3, _ratio(r))
        r = a["pgctx"]["getconn"] / a["psycopg2"]["getconn"]
        add("getconn/putconn: pgctx's time / psycopg2.pool's", r, "≤ 1.5x", r <= 1.5, _ratio(r))
        r = a["pgctx"]["decorated"] / a["pgctx"]["block"]
        add("decorated call / with-block", r, "≤ 1.2x", r <= 1.2, _ratio(r))
    b = res.get("overhead", {}).get("overhead_us")
    if b:
        v = b["pgctx"]["block"]
        p2, p3 = b["psycopg2"]["getconn"], b["psycopg_pool"]["block"]
        peers = f"psycopg2.pool +{p2:.1f}, psycopg_pool +{p3:.1f}"
        add("overhead per request, with-block", v, "≤ 10 µs", v <= 10, f"+{v:.1f} µs ({peers})")
    c = res.get("contention", {}).get("stats")
    if c and "32" in c.get("pgctx", {}):
        ours, theirs = c["pgctx"]["32"], c["psycopg_pool"]["32"]
        r = ours["ops_s"] / theirs["ops_s"]
        add("32 threads on 4 conns: ops/s, pgctx / psycopg_pool", r, "≥ 1.2x", r >= 1.2, _ratio(r))
        s = ours["starved_worst"]
        add("32 threads: starved threads (worst round)", s, "0", s == 0, f"{s:.0f}")
        w = ours["wait_max_worst_ms"]
        add("32 threads: longest wait (worst round)", w, "< 50 ms", w < 50, f"{w:.1f} ms")
    d = res.get("memory", {}).get("heap_above_bare_bytes")
    if d:
        v = d["pgctx"]
        add("Python memory per pooled connection above bare", v, "< 1 KiB", v < 1024, f"{v:.0f} B")
    return out


def targets_table(res: dict[str, Any]) -> str:
    rows = []
    for t in targets(res):
        verdict = "**pass**" if t["ok"] else "**FAIL**"
        rows.append([t["what"], t["shown"], t["goal"], verdict])
    return _table(["target", "this run", "goal", ""], rows)


# -- scenario tables -----------------------------------------------------------------------


def tight_table(a: dict[str, Any]) -> str:
    us = a["us"]
    base = us["pgctx"]
    rows = []
    for name in NAMES:
        row = [LABELS[name]]
        for variant in ("getconn", "block", "decorated"):
            v = us[name].get(variant)
            row.append(_num(v))
            if variant != "decorated":
                row.append(_ratio(v / base[variant]) if v is not None else "—")
        rows.append(row)
    header = ["pool", "getconn + putconn µs", "x pgctx", "with-block µs", "x pgctx"]
    return _table([*header, "decorated call µs"], rows)


def overhead_table(b: dict[str, Any]) -> str:
    rows = []
    for name in NAMES:
        over = b["overhead_us"][name]
        req = b["request_us"][name]
        cells = [LABELS[name]]
        for variant in ("getconn", "block", "decorated"):
            if variant in over:
                cells.append(f"+{over[variant]:.1f} ({req[variant]:.0f})")
            else:
                cells.append("—")
        rows.append(cells)
    base = ", ".join(f"{driver} {us:.1f} µs" for driver, us in b["baseline_us"].items())
    header = ["pool", "getconn + putconn", "with-block", "decorated call"]
    note = f"\n\n`SELECT 1` on a held connection (the baseline): {base}."
    return _table(header, rows) + note


def contention_table(c: dict[str, Any], threads: str) -> str:
    stats = c["stats"]
    ceiling = stats.get("dedicated-psycopg2", {}).get("4", {}).get("ops_s")
    ref = stats.get("psycopg_pool", {}).get(threads, {}).get("ops_s")
    rows = []
    for name in NAMES:
        s = stats.get(name, {}).get(threads)
        if not s:
            continue
        rows.append(
            [
                LABELS[name],
                _num(s["ops_s"]),
                _ratio(s["ops_s"] / ref) if ref else "—",
                f"{100 * s['ops_s'] / ceiling:.0f}%" if ceiling else "—",
                _num(s["wait_p50_ms"]),
                _num(s["wait_p99_ms"]),
                _num(s["wait_max_worst_ms"], 1),
                f"{s['starved']:.0f} ({s['starved_worst']:.0f})",
                _num(s["fairness"]),
            ]
        )
    header = ["pool", "ops/s", "x psycopg_pool", "of 4 dedicated", "wait p50 ms", "p99 ms"]
    header += ["max ms (worst)", f"starved of {threads} (worst)", "fairness min/max"]
    return _table(header, rows)


def dedicated_line(c: dict[str, Any]) -> str:
    parts = []
    for driver in ("psycopg2", "psycopg"):
        s = c["stats"].get(f"dedicated-{driver}", {}).get("4")
        if s:
            parts.append(f"{driver} {s['ops_s']:,.0f} ops/s")
    return "4 threads on 4 dedicated connections (no pool): " + ", ".join(parts) + "."


def memory_table(d: dict[str, Any]) -> str:
    rows = []
    for name in ["bare-psycopg2", "bare-psycopg", *NAMES]:
        label = LABELS.get(name, name.replace("bare-", "bare ") + " connection")
        above = d["heap_above_bare_bytes"].get(name)
        rows.append(
            [
                label,
                _num(d["heap_bytes"][name], 0),
                "—" if above is None else f"{above:+,.0f}",
            ]
        )
    header = ["", "Python heap B/conn", "above bare B"]
    return _table(header, rows)


def spike_table(e: dict[str, Any]) -> str:
    rows = []
    for name in NAMES:
        s = e["stats"][name]
        rows.append(
            [
                LABELS[name],
                _num(s["opened"], 0),
                _num(s["wait_p50_ms"], 1),
                _num(s["wait_max_ms"], 1),
                _num(s["all_done_ms"], 1),
            ]
        )
    header = ["pool", "connections opened", "wait p50 ms", "wait max ms", "last client done ms"]
    return _table(header, rows)


def check_table(f: dict[str, Any]) -> str:
    rows = []
    for row, us in f["us"].items():
        added = f["added_us"].get(row)
        name = row.split("+")[0]
        label = LABELS[name] + (" " + " + ".join(row.split("+")[1:]) if "+" in row else "")
        rows.append([label, _num(us), "—" if added is None else f"+{added:.1f}"])
    note = f"\n\n`SELECT 1` on a held psycopg2 connection: {f['select_1_us']:.1f} µs."
    return _table(["pool", "getconn + putconn µs", "added by the check µs"], rows) + note


# -- where pgctx is not ahead --------------------------------------------------------------


TOLERANCE = 0.02  # differences smaller than 2% are not counted as "ahead"


def not_ahead(res: dict[str, Any]) -> list[str]:
    """Every measured figure where another pool does better than pgctx in this run."""
    out = []

    def beaten(
        what: str,
        ours: float,
        others: dict[str, float],
        unit: str,
        lower: bool,
        caveat: dict[str, str] | None = None,
    ) -> None:
        for name, v in others.items():
            if v is None or (isinstance(v, float) and math.isnan(v)):
                continue
            margin = TOLERANCE * max(abs(ours), abs(v))
            if (v < ours - margin) if lower else (v > ours + margin):
                note = (caveat or {}).get(name, "")
                out.append(
                    f"{what}: {LABELS[name]} {_num(v)}{unit} vs pgctx {_num(ours)}{unit}{note}"
                )

    a = res.get("tight", {}).get("us")
    if a:
        for variant in ("getconn", "block"):
            others = {n: a[n][variant] for n in NAMES if n != "pgctx" and variant in a[n]}
            what = f"tight loop, {VARIANT_LABELS[variant]}"
            beaten(what, a["pgctx"][variant], others, " µs", True)
    b = res.get("overhead", {}).get("overhead_us")
    if b:
        for variant in ("getconn", "block"):
            others = {n: b[n][variant] for n in NAMES if n != "pgctx" and variant in b[n]}
            what = f"overhead per request, {VARIANT_LABELS[variant]}"
            beaten(what, b["pgctx"][variant], others, " µs", True)
    c = res.get("contention", {}).get("stats")
    if c:
        for t in sorted(c.get("pgctx", {}), key=int):
            ours = c["pgctx"][t]
            others = {n: c[n][t] for n in NAMES if n != "pgctx" and t in c.get(n, {})}
            starving = {
                n: f" (but it starves {s['starved_worst']:.0f} of {t} threads)"
                for n, s in others.items()
                if s["starved_worst"]
            }
            fair = {n: s for n, s in others.items() if n not in starving}
            ops = {n: s["ops_s"] for n, s in others.items()}
            beaten(f"{t} threads, ops/s", ours["ops_s"], ops, "", False, starving)
            # wait percentiles are per request: a pool that starves threads serves the
            # others at once, so its p50/p99 look good; compare only pools that starve none
            for key, what in (("wait_p99_ms", "wait p99"), ("wait_max_worst_ms", "longest wait")):
                waits = {n: s[key] for n, s in fair.items()}
                beaten(f"{t} threads, {what}", ours[key], waits, " ms", True)
            evenness = {n: s["fairness"] for n, s in others.items()}
            beaten(f"{t} threads, fairness", ours["fairness"], evenness, "", False)
    d = res.get("memory", {}).get("heap_above_bare_bytes")
    if d:
        others = {n: d[n] for n in NAMES if n != "pgctx"}
        beaten("Python memory above a bare connection", d["pgctx"], others, " B", True)
    e = res.get("spike", {}).get("stats")
    if e:
        for key, what, unit in (
            ("opened", "spike, connections opened", ""),
            ("wait_p50_ms", "spike, wait p50", " ms"),
            ("wait_max_ms", "spike, wait max", " ms"),
            ("all_done_ms", "spike, last client done", " ms"),
        ):
            others = {n: e[n][key] for n in NAMES if n != "pgctx"}
            beaten(what, e["pgctx"][key], others, unit, True)
    f = res.get("check", {}).get("added_us")
    if f:
        others = {row.split("+")[0]: v for row, v in f.items() if not row.startswith("pgctx")}
        beaten("cost of a checkout check", f["pgctx+check"], others, " µs", True)
    return out
