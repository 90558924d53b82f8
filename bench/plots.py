"""PNG plots of the benchmark results (bench/results/*.json) for docs/benchmarks.md.

    .venv/bin/python -m bench.plots [--results bench/results] [--out docs/img]

Draws whichever results exist: throughput.png, scaling.png, eviction.png, latency.png.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from bench.common import REPO, RESULTS  # noqa: E402

COLORS = {"bare": "#9e9e9e", "ours": "#1f77b4", "today": "#9ecae1", "ours-up": "#2ca02c", "today-up": "#a1d99b",
          "celery": "#8c564b"}
TITLES = {"noop": "no-op", "cpu20": "20 ms CPU", "io200": "200 ms I/O wait", "sleep20": "20 ms handler (waiting)"}


def load(results: Path, name: str) -> dict[str, Any] | None:
    path = results / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def machine_note(data: dict[str, Any]) -> str:
    m = data["machine"]
    return f"{m['cpus']} CPUs ({m['cpu_model']}), Python {m['python']}, {m['date']}"


def throughput(data: dict[str, Any], out: Path) -> None:
    best = data["best"]
    workloads = list(dict.fromkeys(r["setup"]["workload"] for r in best))
    fig, axes = plt.subplots(1, len(workloads), figsize=(4.2 * len(workloads), 4))
    for ax, workload in zip(axes if len(workloads) > 1 else [axes], workloads):
        rows = [r for r in best if r["setup"]["workload"] == workload]
        labels = [f"{r['setup']['tool']}\n{shape(r['setup'])}" for r in rows]
        bars = ax.bar(labels, [r["rate"] for r in rows], color=[COLORS[r["setup"]["tool"]] for r in rows])
        ax.bar_label(bars, fmt="%.0f", fontsize=8)
        ax.set_title(TITLES.get(workload, workload))
        ax.set_ylabel("messages/s")
        ax.tick_params(axis="x", labelsize=7)
    fig.suptitle(f"Throughput on one Azurite, same messages and processes\n{machine_note(data)}", fontsize=9)
    fig.tight_layout()
    fig.savefig(out / "throughput.png", dpi=110)


def shape(setup: dict[str, Any]) -> str:
    return f"{setup['processes']} proc" if setup["threads"] == 1 else f"1 proc\n× {setup['threads']} threads"


def scaling(data: dict[str, Any], out: Path) -> None:
    fig, ax = plt.subplots(figsize=(5.5, 4))
    tools = list(dict.fromkeys(r["tool"] for r in data["rows"]))
    for tool in tools:
        rows = [r for r in data["rows"] if r["tool"] == tool]
        ax.plot([r["workers"] for r in rows], [r["rate"] for r in rows], "o-", color=COLORS[tool], label=tool)
        single = next((r["rate"] for r in rows if r["workers"] == 1), None)
        if single and tool == "ours":
            xs = [r["workers"] for r in rows]
            ax.plot(xs, [single * min(x, data["cpus"]) for x in xs], ":", color=COLORS[tool], label="ours, perfect scaling")
    ax.axvline(data["cpus"], color="#cccccc", lw=1)
    ax.set_xticks(sorted({r["workers"] for r in data["rows"]}))
    ax.set_ylim(bottom=0)
    ax.set_xlabel("workers")
    ax.set_ylabel("messages/s (20 ms CPU each)")
    ax.set_title(f"CPU-bound scaling ({data['cpus']} CPUs)", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "scaling.png", dpi=110)


def eviction(data: dict[str, Any], out: Path) -> None:
    metrics = {"notice_to_stopped_s": "notice →\nworkers stopped", "notice_to_released_s": "notice →\nreleased visible",
               "notice_to_ack_s": "notice →\nacknowledged", "exit_to_ack_s": "last exit →\nacknowledged"}
    values = [[1000 * r[key] for r in data["rounds"] if r.get(key) is not None] for key in metrics]
    fig, ax = plt.subplots(figsize=(6.5, 4))
    ax.boxplot(values, whis=(5, 95), showfliers=True)
    ax.set_xticks(range(1, len(metrics) + 1), list(metrics.values()), fontsize=8)
    ax.set_ylabel("milliseconds")
    poll = data["config"]["poll_interval_s"]
    ax.set_title(f"{len(data['rounds'])} simulated evictions, Scheduled Events polled every {poll:g} s", fontsize=10)
    fig.tight_layout()
    fig.savefig(out / "eviction.png", dpi=110)


def latency(data: dict[str, Any], out: Path) -> None:
    best = data["best"]
    workloads = list(dict.fromkeys(r["row"]["workload"] for r in best))
    tools = list(dict.fromkeys(r["row"]["tool"] for r in best))
    before = data.get("baseline") or "baseline"
    labels = {"today": f"ours at {before} (before)", "ours": "ours", "ours-up": "ours, scale-up (1 process, threads)",
              "today-up": f"ours at {before}, scale-up (before)"}
    fig, axes = plt.subplots(1, len(workloads), figsize=(4.8 * len(workloads), 4.8))
    for ax, workload in zip(axes if len(workloads) > 1 else [axes], workloads):
        for tool in tools:
            rows = sorted((r for r in best if r["row"]["workload"] == workload and r["row"]["tool"] == tool),
                          key=lambda r: r["row"]["delay_ms"])
            ax.plot([r["row"]["delay_ms"] for r in rows], [r["rate"] for r in rows], "s--" if tool.endswith("-up") else "o-",
                    color=COLORS[tool], label=labels.get(tool, tool))
        if workload == "sleep20":
            ax.axhline(50 * data["processes"], color="#cccccc", ls=":", label="ideal")
        ax.set_xticks(sorted({r["row"]["delay_ms"] for r in best}))
        ax.set_ylim(bottom=0)
        ax.set_xlabel("added to every queue response (ms)")
        ax.set_ylabel("messages/s")
        ax.set_title(f"{TITLES.get(workload, workload)}, {data['processes']} processes", fontsize=10)
    handles, names = axes[-1].get_legend_handles_labels() if len(workloads) > 1 else axes.get_legend_handles_labels()
    fig.legend(handles, names, loc="lower center", ncol=4, fontsize=8, frameon=False)
    fig.suptitle(f"Azurite behind a delay proxy\n{machine_note(data)}", fontsize=9)
    fig.tight_layout(rect=(0, 0.12, 1, 1))
    fig.savefig(out / "latency.png", dpi=110)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "img")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for name, draw in (("throughput", throughput), ("scaling", scaling), ("eviction_timing", eviction), ("latency", latency)):
        data = load(args.results, name)
        if data is not None:
            draw(data, args.out)
            print(f"plotted {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
