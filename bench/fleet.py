"""A fleet of `pullwake run` processes on one wake stream (issue 22's goals).

For each N runners x M subscriptions: a fresh reference server with a data directory, a
counting proxy in front of it (every request of the runners goes through it; the producer
appends straight to the server), N processes with a config each (own runner_id and
state_dir; the same wake stream and M subscriptions, one stream per subscription), and a
producer appending `fleet_rate` events/s to random subscriptions' streams:

- start: requests through the proxy from launch until the fleet settled (all streaming, then
  `SETTLE` s), and each runner's time from `runner.starting` to following its wake stream;
- steady (`fleet_seconds`): claim requests per handled wake (claims the proxy saw / claims
  the runners' metrics count completed), the runners' CPU per 1,000 events and its ratio to
  N=1 of the same M, the server's, p50/p99 append -> handler, the spread (events handled by the
  busiest / the least busy runner), events handled twice;
- restart under load: the server stopped for `fleet_down_seconds` and started again on the
  same port and data dir while the producer keeps going (`fleet_after_seconds` after it
  answers): events lost (must be 0), handled twice (%), from the server answering to every
  runner following its wake stream again, and the wait of the events appended after it answers.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from collections import Counter, defaultdict
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import psutil
import trio
from prometheus_client.parser import text_string_to_metric_families

from bench.core import (
    Bench,
    cpu_seconds,
    free_port,
    percentiles,
    recorded,
    start_runner_process,
    stop_process,
    until,
)
from bench.report import table, verdict
from faults.proxy import Proxy
from runner import SubscriptionSpec
from runner._dispatch import CONFIRMING_AT_ONCE
from runner._service.devserver import DevServer
from runner._wire.client import StreamsClient, build_http

MEMORY = "/dev/shm" if Path("/dev/shm").is_dir() else None
"""Where the server keeps its data (if there): the file-backed reference server fsyncs every append,
which on a shared disk costs tens of ms per wake; on tmpfs the figures are the runners'."""
SETTLE = 3.0
"""Seconds after the last runner follows its wake stream that still count as the start (joins, sweeps)."""
CREATE_PROBES = 100
"""Subscriptions created to time the server's create (`_create_cost`)."""

# issue 22's goals
CLAIMS_PER_WAKE = 1.1
CPU_RATIO = 1.5
P99_RATIO = 2.0
RESTART_DUPLICATES_PCT = 1.0
NEW_EVENTS_AFTER_RESTART_S = 1.0
STREAMING_AFTER_START_S = 1.0
SPREAD = 3.0


def _kind(method: str, target: str) -> str:
    """What a request through the proxy was for: claim, ack, release, subscription PUT, fleet/stream GET..."""
    path = target.split("?", 1)[0]
    if "/__ds/subscriptions/" in path:
        return path.rsplit("/", 1)[1] if method == "POST" else f"subscription {method}"
    return f"{'fleet' if '/__pullwake/fleet/' in path else 'stream'} {method}"


