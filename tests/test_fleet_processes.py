"""A fleet of `pullwake run` processes on one wake stream (issue 22), against the real server.

Four runner processes serve the same subscriptions: every event is counted (none lost, none
handled twice in steady state, one claim request per wake); the preferred runner of a
subscription is killed (SIGKILL) while it holds a claim, and another takes over once the lease
runs out; a runner joins and another leaves (SIGTERM) while events flow; a runner that joined
a running fleet puts its share back with the gaps after a server restart (SIGKILL, runners
frozen with SIGSTOP across it). The benchmark
(`python -m bench --only fleet`) prints the figures; these tests pin the behaviour.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
from collections import Counter
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import httpx
import trio

from faults.proxy import Proxy
from runner._fleet.ring import ranked
from tests.support import World, eventually
from tests.test_end_to_end import start_runner_process

LEASE_MS = 2_000
SUBSCRIPTIONS = 8


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@dataclass
class Member:
    """One `pullwake run` process of the fleet, and what it wrote."""

    runner_id: str
    config: Path
    record: Path
    log: Path
    port: int
    process: subprocess.Popen[bytes] | None = None

    def handled(self) -> list[int]:
        """The "n" of every message its handler finished."""
        text = self.record.read_text() if self.record.exists() else ""
        return [entry["message"]["n"] for entry in map(json.loads, text.splitlines()) if "message" in entry]

    def members(self) -> int:
        """How many runners it counts in its fleet, itself included (from its last `fleet.changed`)."""
        changes = [json.loads(line) for line in self.log.read_text().splitlines() if '"fleet.changed"' in line]
        return int(changes[-1]["members"]) if changes else 1

    def streaming(self) -> bool:
        return '"target": "streaming"' in self.log.read_text()

    async def claims(self) -> Counter[str]:
        """Its claims by how they ended, its lost races and claims in flight, from its metrics listener."""
        async with httpx.AsyncClient(timeout=5) as http:
            text = (await http.get(f"http://127.0.0.1:{self.port}/metrics")).text
        counts: Counter[str] = Counter()
        for line in text.splitlines():
            if line.startswith("pullwake_claims_total{"):
                counts[line.split('"')[1]] += int(float(line.rsplit(" ", 1)[1]))
            elif line.startswith("pullwake_claim_races_lost_total "):
                counts["races_lost"] += int(float(line.rsplit(" ", 1)[1]))
            elif line.startswith("pullwake_claims_in_flight "):
                counts["in_flight"] += int(float(line.rsplit(" ", 1)[1]))
        return counts


class Fleet:
    """Runner processes serving SUBSCRIPTIONS subscriptions, each with one stream, on one wake stream."""

    def __init__(self, world: World, tmp: Path, stack: ExitStack) -> None:
        self.world = world
        self.tmp = tmp
        self.stack = stack
        self.members: list[Member] = []
        self.subscriptions = [f"{world.sub}-{j}" for j in range(SUBSCRIPTIONS)]
        self.fleet_interval = 0.5

    def stream(self, j: int) -> str:
        return f"jobs-{self.world.uid}-{j}/a"

    def add(self, name: str, server_url: str | None = None, **env: str) -> Member:
        world, port = self.world, free_port()
        body = [
            f'server_url = "{server_url or world.url}"',
            f'runner_id = "fleet-{name}-{world.uid}"',
            f'wake_stream = "{world.wake}"',
            f'state_dir = "{self.tmp / name}"',
            f'metrics_listen = "127.0.0.1:{port}"',
            "control_stream_enabled = false",
            "heartbeat_interval = 0.5",
            "heartbeat_timeout = 0.5",
            "backoff_initial = 0.1",
            "backoff_max = 1.0",
            "checkpoint_interval = 0.1",
            f"fleet_interval = {self.fleet_interval}",
            "fleet_fallback = 1.0",
        ]
        for j, subscription in enumerate(self.subscriptions):
            body += [
                "[[subscriptions]]",
                f'id = "{subscription}"',
                f'pattern = "jobs-{world.uid}-{j}/*"',
                f"lease_ttl_ms = {LEASE_MS}",
                'handler = "tests.file_handlers:record"',
            ]
        config = self.tmp / f"{name}.toml"
        config.write_text("\n".join(body) + "\n")
        member = Member(f"fleet-{name}-{world.uid}", config, self.tmp / f"{name}.jsonl", self.tmp / f"{name}.log", port)
        member.log.touch()
        member.process = self.stack.enter_context(_running(member, env))
        self.members.append(member)
        return member

    def live(self) -> list[Member]:
        return [member for member in self.members if member.process is not None and member.process.poll() is None]

    async def settled(self) -> None:
        """Every live runner follows the wake stream and counts all the live ones in its fleet."""
        live = self.live()
        await eventually(lambda: all(m.streaming() for m in live), timeout=30, what="every runner to stream")
        await eventually(lambda: all(m.members() == len(live) for m in live), timeout=15, what="one fleet")

    def handled(self) -> list[int]:
        return [n for member in self.members for n in member.handled()]

    def has_handled(self, n: int) -> bool:
        return n in self.handled()

    def first_for_some(self, candidates: str, others: str) -> str:
        """The first of `candidates` that would be preferred for a subscription beside `others`: the
        test's runner ids are random, and a joining runner first for nothing would take no share."""
        for name in candidates:
            ids = [f"fleet-{each}-{self.world.uid}" for each in (*others, name)]
            if any(ranked(sub, ids)[0] == ids[-1] for sub in self.subscriptions):
                return name
        raise AssertionError("no candidate would take a share")

    async def claims(self) -> Counter[str]:
        total: Counter[str] = Counter()
        for member in self.live():
            total += await member.claims()
        return total


