"""``ps3-bench``'s reports: the Markdown table with FLOPs relative to one PS3 look, and the plot
of cost against resolution."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Sequence


def _fmt(value, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return f"{value:,}"


def markdown_table(records: Sequence[dict[str, Any]]) -> str:
    """Results table, then FLOPs and tokens of every method relative to ``ps3-1``."""
    first = records[0] if records else {}
    lines = [
        f"**ps3-bench** preset `{first.get('preset')}` on {first.get('device')} "
        f"(torch {first.get('torch')}, triton {first.get('triton')}, commit {first.get('git_commit')}, {first.get('dtype')})",
        "",
        "| method | resolution | batch | tokens/img | GFLOP/img | latency ms | ms/img | TFLOP/s | peak MiB | status |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    notes = []
    for r in records:
        gflop = r["flops_per_image"] / 1e9 if r["flops_per_image"] is not None else None
        status = r["status"]
        if r["error"]:
            notes.append(f"- {r['method']} {r['resolution']} x{r['batch']}: {r['error']}")
            status += f" [{len(notes)}]"
        lines.append(
            f"| {r['method']} | {r['resolution']} | {r['batch']} | {_fmt(r['tokens'])} | {_fmt(gflop)} | "
            f"{_fmt(r['latency_ms'], 2)} | {_fmt(r['latency_ms_per_image'], 2)} | {_fmt(r['tflops_per_s'], 2)} | "
            f"{_fmt(r['peak_mem_mb'])} | {status} |"
        )
    if notes:
        lines += ["", "Notes:", *[f"{i + 1}. {n[2:]}" for i, n in enumerate(notes)]]
    ratio = _ratio_table(records)
    if ratio:
        lines += ["", "FLOPs per image relative to ps3-1 (tokens relative to ps3-1 in brackets):", "", *ratio]
    return "\n".join(lines) + "\n"


def _ratio_table(records: Sequence[dict[str, Any]]) -> list[str]:
    per_image = {}
    for r in records:
        if r["flops_per_image"] is not None and r["tokens"] is not None:
            per_image.setdefault((r["method"], r["resolution"]), (r["flops_per_image"], r["tokens"]))
    methods = [m for m in dict.fromkeys(r["method"] for r in records) if any(k[0] == m for k in per_image)]
    resolutions = sorted({k[1] for k in per_image if ("ps3-1", k[1]) in per_image})
    if not resolutions or len(methods) < 2:
        return []
    lines = ["| resolution | " + " | ".join(methods) + " |", "|---:|" + "---:|" * len(methods)]
    for R in resolutions:
        base_f, base_t = per_image[("ps3-1", R)]
        cells = []
        for m in methods:
            f_t = per_image.get((m, R))
            cells.append("-" if f_t is None else f"{f_t[0] / base_f:.2f}x ({f_t[1] / base_t:.2f}x)")
        lines.append(f"| {R} | " + " | ".join(cells) + " |")
    return lines


def plot(records: Sequence[dict[str, Any]], path: Path) -> bool:
    """FLOPs and latency per image vs resolution, one line per method (log scale).

    Without timings (``--count-only``) the second panel shows encoder tokens instead.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: skipping the plot (pip install 'ps3-kernels[bench]')", file=sys.stderr)
        return False
    batch = min((r["batch"] for r in records), default=1)
    timed = any(r["latency_ms_per_image"] for r in records)
    right_key, right_title = (
        ("latency_ms_per_image", f"latency per image (ms), batch {batch}") if timed else ("tokens", "encoder tokens per image")
    )
    fig, (ax_f, ax_r) = plt.subplots(1, 2, figsize=(12, 4.5))
    for method in dict.fromkeys(r["method"] for r in records):
        rows = sorted((r for r in records if r["method"] == method and r["batch"] == batch), key=lambda r: r["resolution"])
        flops = [(r["resolution"], r["flops_per_image"] / 1e9) for r in rows if r["flops_per_image"]]
        right = [(r["resolution"], r[right_key]) for r in rows if r[right_key]]
        style = "--" if method.startswith("upstream") else "-"
        if flops:
            ax_f.plot(*zip(*flops), style, marker="o", label=method)
        if right:
            ax_r.plot(*zip(*right), style, marker="o", label=method)
    for ax, title in ((ax_f, "GFLOP per image"), (ax_r, right_title)):
        ax.set_yscale("log")
        ax.set_xlabel("resolution (px)")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
    ax_f.legend(fontsize=8)
    first = records[0] if records else {}
    fig.suptitle(f"ps3-bench {first.get('preset')} on {first.get('device')}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True