class Requests:
    """Requests the proxy saw, by kind, since the last `take`."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()

    def __call__(self, method: str, target: str) -> None:
        self.counts[_kind(method, target)] += 1

    def take(self) -> Counter[str]:
        counts, self.counts = self.counts, Counter()
        return counts


@dataclass
class Member:
    """One runner process of the fleet."""

    process: trio.Process
    record: Path
    log: Path
    port: int

    def cpu(self) -> float:
        return cpu_seconds(psutil.Process(self.process.pid))


@dataclass
class Snapshot:
    runner_cpu: float
    server_cpu: float
    metrics: Counter[str]


async def fleet(bench: Bench) -> None:
    scale = bench.scale
    rows = []
    for subscriptions in scale.fleet_subscriptions:
        for runners in scale.fleet_runners:
            print(f"    fleet: {runners} runner(s), {subscriptions} subscriptions", file=sys.stderr, flush=True)
            rows.append(await _measure(bench, runners, subscriptions))
    alone = {row["subscriptions"]: row for row in rows if row["runners"] == 1}
    for row in rows:
        if (one := alone.get(row["subscriptions"])) is not None:
            row["steady"]["cpu_ratio"] = _ratio(row["steady"]["runner_cpu_s_per_1000"], one)
            row["steady"]["p99_ratio"] = (
                row["steady"]["latency"]["p99_ms"] / one["steady"]["latency"]["p99_ms"]
                if one["steady"]["latency"].get("p99_ms")
                else None
            )
    bench.results["fleet"] = {
        "rate": scale.fleet_rate,
        "seconds": scale.fleet_seconds,
        "down_seconds": scale.fleet_down_seconds,
        "after_seconds": scale.fleet_after_seconds,
        "rows": rows,
        "load_average": list(os.getloadavg()),
        "partitioned": scale.fleet_partitioned,
    }


def _ratio(cpu: float, one: dict[str, Any]) -> float | None:
    base = one["steady"]["runner_cpu_s_per_1000"]
    return cpu / base if base else None


async def _measure(bench: Bench, runners: int, subscriptions: int) -> dict[str, Any]:
    uid = f"fl{uuid.uuid4().hex[:6]}"
    wake = f"wake-{uid}/pool"
    data = Path(tempfile.mkdtemp(prefix=f"pullwake-{uid}-", dir=MEMORY))
    server = DevServer(data_dir=data, log_file=bench.scratch / f"server-{uid}.log")
    await trio.to_thread.run_sync(server.start)
    requests = Requests()
    members: list[Member] = []
    try:
        assert server.url is not None
        async with trio.open_nursery() as nursery, build_http(server.url, timeout=10) as http:
            proxy = Proxy(server.port, requests)
            await nursery.start(proxy.run)
            producer = StreamsClient(http)
            streams = [f"{uid}/{j}/a" for j in range(subscriptions)]
            await _create(producer, streams)
            specs = tuple(SubscriptionSpec(id=f"{uid}-{j}", pattern=f"{uid}/{j}/*") for j in range(subscriptions))
            try:
                launched = time.time()
                requests.take()
                partitioned = bench.scale.fleet_partitioned
                for k in range(runners):
                    port = free_port()
                    config = bench.runner_config(
                        f"{uid}-r{k}",
                        f"{wake}/{k}" if partitioned else wake,
                        specs[k::runners] if partitioned else specs,
                        port=port,
                        handler="bench.handlers:record",
                        server_url=proxy.url,
                        state_dir=bench.scratch / f"state-{uid}-{k}",
                    )
                    record, log = bench.scratch / f"{uid}-{k}.jsonl", bench.scratch / f"{uid}-{k}.log"
                    process = await start_runner_process(config, log, BENCH_RECORD=str(record))
                    members.append(Member(process, record, log, port))
                start = await _start(members, requests, launched, subscriptions, runners)
                start["server_create_ms"] = await _create_cost(producer, wake, uid)
                rng = random.Random(22)
                steady = await _steady(bench, members, server, producer, streams, requests, rng)
                restart = await _restart(bench, members, server, producer, streams, rng, first=steady["events"])
            finally:
                with trio.CancelScope(shield=True):
                    async with trio.open_nursery() as stopping:
                        for member in members:
                            stopping.start_soon(stop_process, member.process)
            nursery.cancel_scope.cancel()
    finally:
        await trio.to_thread.run_sync(server.stop)
        shutil.rmtree(data, ignore_errors=True)
    return {"runners": runners, "subscriptions": subscriptions, "start": start, "steady": steady, "restart": restart}


async def _create(producer: StreamsClient, streams: list[str]) -> None:
    limiter = trio.CapacityLimiter(16)

    async def one(stream: str) -> None:
        async with limiter:
            await producer.create_stream(stream)

    async with trio.open_nursery() as nursery:
        for stream in streams:
            nursery.start_soon(one, stream)


def _log_times(log: Path) -> tuple[float | None, list[float]]:
    """When the runner logged `runner.starting` (first), and every entry into `streaming` (Unix seconds)."""
    starting, streaming = None, []
    for line in log.read_text().splitlines():
        if '"runner.starting"' not in line and '"target": "streaming"' not in line:
            continue
        entry = json.loads(line)
        at = datetime.fromisoformat(entry["timestamp"]).timestamp()
        if entry["event"] == "runner.starting":
            starting = starting if starting is not None else at
        else:
            streaming.append(at)
    return starting, streaming


async def _start(
    members: list[Member], requests: Requests, launched: float, subscriptions: int, runners: int
) -> dict[str, Any]:
    """Requests until the fleet settled, and each runner's time to following its wake stream."""
    await until(lambda: all(_log_times(m.log)[1] for m in members), 300, "every runner to stream", every=0.1)
    await trio.sleep(SETTLE)
    counts = requests.take()
    to_streaming, from_launch = [], []
    for member in members:
        starting, streaming = _log_times(member.log)
        assert starting is not None
        to_streaming.append(streaming[0] - starting)
        from_launch.append(streaming[0] - launched)
    return {
        "requests": sum(counts.values()),
        "by_kind": dict(counts),
        "budget": 2 * subscriptions + 10 * runners,
        "streaming_s_max": max(to_streaming),
        "streaming_s_median": statistics.median(to_streaming),
        "from_launch_s_max": max(from_launch),
    }


