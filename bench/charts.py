"""The charts of docs/benchmarks.md, drawn with matplotlib from one run's results."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench.peers import LABELS, NAMES

COLORS = {
    "pgctx": "#2a7ab9",
    "psycopg2": "#9a9a9a",
    "psycopg_pool": "#e08a2c",
    "sqlalchemy": "#b8433b",
    "dbutils": "#6a9f58",
}


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def tight_chart(res: dict[str, Any], path: Path, subtitle: str) -> Path:
    """Horizontal bars: µs per checkout + return for every pool and API."""
    plt = _pyplot()
    us = res["tight"]["us"]
    rows = []
    for name in NAMES:
        for variant, label in (("getconn", "getconn/putconn"), ("block", "with-block")):
            if variant in us[name]:
                rows.append((f"{LABELS[name]}  {label}", us[name][variant], COLORS[name]))
        if "decorated" in us[name]:
            rows.append((f"{LABELS[name]}  decorated call", us[name]["decorated"], COLORS[name]))
    fig, ax = plt.subplots(figsize=(8, 0.38 * len(rows) + 1.2))
    labels = [r[0] for r in rows][::-1]
    values = [r[1] for r in rows][::-1]
    ax.barh(labels, values, color=[r[2] for r in rows][::-1])
    for y, v in enumerate(values):
        ax.text(v, y, f" {v:.2f}", va="center", fontsize=8)
    ax.set_xlabel("µs per checkout + return (no query; lower is better)")
    ax.set_title(f"Tight loop, warm pool of 4 connections\n{subtitle}", fontsize=10)
    ax.set_xlim(0, max(values) * 1.15)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def contention_chart(res: dict[str, Any], path: Path, subtitle: str) -> Path:
    """ops/s per pool and thread count, and the longest wait, with the dedicated ceiling."""
    plt = _pyplot()
    stats = res["contention"]["stats"]
    threads = sorted(stats.get("pgctx", {}), key=int)
    present = [n for n in NAMES if n in stats]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    width = 0.8 / len(present)
    for i, name in enumerate(present):
        xs = [k + (i - (len(present) - 1) / 2) * width for k in range(len(threads))]
        ops = [stats[name].get(t, {}).get("ops_s", 0) for t in threads]
        waits = [max(stats[name].get(t, {}).get("wait_max_worst_ms", 0), 0.01) for t in threads]
        starved = [stats[name].get(t, {}).get("starved_worst", 0) for t in threads]
        left.bar(xs, ops, width, label=LABELS[name], color=COLORS[name])
        right.bar(xs, waits, width, label=LABELS[name], color=COLORS[name])
        for x, y, s in zip(xs, ops, starved, strict=True):
            if s:
                left.text(x, y, f"{s:.0f}", ha="center", va="bottom", fontsize=7, color="#b8433b")
    ceiling = stats.get("dedicated-psycopg2", {}).get("4", {}).get("ops_s")
    if ceiling:
        left.axhline(ceiling, color="black", linestyle="--", linewidth=1)
        left.text(-0.45, ceiling, " 4 dedicated connections", va="bottom", fontsize=8)
    for ax in (left, right):
        ax.set_xticks(range(len(threads)), [f"{t} threads" for t in threads])
    left.set_ylabel("requests/s (checkout + SELECT 1 + return)")
    left.set_title("Throughput on 4 connections\n(red: threads starved, worst round)", fontsize=10)
    right.set_yscale("log")
    right.set_ylabel("longest wait for a connection, ms (log)")
    right.axhline(50, color="black", linestyle=":", linewidth=1)
    right.text(len(threads) - 0.5, 50, "50 ms ", ha="right", va="bottom", fontsize=8)
    right.set_title(
        "Longest wait, worst round\n(starved threads: capped at the window)", fontsize=10
    )
    handles, labels = left.get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8, frameon=False)
    fig.suptitle(subtitle, fontsize=9)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