@contextmanager
def _running(member: Member, env: dict[str, str]) -> Iterator[subprocess.Popen[bytes]]:
    process = start_runner_process(member.config, member.log, PULLWAKE_TEST_RECORD=str(member.record), **env)
    try:
        yield process
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=30)


@contextmanager
def fleet_of(world: World, tmp: Path) -> Iterator[Fleet]:
    with ExitStack() as stack:
        yield Fleet(world, tmp, stack)


async def _idle(fleet: Fleet) -> bool:
    return (await fleet.claims())["in_flight"] == 0


async def test_four_runners_make_one_claim_per_wake_and_handle_every_event_once(world: World, tmp_path: Path) -> None:
    with fleet_of(world, tmp_path) as fleet:
        for j in range(SUBSCRIPTIONS):
            await world.client.create_stream(fleet.stream(j))
        for name in "abcd":
            fleet.add(name)
        await fleet.settled()
        # The sweeps of the start and of every join are over: from here on, claims answer wakes.
        await eventually(lambda: _idle(fleet), what="the sweeps to end")
        before = await fleet.claims()
        for n in range(24):
            await world.client.append(fleet.stream(n % SUBSCRIPTIONS), {"n": n})
            # One event at a time: every wake is its own, so claims can be counted against wakes.
            await eventually(partial(fleet.has_handled, n), timeout=10, what=f"event {n}")
        claims = await fleet.claims() - before
        del claims["in_flight"]
    assert sorted(fleet.handled()) == list(range(24)), "every event handled, none twice"
    assert claims["completed"] == 24, claims
    assert sum(claims.values()) == 24, f"one claim request per wake, no race lost: {claims}"
    busy = [member for member in fleet.members if member.handled()]
    assert len(busy) >= 2, "the work is shared"


async def test_the_preferred_runner_killed_mid_claim_is_taken_over_after_the_lease(
    world: World, tmp_path: Path
) -> None:
    with fleet_of(world, tmp_path) as fleet:
        for j in range(SUBSCRIPTIONS):
            await world.client.create_stream(fleet.stream(j))
        ids = [f"fleet-{name}-{world.uid}" for name in "abcd"]
        preferred = ranked(fleet.subscriptions[0], ids)[0]
        for name in "abcd":
            # The preferred runner of subscription 0 SIGKILLs itself as its first batch starts: mid-claim.
            kill = {"PULLWAKE_TEST_KILL_AT_START": "1"} if f"fleet-{name}-{world.uid}" == preferred else {}
            fleet.add(name, **kill)
        await fleet.settled()
        victim = next(member for member in fleet.members if member.runner_id == preferred)
        assert victim.process is not None
        await world.client.append(fleet.stream(0), {"n": 0})
        assert await trio.to_thread.run_sync(victim.process.wait, 15) == -signal.SIGKILL
        for n in range(1, 16):  # the killed runner's share of them goes to the others too
            await world.client.append(fleet.stream(n % SUBSCRIPTIONS), {"n": n})
        await eventually(
            lambda: sorted(fleet.handled()) == list(range(16)), timeout=LEASE_MS / 1000 + 15, what="every event"
        )
    assert victim.handled() == [], "killed before it finished anything"
    started = [line for line in victim.log.read_text().splitlines() if '"claim.started"' in line]
    assert fleet.subscriptions[0] in "".join(started), "the victim held the claim when it died"