async def _create_cost(producer: StreamsClient, wake: str, uid: str) -> float:
    """The server's time per subscription it creates, as it stands (ms; straight to it, not through
    the proxy, as many at a time as a runner sends, then deleted). A first start and the re-creation
    after a server restart create M of them: M times this is their floor, whatever the runners do
    (the reference server matches a new pattern against every stream it has, one request at a time)."""
    probes = [f"{uid}-probe-{i}" for i in range(CREATE_PROBES)]
    limiter = trio.CapacityLimiter(CONFIRMING_AT_ONCE)

    async def create(probe: str) -> None:
        async with limiter:
            await producer.ensure_subscription(probe, wake_stream=wake, pattern=f"{uid}-probe/{probe}/*")

    started = time.perf_counter()
    try:
        async with trio.open_nursery() as nursery:
            for probe in probes:
                nursery.start_soon(create, probe)
        return (time.perf_counter() - started) / len(probes) * 1000
    finally:
        with trio.CancelScope(shield=True):
            for probe in probes:
                await producer.delete_subscription(probe)  # none left to write wakes, whatever happened


async def _snapshot(members: list[Member], server: DevServer) -> Snapshot:
    metrics: Counter[str] = Counter()
    async with httpx.AsyncClient(timeout=10) as http:
        for member in members:
            text = (await http.get(f"http://127.0.0.1:{member.port}/metrics")).text
            for family in text_string_to_metric_families(text):
                for sample in family.samples:
                    if sample.name == "pullwake_claims_total":
                        metrics[f"claims_{sample.labels['result']}"] += int(sample.value)
                    elif sample.name == "pullwake_claim_races_lost_total":
                        metrics["races_lost"] += int(sample.value)
                    elif sample.name == "pullwake_subscription_gaps_total":
                        metrics[f"gaps_{sample.labels['action']}"] += int(sample.value)
    assert server.pid is not None
    return Snapshot(sum(member.cpu() for member in members), cpu_seconds(psutil.Process(server.pid)), metrics)


async def _produce(
    producer: StreamsClient,
    streams: list[str],
    rate: float,
    rng: random.Random,
    first: int,
    until: trio.Event,
    where: dict[int, str] | None = None,
) -> dict[int, float]:
    """Append {"i": n} to a random stream `rate` times a second until `until`; n -> when the append returned.

    Appends that fail (the server is down) are skipped, not retried: they never happened.
    """
    appended: dict[int, float] = {}
    slot, n = trio.current_time(), first
    while not until.is_set():
        stream = rng.choice(streams)
        try:
            await producer.append(stream, {"i": n})
            appended[n] = time.perf_counter()
            if where is not None:
                where[n] = stream
        except Exception:  # the server may be the fault
            pass
        n += 1
        slot = max(slot + 1 / rate, trio.current_time())  # late (the server is down): no burst after
        await trio.sleep_until(slot)
    return appended


