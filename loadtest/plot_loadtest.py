#!/usr/bin/env python
"""Draw the load report's plots and table from loadgen.py's JSON files.

Usage: plot_loadtest.py RESULT.json... [--out docs/img] [--table]

Runs are grouped by their --label: runs labelled `scale` give latency against
connections, runs labelled `rate` give latency against messages per second,
and every run with server samples adds a line to the memory plot.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

PERCENTILES = ("p50", "p95", "p99")
STYLES = {"product": "-", "reference": "--"}


def load_runs(paths: list[Path]) -> list[dict]:
    runs = []
    for path in paths:
        run = json.loads(path.read_text())
        run["file"] = path.name
        runs.append(run)
    return runs


def series_name(run: dict) -> str:
    options = run["options"]
    return f"{options['target']} ({options['server']})"


def plot_latency_against(runs: list[dict], label: str, x_key: str, x_title: str, output: Path) -> bool:
    chosen = [run for run in runs if run["options"].get("label") == label]
    if label == "rate" and chosen:
        # The scale run at the same socket count is one more point on the rate axis.
        connections = {run["options"]["connections"] for run in chosen}
        chosen += [
            run
            for run in runs
            if run["options"].get("label") == "scale"
            and run["options"]["connections"] in connections
            and run["options"]["target"] == "product"
        ]
    if not chosen:
        return False
    figure, axis = plt.subplots(figsize=(7, 4.2))
    for name in sorted({series_name(run) for run in chosen}):
        points = sorted(
            (run["options"][x_key], run["result"]["latency_ms"]) for run in chosen if series_name(run) == name
        )
        target = name.split(" ")[0]
        for percentile in PERCENTILES:
            xs = [x for x, latency in points if percentile in latency]
            ys = [latency[percentile] for x, latency in points if percentile in latency]
            axis.plot(xs, ys, STYLES.get(target, "-"), marker="o", label=f"{name} {percentile}")
    axis.axhline(100, color="grey", linewidth=0.8, linestyle=":")
    axis.set_yscale("log")
    axis.set_xlabel(x_title)
    axis.set_ylabel("post-to-delivery latency (ms, log scale)")
    axis.grid(True, which="both", alpha=0.3)
    axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(output, dpi=110)
    plt.close(figure)
    return True


def plot_memory(runs: list[dict], output: Path) -> bool:
    chosen = [run for run in runs if run["options"].get("label") == "scale" and run["server"].get("samples")]
    if not chosen:
        return False
    figure, axis = plt.subplots(figsize=(7, 4.2))
    for run in sorted(chosen, key=lambda run: (series_name(run), run["options"]["connections"])):
        samples = run["server"]["samples"]
        target = run["options"]["target"]
        axis.plot(
            [sample["t"] for sample in samples],
            [sample["rss_mb"] for sample in samples],
            STYLES.get(target, "-"),
            label=f"{series_name(run)}, {run['options']['connections']} sockets",
        )
    axis.set_xlabel("seconds since the server started")
    axis.set_ylabel("server RSS (MB)")
    axis.grid(True, alpha=0.3)
    axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(output, dpi=110)
    plt.close(figure)
    return True


def table_row(run: dict) -> str:
    options, result, server = run["options"], run["result"], run["server"]
    latency, delivery = result["latency_ms"], result["delivery"]
    failed = sum(result["connect_failures"].values())
    storm = result["storm"]
    storm_text = f"{storm['seconds_until_all_back']:.1f}" if storm.get("seconds_until_all_back") else ""
    return (
        f"| {options.get('label', '')} | {options['target']} | {options['server']}"
        f"{' x' + str(options['server_processes']) if options['server_processes'] > 1 else ''} "
        f"| {result['connected']:,} / {failed:,} | {options['ramp_rate']:g} | {options['rate']:g} | {options['duration']:g} "
        f"| {latency.get('p50', '')} | {latency.get('p95', '')} | {latency.get('p99', '')} | {latency.get('max', '')} "
        f"| {delivery['lost']} / {delivery['out_of_order']} / {delivery['duplicates']} "
        f"| {server['cpu_percent_send_phase']} | {server['cpu_ms_per_delivery']} | {server['idle_kb_per_socket']} "
        f"| {server['rss_mb_max']} | {result['generator_cpu_percent_send_phase']} | {storm_text} | {run['file']} |"
    )


TABLE_HEADER = (
    "| run | chat | server | open / failed | ramp/s | msg/s | s | p50 ms | p95 ms | p99 ms | max ms "
    "| lost / order / dup | server CPU % | CPU ms per delivery | idle KB per socket | max RSS MB | generator CPU % "
    "| storm: s until all back | file |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("files", type=Path, nargs="+", help="JSON files written by loadgen.py.")
    parser.add_argument("--out", type=Path, default=Path("docs/img"), help="Folder for the PNG plots (default: docs/img).")
    parser.add_argument("--table", action="store_true", help="Print a Markdown table of every run.")
    args = parser.parse_args()

    runs = load_runs(args.files)
    args.out.mkdir(parents=True, exist_ok=True)
    written = []
    if plot_latency_against(runs, "scale", "connections", "open sockets (rooms of 100, 1 message/s per room)", args.out / "load-latency-by-connections.png"):
        written.append("load-latency-by-connections.png")
    if plot_latency_against(runs, "rate", "rate", "messages per second, all rooms", args.out / "load-latency-by-rate.png"):
        written.append("load-latency-by-rate.png")
    if plot_memory(runs, args.out / "load-memory.png"):
        written.append("load-memory.png")
    print("Wrote", ", ".join(written) or "no plots: no run has the label scale or rate")
    if args.table:
        print(TABLE_HEADER)
        for run in sorted(runs, key=lambda run: (run["options"].get("label", ""), run["options"]["connections"], run["options"]["rate"], run["options"]["target"])):
            print(table_row(run))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