async def test_a_runner_joining_and_one_leaving_while_events_flow_lose_nothing(world: World, tmp_path: Path) -> None:
    with fleet_of(world, tmp_path) as fleet:
        for j in range(SUBSCRIPTIONS):
            await world.client.create_stream(fleet.stream(j))
        for name in "abc":
            fleet.add(name)
        await fleet.settled()
        appended: list[int] = []

        async def produce() -> None:
            n = 0
            while True:
                await world.client.append(fleet.stream(n % SUBSCRIPTIONS), {"n": n})
                appended.append(n)
                n += 1
                await trio.sleep(0.02)  # a steady flow, not synchronisation

        async with trio.open_nursery() as nursery:
            nursery.start_soon(produce)
            await eventually(lambda: len(fleet.handled()) >= 10, what="events flowing")
            joining = fleet.add(fleet.first_for_some("defghij", others="bc"))
            await fleet.settled()
            count = len(appended)
            await eventually(lambda: len(appended) >= count + 20, what="more events with four runners")
            leaving = fleet.members[0]
            assert leaving.process is not None
            leaving.process.send_signal(signal.SIGTERM)
            await trio.to_thread.run_sync(lambda: leaving.process.wait(timeout=20))  # type: ignore[union-attr]
            await fleet.settled()
            count = len(appended)
            await eventually(lambda: len(appended) >= count + 20, what="more events after one left")
            nursery.cancel_scope.cancel()
        await eventually(lambda: set(fleet.handled()) >= set(appended), timeout=20, what="every event handled")
    assert leaving.process.returncode == 0, "it drained and left cleanly"
    assert joining.handled(), "the runner that joined took a share"
    twice = [n for n, times in Counter(fleet.handled()).items() if times > 1]
    assert twice == [], f"handled twice: {twice}"


async def test_a_runner_starting_beside_one_that_covered_everything_creates_and_sweeps_nothing(
    world: World, tmp_path: Path
) -> None:
    """Issue 22, fleet start: a runner that joins hears, in the answer to its hello, what the first
    claimed since it follows the wake stream; it neither confirms nor sweeps those again. Before,
    it heard no peer before confirming (all M PUTs) and swept its share. Nothing is lost: an
    event on every subscription is handled afterwards, once."""
    requests: Counter[str] = Counter()

    def count(method: str, target: str) -> None:
        path = target.split("?", 1)[0]
        if "/__ds/subscriptions/" in path:
            requests["claim" if path.endswith("/claim") else f"subscription {method}"] += 1

    proxy = Proxy(world.server.port, count)
    async with trio.open_nursery() as nursery:
        await nursery.start(proxy.run)
        with fleet_of(world, tmp_path) as fleet:
            for j in range(SUBSCRIPTIONS):
                await world.client.create_stream(fleet.stream(j))
            fleet.add("a")
            await fleet.settled()
            await eventually(partial(_idle, fleet), what="the first runner's sweep to end")
            fleet.add(fleet.first_for_some("bcdefghij", others="a"), server_url=proxy.url)
            await fleet.settled()
            await trio.sleep(1.0)  # what it would have sent at its start (a count, not synchronisation)
            assert requests == Counter(), f"the second runner's start sent {dict(requests)}"
            for j in range(SUBSCRIPTIONS):
                await world.client.append(fleet.stream(j), {"n": j})
            await eventually(
                lambda: sorted(fleet.handled()) == list(range(SUBSCRIPTIONS)), timeout=20, what="every event"
            )
        nursery.cancel_scope.cancel()


async def test_a_runner_that_joined_a_running_fleet_puts_its_share_back_with_the_gaps_after_a_server_restart(
    own_world: World, tmp_path: Path
) -> None:
    """Issue 22: a runner that joins a running fleet neither creates nor sweeps what the members
    covered, and learnt where a quiet subscription was linked from nobody (the members' answers carry
    what they linked since their last beat). After a server restart it put its share back without
    a gap, and the events appended before the put-back were never delivered. The runners are frozen
    (SIGSTOP) across the restart, so that the events land before any put-back."""
    world = own_world
    with fleet_of(world, tmp_path) as fleet:
        fleet.fleet_interval = 2.0  # nobody counts the frozen others gone (three intervals)
        for j in range(SUBSCRIPTIONS):
            await world.client.create_stream(fleet.stream(j))
        fleet.add("a")
        await fleet.settled()
        await eventually(partial(_idle, fleet), what="the first runner's sweep to end")
        fleet.add("b")  # hears, in the answer to its hello, where everything was linked
        await fleet.settled()
        await eventually(partial(_idle, fleet), what="the second runner's start to end")
        name = fleet.first_for_some("cdefghij", others="ab")
        joining = fleet.add(name)
        await fleet.settled()
        ids = [member.runner_id for member in fleet.members]
        share = [sub for sub in fleet.subscriptions if ranked(sub, ids)[0] == joining.runner_id]

        def journal() -> str:
            return "".join(path.read_text() for path in (tmp_path / name).glob("journal*"))

        await eventually(
            lambda: all(f'"{sub}"' in journal() for sub in share),
            timeout=10,
            what="the joining runner to learn where its share was linked",
        )
        for member in fleet.members:
            assert member.process is not None
            member.process.send_signal(signal.SIGSTOP)
        try:
            await trio.to_thread.run_sync(world.server.kill)
            await trio.to_thread.run_sync(world.server.start)
            for j in range(SUBSCRIPTIONS):
                await world.client.append(fleet.stream(j), {"n": j})
        finally:
            for member in fleet.members:
                assert member.process is not None
                member.process.send_signal(signal.SIGCONT)
        await eventually(
            lambda: sorted(fleet.handled()) == list(range(SUBSCRIPTIONS)), timeout=30, what="every event, once"
        )