def _handled(members: list[Member]) -> dict[int, list[tuple[float, int]]]:
    """Event number -> (when, which runner) for every time it was handled."""
    handled: dict[int, list[tuple[float, int]]] = defaultdict(list)
    for k, member in enumerate(members):
        for entry in recorded(member.record):
            if isinstance(entry.get("i"), int):
                handled[entry["i"]].append((entry["t"], k))
    return handled


async def _all_handled(members: list[Member], events: dict[int, float], timeout: float) -> dict[int, Any]:
    """Every time each event was handled, once all of `events` were (or `timeout` passed: some are lost)."""
    with contextlib.suppress(TimeoutError):
        await until(lambda: _handled(members).keys() >= events.keys(), timeout, "every event handled", every=0.25)
    return _handled(members)


async def _run_producer(
    bench: Bench, producer: StreamsClient, streams: list[str], rng: random.Random, first: int, seconds: float
) -> dict[int, float]:
    done = trio.Event()
    result: dict[int, float] = {}

    async def produce() -> None:
        result.update(await _produce(producer, streams, bench.scale.fleet_rate, rng, first, done))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(produce)
        await trio.sleep(seconds)
        done.set()
    return result


async def _steady(
    bench: Bench,
    members: list[Member],
    server: DevServer,
    producer: StreamsClient,
    streams: list[str],
    requests: Requests,
    rng: random.Random,
) -> dict[str, Any]:
    before = await _snapshot(members, server)
    requests.take()
    appended = await _run_producer(bench, producer, streams, rng, 0, bench.scale.fleet_seconds)
    handled = await _all_handled(members, appended, 60)
    after = await _snapshot(members, server)
    counts = requests.take()
    metrics = after.metrics - before.metrics
    events = len(appended)
    waits = [handled[i][0][0] - at for i, at in appended.items() if i in handled]
    per_runner = Counter(k for i in appended for _, k in handled.get(i, [])[:1])
    busiest = max(per_runner.values(), default=0)
    least = min((per_runner.get(k, 0) for k in range(len(members))), default=0)
    wakes = metrics["claims_completed"]
    return {
        "events": events,
        "handled_wakes": wakes,
        "claim_requests": counts["claim"],
        "claims_per_wake": counts["claim"] / wakes if wakes else None,
        "races_lost_per_wake": metrics["races_lost"] / wakes if wakes else None,
        "requests_per_event": sum(counts.values()) / events if events else None,
        "requests_by_kind": dict(counts),
        "runner_cpu_s_per_1000": (after.runner_cpu - before.runner_cpu) / events * 1000 if events else 0.0,
        "server_cpu_s_per_1000": (after.server_cpu - before.server_cpu) / events * 1000 if events else 0.0,
        "latency": percentiles(waits) if waits else {},
        "per_runner": [per_runner.get(k, 0) for k in range(len(members))],
        "spread": busiest / least if least else None,
        "duplicates": sum(len(handled.get(i, [])) > 1 for i in appended),
        "lost": sum(i not in handled for i in appended),
    }


