#!/usr/bin/env python
"""Plot a soak_presence.py result: memory, presence state, event rate and heartbeat period over simulated hours.

Needs matplotlib, which is not yet in the project's `load` extra:
.venv/bin/pip install matplotlib
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

MB = 2**20


def plot_result(result: dict, png_path: Path) -> None:
    """Draw five panels that share the simulated-hour axis and save them as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    samples = result["samples"]
    seconds_per_hour = result["mapping"]["wall_seconds_per_simulated_hour"]
    warmup_hours = result["options"]["warmup"] / seconds_per_hour
    churn_end_hours = result["churn_seconds"] / seconds_per_hour
    hours = [sample["t"] / seconds_per_hour for sample in samples]

    figure, (rss_axis, redis_axis, state_axis, rate_axis, period_axis) = plt.subplots(
        5, 1, figsize=(10, 13), sharex=True, gridspec_kw={"height_ratios": [3, 3, 2, 2, 2]}
    )
    rss_axis.plot(hours, [sample["daphne_rss"] / MB for sample in samples], color="tab:blue", label="daphne RSS")
    rss_axis.plot(hours, [sample["client_rss"] / MB for sample in samples], color="tab:gray", label="client RSS (this script)")
    rss_axis.set_ylabel("MB")
    rss_axis.set_title("Node and client resident memory")

    redis_axis.plot(hours, [sample["redis_used_memory"] / MB for sample in samples], color="tab:red", label="Redis used_memory")
    redis_axis.set_ylabel("MB")
    presence_axis = redis_axis.twinx()
    presence_axis.plot(
        hours, [sample["presence"]["bytes"] / 1024 for sample in samples], color="tab:orange", label="presence keys (MEMORY USAGE)"
    )
    presence_axis.set_ylabel("presence keys, KB")
    redis_axis.set_title("Redis memory")
    lines = redis_axis.get_lines() + presence_axis.get_lines()
    redis_axis.legend(lines, [line.get_label() for line in lines], loc="upper left", fontsize="small")

    state_axis.plot(hours, [sample["live"] for sample in samples], color="tab:green", label="open client sockets")
    state_axis.plot(
        hours, [sample["presence"]["listed_connections"] for sample in samples], color="tab:purple", label="connections listed in Redis"
    )
    state_axis.plot(hours, [sample["presence"]["online_users"] for sample in samples], color="tab:brown", label="online users (room, user)")
    state_axis.plot(
        hours,
        [sum(sample["node_redis_clients"].values()) for sample in samples],
        color="tab:red",
        label="node's Redis connections",
    )
    state_axis.plot(hours, [sample["daphne_fds"] for sample in samples], color="0.4", linestyle=":", label="node's open file descriptors")
    state_axis.set_ylabel("count")
    state_axis.set_title("Presence state and node connections")

    rate_hours, rates = script_call_rates(samples, seconds_per_hour)
    rate_axis.plot(rate_hours, rates, color="black", label="Redis script calls per wall second")
    rate_axis.set_ylabel("calls/s")
    rate_axis.set_title("Presence events")

    timeline = result["heartbeat"].get("timeline", [])
    period_axis.scatter(
        [moment / seconds_per_hour for moment, _ in timeline], [period / 1000 for _, period in timeline], s=2, color="black"
    )
    for first, last in result["heartbeat"].get("sentinel_unlisted_s", []):
        end = result["churn_seconds"] if last is None else last
        period_axis.axvspan(first / seconds_per_hour, end / seconds_per_hour, color="tab:red", alpha=0.3)
    period_axis.axhline(result["options"]["ttl"], color="tab:red", linestyle=":", linewidth=1)
    period_axis.set_yscale("log")
    period_axis.set_ylabel("seconds")
    period_axis.set_title("Heartbeat period (dotted: TTL; red: the node had reaped its own sentinel connection)")
    period_axis.set_xlabel(f"simulated hours (1 h = {seconds_per_hour:.2f} wall seconds)")

    for axis in (rss_axis, redis_axis, state_axis, rate_axis, period_axis):
        axis.axvspan(0, warmup_hours, color="0.9", zorder=0)
        axis.axvline(churn_end_hours, color="0.5", linestyle="--", linewidth=1)
        for storm in result["storm_times_s"]:
            axis.axvline(storm / seconds_per_hour, color="tab:red", alpha=0.25, linewidth=1)
        axis.grid(True, alpha=0.3)
    for axis in (rss_axis, state_axis, rate_axis):
        axis.legend(loc="upper left", fontsize="small")
    rss_axis.set_ylim(bottom=0)
    redis_axis.set_ylim(bottom=0)
    presence_axis.set_ylim(bottom=0)

    figure.suptitle(
        "Presence soak: grey = warm-up (left out of the slopes), red lines = reconnect storms, dashed = sockets closed",
        fontsize="medium",
    )
    figure.tight_layout()
    figure.savefig(png_path, dpi=100)
    plt.close(figure)


def script_call_rates(samples: list[dict], seconds_per_hour: float) -> tuple[list[float], list[float]]:
    """Return (simulated hour, script calls per wall second) between consecutive samples."""
    hours = []
    rates = []
    for previous, current in zip(samples, samples[1:]):
        seconds = current["t"] - previous["t"]
        if seconds <= 0:
            continue
        hours.append(current["t"] / seconds_per_hour)
        rates.append((current["redis_script_calls"] - previous["redis_script_calls"]) / seconds)
    return hours, rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("result", type=Path, help="JSON result written by loadtest/soak_presence.py.")
    parser.add_argument("-o", "--output", type=Path, help="Path of the PNG (default: the result's path with .png).")
    args = parser.parse_args()
    plot_result(json.loads(args.result.read_text()), args.output or args.result.with_suffix(".png"))


if __name__ == "__main__":
    main()
