"""The table `python -m bench` prints (and the README shows), from the JSON results."""

from __future__ import annotations

import os
import platform
import subprocess
from typing import Any

import psutil

from runner._service.devserver import VERSION

GOALS = {
    # issue 15: (what, runner figure / baseline figure or absolute figure, at most)
    "p50": 0.85,
    "p99": 1.0,
    "cpu_per_event": 0.85,
    "idle_rss_mib": 48.0,
}


def machine_info() -> dict[str, Any]:
    node = subprocess.run(["node", "--version"], capture_output=True, text=True, check=False).stdout.strip()
    return {
        "cpu": platform.processor() or platform.machine(),
        "cores": psutil.cpu_count(),
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "os": platform.platform(),
        "python": platform.python_version(),
        "node": node,
        "server": f"@durable-streams/server {VERSION}",
        "load_average": list(os.getloadavg()),
    }


def ratio(runner: float, baseline: float) -> str:
    return f"{runner / baseline:.2f}x" if baseline else "-"


def table(title: str, header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(line[i]) for line in [header, *rows]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        return "  " + "  ".join(
            cell.ljust(width) if i == 0 else cell.rjust(width)
            for i, (cell, width) in enumerate(zip(cells, widths, strict=True))
        )

    return ["", title, line(header), *(line(row) for row in rows)]


def render(results: dict[str, Any]) -> str:
    info = results["machine"]
    out = [
        f"pullwake-runner benchmarks: {info['cores']} cores, {info['memory_gb']} GiB, Python {info['python']}, "
        f"Node {info['node']}, {info['server']}"
    ]
    if latency := results.get("latency"):
        rows = []
        for key, label in (
            ("append_to_handler", "append -> handler called"),
            ("append_to_final_ack", "append -> final ack"),
        ):
            r, b = latency["runner"][key], latency["baseline"][key]
            rows.append(
                [label]
                + [f"{r[p]:.2f}" for p in ("p50_ms", "p90_ms", "p99_ms")]
                + [f"{b[p]:.2f}" for p in ("p50_ms", "p90_ms", "p99_ms")]
                + [ratio(r["p50_ms"], b["p50_ms"])]
            )
        out += table(
            f"Latency, ms ({latency['events']} appends, {latency['gap_s'] * 1000:.0f} ms apart; events that shared a "
            f"batch: runner {latency['runner']['events_in_shared_batches']}, "
            f"baseline {latency['baseline']['events_in_shared_batches']})",
            ["", "p50", "p90", "p99", "base p50", "base p90", "base p99", "p50 ratio"],
            rows,
        )
        if processes := latency.get("processes"):
            r, b = processes["runner"], processes["baseline"]
            rh, bh = r["append_to_handler"], b["append_to_handler"]
            out += table(
                f"Latency mode, each in a process of its own, {processes.get('rounds', 1)} alternating rounds "
                "(runner: no control socket, no metrics listener)",
                ["", "p50 ms", "p99 ms", "CPU ms/event"],
                [
                    ["runner", f"{rh['p50_ms']:.2f}", f"{rh['p99_ms']:.2f}", f"{r['cpu_ms_per_event']:.2f}"],
                    ["baseline", f"{bh['p50_ms']:.2f}", f"{bh['p99_ms']:.2f}", f"{b['cpu_ms_per_event']:.2f}"],
                    [
                        "ratio",
                        ratio(rh["p50_ms"], bh["p50_ms"]),
                        ratio(rh["p99_ms"], bh["p99_ms"]),
                        ratio(r["cpu_ms_per_event"], b["cpu_ms_per_event"]),
                    ],
                ],
            )
    if throughput := results.get("throughput"):
        rows = []
        for row in throughput["rows"]:
            r, b = row["runner"], row["baseline"]
            rows.append(
                [
                    f"{row['subscriptions']} subscription(s)",
                    f"{r['events_per_s']:.0f}",
                    f"{r['batches_per_s']:.0f}",
                    f"{r['cpu_s_per_1000_events']:.3f}",
                    f"{b['events_per_s']:.0f}",
                    f"{b['cpu_s_per_1000_events']:.3f}",
                    ratio(r["events_per_s"], b["events_per_s"]),
                    ratio(r["cpu_s_per_1000_events"], b["cpu_s_per_1000_events"]),
                    f"{r['producer_events_per_s']:.0f}",
                ]
            )
        if backlog := throughput.get("backlog"):
            r, b = backlog["runner"], backlog["baseline"]
            rows.append(
                [
                    f"{backlog['subscriptions']} subs, backlog",
                    f"{r['events_per_s']:.0f}",
                    f"{r['batches_per_s']:.0f}",
                    f"{r['cpu_s_per_1000_events']:.3f}",
                    f"{b['events_per_s']:.0f}",
                    f"{b['cpu_s_per_1000_events']:.3f}",
                    ratio(r["events_per_s"], b["events_per_s"]),
                    ratio(r["cpu_s_per_1000_events"], b["cpu_s_per_1000_events"]),
                    "-",
                ]
            )
        title = (
            f"Throughput ({throughput['events']} events from 32 concurrent appenders; backlog: appended while "
            "the process was stopped, CPU from SIGCONT to all handled"
        )
        if backlog and backlog["runner"].get("wake_stream_reconnected"):
            title += "; the runner reconnected its wake stream after the stop, in the figure"
        out += table(
            title + ")",
            [
                "",
                "events/s",
                "batches/s",
                "CPU s/1k ev",
                "base ev/s",
                "base CPU",
                "ev/s ratio",
                "CPU ratio",
                "producer/s",
            ],
            rows,
        )
    if recovery := results.get("recovery"):
        labels = {
            "hung_connect": "wake-stream connect hangs",
            "frozen_stream": "live stream freezes",
            "server_restart": "server stopped, restarted",
        }
        rows = [
            [label, f"{recovery[key]['detect_s']:.2f}", f"{recovery[key]['recover_s']:.2f}"]
            for key, label in labels.items()
        ]
        out += table(
            f"Recovery, s ({'default' if recovery['settings'] == 'defaults' else recovery['settings']} settings)",
            ["", "fault -> detected", "cleared -> event handled"],
            rows,
        )
        if after := recovery.get("after_fault"):
            out += recovery_table(after)
    if footprint := results.get("footprint"):
        out += [
            "",
            f"Idle footprint over {footprint['idle_seconds']:.0f} s (no control socket, no metrics listener): "
            f"RSS {footprint['rss_mb']:.1f} MiB, CPU {footprint['cpu_percent']:.2f} %, "
            f"{footprint['wakeups_per_s']:.1f} wakeups/s; peak RSS {footprint['peak_rss_mb']:.1f} MiB "
            f"after {footprint['peak_after_events']} events",
        ]
    if start := results.get("start"):
        out += [
            f"start() after the first (median of {start['starts'] - 1}): returns in {start['return_ms']:.1f} ms, "
            f"streaming in {start['streaming_ms']:.1f} ms (first: {start['first_return_ms']:.1f} / "
            f"{start['first_streaming_ms']:.1f} ms)"
        ]
    if stop := results.get("stop"):
        out += [
            f"stop(): idle {stop['idle_ms']:.0f} ms; a claim finishing in 200 ms {stop['claim_finishing_ms']:.0f} ms; "
            f"a claim interrupted at a 2 s drain {stop['claim_interrupted_ms']:.0f} ms"
        ]
    out += goals_table(results)
    return "\n".join(out) + "\n"


def _seconds(value: float | None) -> str:
    return "never" if value is None else f"{value:.2f}"


def _worst(row: dict[str, Any]) -> str:
    return _seconds(row["max_s"]) if "max_s" in row else "-"


def recovery_table(after: dict[str, Any]) -> list[str]:
    kill, gap, storm = after["kill9_mid_claim"], after["server_restart_gap"], after["storm_503"]
    rows = [
        [
            "kill -9 mid-claim, restarted at once",
            "restart",
            _seconds(kill["all_handled_s"]),
            _worst(kill),
            f"{kill['lease_ttl_s']:g}",
            f"{kill['backoff_max_s']:g}",
            f"{kill.get('repeats', 1)} run(s), {kill['events'] // kill.get('repeats', 1)} events in the killed claim",
        ],
        [
            "server restarted (data dir), events in the gap",
            "server answers",
            _seconds(gap["all_handled_s"]),
            _worst(gap),
            f"{gap['lease_ttl_s']:g}",
            f"{gap['backoff_max_s']:g}",
            f"{gap.get('repeats', 1)} run(s): {gap['gap_handled']} of {gap['gap_events']} gap events handled "
            f"({gap['gap_replayed']} replayed); "
            f"runner held off "
            f"{gap['held_off_s']:.2f} s",
        ],
        [
            f"503 storm of {storm['storm_s']:.0f} s",
            "storm ends",
            _seconds(storm["all_handled_s"]),
            _worst(storm),
            f"{storm['lease_ttl_s']:g}",
            f"{storm['backoff_max_s']:g}",
            f"{storm['refused']} requests refused, {storm['reconnects']} reconnects",
        ],
    ]
    return table(
        "Recovery after the fault ends, s (default settings, lease as shown; median and worst of the runs)",
        ["", "from", "-> all handled", "worst", "lease TTL", "backoff cap", "notes"],
        rows,
    )


def verdict(figure: float, goal: float, unit: str) -> str:
    if figure <= goal:
        return f"met, {goal - figure:.2f}{unit} under"
    return f"MISSED by {figure - goal:.2f}{unit} ({(figure / goal - 1) * 100:+.0f} %)"


def goals_table(results: dict[str, Any]) -> list[str]:
    """Issue 15's goals next to the figures of this run, and by how much each is met or missed."""
    rows = []
    if latency := results.get("latency"):
        r, b = latency["runner"]["append_to_handler"], latency["baseline"]["append_to_handler"]
        for key, name in (("p50", "p50_ms"), ("p99", "p99_ms")):
            figure = r[name] / b[name]
            rows.append(
                [
                    f"append -> handler {key} (in-process)",
                    f"<= {GOALS[key]:.2f}x raw",
                    f"{figure:.2f}x ({r[name]:.2f} / {b[name]:.2f} ms)",
                    verdict(figure, GOALS[key], "x"),
                ]
            )
        if processes := latency.get("processes"):
            rc, bc = processes["runner"]["cpu_ms_per_event"], processes["baseline"]["cpu_ms_per_event"]
            figure = rc / bc
            rows.append(
                [
                    "CPU per event, latency mode",
                    f"<= {GOALS['cpu_per_event']:.2f}x raw",
                    f"{figure:.2f}x ({rc:.2f} / {bc:.2f} ms)",
                    verdict(figure, GOALS["cpu_per_event"], "x"),
                ]
            )
    if backlog := results.get("throughput", {}).get("backlog"):
        r, b = backlog["runner"]["cpu_s_per_1000_events"], backlog["baseline"]["cpu_s_per_1000_events"]
        rows.append(
            [
                f"CPU s per 1,000 events, {backlog['subscriptions']}-sub backlog",
                "(no goal)",
                f"{ratio(r, b)} ({r:.3f} / {b:.3f} s)",
                "",
            ]
        )
    if footprint := results.get("footprint"):
        rss = footprint["rss_mb"]
        goal = GOALS["idle_rss_mib"]
        rows.append(["idle RSS", f"<= {goal:.0f} MiB", f"{rss:.1f} MiB", verdict(rss, goal, " MiB")])
    if not rows:
        return []
    return table("Goals (issue 15)", ["", "goal", "this run", ""], rows)