async def _restart(
    bench: Bench,
    members: list[Member],
    server: DevServer,
    producer: StreamsClient,
    streams: list[str],
    rng: random.Random,
    *,
    first: int,
) -> dict[str, Any]:
    """The server stops for `fleet_down_seconds` under load and comes back (same port and data dir)."""
    scale = bench.scale
    before = await _snapshot(members, server)
    done = trio.Event()
    appended: dict[int, float] = {}
    where: dict[int, str] = {}
    back = back_wall = 0.0

    async def produce() -> None:
        appended.update(await _produce(producer, streams, scale.fleet_rate, rng, first, done, where))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(produce)
        await trio.sleep(2)
        stopping, stopping_wall = time.perf_counter(), time.time()
        await trio.to_thread.run_sync(server.stop)  # SIGTERM: it answers (without subscriptions) until it exits
        stopped = time.perf_counter()
        await trio.sleep(scale.fleet_down_seconds)
        await trio.to_thread.run_sync(server.start)
        back, back_wall = time.perf_counter(), time.time()
        await trio.sleep(scale.fleet_after_seconds)
        done.set()
    handled = await _all_handled(members, appended, 120 if scale.fleet_seconds > 5 else 30)
    after = await _snapshot(members, server)
    metrics = after.metrics - before.metrics
    new = {i: at for i, at in appended.items() if at > back}
    waits = [handled[i][0][0] - at for i, at in new.items() if i in handled]
    lost = sorted(i for i in appended if i not in handled)
    again = [min((t for t in _log_times(member.log)[1] if t > back_wall), default=None) for member in members]
    return {
        "events": len(appended),
        "stopping_s": stopped - stopping,
        "stopping_at": stopping_wall,
        "back_at": back_wall,
        "duplicates": sum(len(handled.get(i, [])) > 1 for i in appended),
        "duplicates_pct": 100 * sum(len(handled.get(i, [])) > 1 for i in appended) / len(appended),
        "lost": len(lost),
        "lost_events": lost,
        "lost_not_on_server": await _not_on_server(producer, {i: where[i] for i in lost}),
        "streaming_again_s": max(t - back_wall for t in again) if None not in again else None,  # type: ignore[operator]
        "first_new_handled_s": min((handled[i][0][0] for i in new if i in handled), default=back) - back,
        "new_events": len(new),
        "new_wait": percentiles(waits) if waits else {},
        "new_wait_max_s": max(waits, default=0.0),
        "gaps_replayed": metrics["gaps_replayed"],
        # For reading the kept logs: the new events that waited longest (appended and handled after
        # the server answered, in seconds; which stream, which runner).
        "slowest_new": [
            {
                "i": i,
                "stream": where.get(i),
                "appended_s": round(at - back, 3),
                "handled_s": round(handled[i][0][0] - back, 3),
                "runner": handled[i][0][1],
            }
            for i, at in sorted(
                new.items(), key=lambda item: item[1] - handled[item[0]][0][0] if item[0] in handled else 0
            )[:10]
            if i in handled
        ],
    }


async def _not_on_server(producer: StreamsClient, lost: dict[int, str]) -> list[int]:
    """Of the events no runner handled, those the server itself no longer has (its append answered,
    then its restart lost them): the runners could not have handled those."""
    found: set[int] = set()
    for stream in set(lost.values()):
        offset = "-1"
        while True:
            result = await producer.read(stream, offset)
            found.update(m["i"] for m in result.messages if isinstance(m, dict) and isinstance(m.get("i"), int))
            if result.up_to_date or not result.messages:
                break
            offset = result.next_offset
    return sorted(set(lost) - found)


# -- the table ---------------------------------------------------------------------------------------


def _f(value: float | None, spec: str = ".2f") -> str:
    return "-" if value is None else format(value, spec)


def _floor(row: dict[str, Any]) -> float | None:
    """Seconds the server alone takes to create this row's M subscriptions, 16 at a time (None in older results)."""
    cost = row["start"].get("server_create_ms")
    return None if cost is None else row["subscriptions"] * cost / 1000


def _floor_note(row: dict[str, Any]) -> str:
    floor = _floor(row)
    return "" if floor is None else f" (the server's M creates alone: {floor:.2f} s)"


def render(results: dict[str, Any]) -> str:
    section = results.get("fleet")
    if not section:
        return ""
    rows = []
    for row in section["rows"]:
        steady, start, restart = row["steady"], row["start"], row["restart"]
        latency = steady["latency"]
        rows.append(
            [
                f"N={row['runners']} M={row['subscriptions']}",
                f"{_f(steady['claims_per_wake'])} ({_f(steady['races_lost_per_wake'])})",
                f"{steady['runner_cpu_s_per_1000']:.2f} ({_f(steady.get('cpu_ratio'))}x)",
                f"{steady['server_cpu_s_per_1000']:.2f}",
                f"{_f(latency.get('p50_ms'), '.1f')} / {_f(latency.get('p99_ms'), '.1f')}",
                f"{_f(steady['spread'], '.1f')}",
                f"{start['requests']} / {start['budget']}",
                f"{start['streaming_s_max']:.2f} ({_f(_floor(row))})",
                f"{restart['duplicates_pct']:.1f} %",
                f"{restart['lost']}" + (f" ({len(gone)} gone)" if (gone := restart["lost_not_on_server"]) else ""),
                f"{_f(restart['streaming_again_s'])}",
                f"{restart['new_wait_max_s']:.2f}",
            ]
        )
    out = table(
        "Fleet: N runner processes x M subscriptions, "
        + (
            "PARTITIONED: each runner its own wake stream and M/N subscriptions, no failover "
            if section.get("partitioned")
            else "one wake stream "
        )
        + f"({section['rate']:g} events/s to random "
        f"subscriptions for {section['seconds']:g} s; server down {section['down_seconds']:g} s under load; "
        f"load average {', '.join(f'{x:.1f}' for x in section['load_average'])})",
        [
            "",
            "claims/wake (lost races)",
            "CPU s/1k ev (vs N=1)",
            "server CPU",
            "p50 / p99 ms",
            "spread",
            "start requests / 2M+10N",
            "streaming s (M creates)",
            "restart dup",
            "lost",
            "streaming again s",
            "new event wait s",
        ],
        rows,
    )
    return "\n".join(out + goals(section)) + "\n"


def goals(section: dict[str, Any]) -> list[str]:
    """Issue 22's goals next to this run's figures."""
    rows = []
    widest = max(row["runners"] for row in section["rows"])
    for row in section["rows"]:
        steady, start, restart = row["steady"], row["start"], row["restart"]
        name = f"N={row['runners']} M={row['subscriptions']}"
        if row["runners"] == widest and widest > 1:
            if steady["claims_per_wake"] is not None:
                rows.append(
                    _goal(f"{name}: claim requests per handled wake", steady["claims_per_wake"], CLAIMS_PER_WAKE, "")
                )
            if steady.get("cpu_ratio") is not None:
                rows.append(_goal(f"{name}: fleet CPU per event vs N=1", steady["cpu_ratio"], CPU_RATIO, "x"))
            if steady.get("p99_ratio") is not None:
                rows.append(_goal(f"{name}: p99 vs N=1", steady["p99_ratio"], P99_RATIO, "x"))
            rows.append(
                _goal(f"{name}: restart, handled twice", restart["duplicates_pct"], RESTART_DUPLICATES_PCT, " %")
            )
            rows.append(
                _goal(
                    f"{name}: restart, new event wait{_floor_note(row)}",
                    restart["new_wait_max_s"],
                    NEW_EVENTS_AFTER_RESTART_S,
                    " s",
                )
            )
        rows.append(_goal(f"{name}: lost (steady + restart)", steady["lost"] + restart["lost"], 0, ""))
        rows.append(_goal(f"{name}: start requests", start["requests"], start["budget"], ""))
        if row["subscriptions"] >= 1000:
            rows.append(
                _goal(
                    f"{name}: start to streaming{_floor_note(row)}",
                    start["streaming_s_max"],
                    STREAMING_AFTER_START_S,
                    " s",
                )
            )
        if row["runners"] > 1 and steady["spread"] is not None:
            rows.append(_goal(f"{name}: busiest / least busy runner", steady["spread"], SPREAD, "x"))
        elif row["runners"] > 1:
            rows.append([f"{name}: busiest / least busy runner", f"<= {SPREAD:g}x", "a runner handled none", "MISSED"])
    return table("Goals (issue 22)", ["", "goal", "this run", ""], rows)


def _goal(what: str, figure: float, goal: float, unit: str) -> list[str]:
    return [
        what,
        f"<= {goal:g}{unit}",
        f"{figure:.2f}{unit}",
        verdict(figure, goal, unit) if goal else ("met" if figure <= goal else "MISSED"),
    ]
