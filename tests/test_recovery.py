"""Recover when the fault ends, and lose nothing the server forgets (real processes, real server).

Each scenario is a fault an operator meets: the runner killed mid-claim and
restarted at once, the server restarted (it forgets its subscriptions), a frozen
runner process, and a storm of 503s. Time bounds here are generous margins far
below what the old behaviour took; the benchmarks print the real figures.
"""

from __future__ import annotations

import json
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio

from faults.proxy import Proxy
from machine import State
from runner import Batch, Runner
from runner._service.devserver import DevServer
from runner._state.journal import Journal
from tests.support import Recorder, World, captured_logs, eventually, running
from tests.test_end_to_end import lines, start_runner_process, write_config

LONG_LEASE_MS = 30_000


def handled(record: Path) -> list[dict[str, object]]:
    return [entry for entry in map(json.loads, lines(record)) if "message" in entry]


def started_by(record: Path, pid: int) -> list[dict[str, object]]:
    return [entry for entry in map(json.loads, lines(record)) if "started" in entry and entry["pid"] == pid]


async def test_a_runner_killed_mid_claim_and_restarted_resumes_at_once_not_after_the_lease(
    world: World, record_file: Path, tmp_path: Path
) -> None:
    await world.create("a")
    config = write_config(tmp_path / "runner.toml", world, tmp_path / "state")
    config.write_text(config.read_text().replace("lease_ttl_ms = 2000", f"lease_ttl_ms = {LONG_LEASE_MS}"))
    log = tmp_path / "runner.log"
    first = start_runner_process(config, log, PULLWAKE_TEST_DELAY="30", PULLWAKE_TEST_ANNOUNCE="1")
    try:
        await eventually(lambda: '"target": "streaming"' in log.read_text(), what="the first runner to stream")
        for n in range(5):
            await world.append("a", {"n": n})
        await eventually(lambda: bool(started_by(record_file, first.pid)), what="the first runner's batch to start")
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=30)
    assert not handled(record_file), "the killed runner finished nothing"
    restarted = trio.current_time()
    second = start_runner_process(config, log)
    try:
        await eventually(
            lambda: {entry["message"]["n"] for entry in handled(record_file)} == set(range(5)),  # type: ignore[index]
            timeout=25,
            what="the rest of the work after the restart",
        )
        resumed_after = trio.current_time() - restarted
    finally:
        second.send_signal(signal.SIGTERM)
        second.wait(15)
    assert resumed_after < LONG_LEASE_MS / 1000 / 2, f"resumed {resumed_after:.1f} s after the restart"
    assert '"claim.returned"' in log.read_text(), "the restarted runner handed its old claim back"
    print(f"kill -9 mid-claim, lease {LONG_LEASE_MS / 1000:g} s: all handled {resumed_after:.2f} s after the restart")


async def test_a_runner_killed_as_its_first_batch_starts_has_the_claim_on_disk_and_hands_it_back_at_once(
    world: World, record_file: Path, tmp_path: Path
) -> None:
    """The claim's journal record is fsynced before its first batch reaches the handler (docs/design.md §6.4)."""
    await world.create("a")
    state_dir = tmp_path / "state"
    config = write_config(tmp_path / "runner.toml", world, state_dir)
    config.write_text(config.read_text().replace("lease_ttl_ms = 2000", f"lease_ttl_ms = {LONG_LEASE_MS}"))
    log = tmp_path / "runner.log"
    first = start_runner_process(config, log, PULLWAKE_TEST_KILL_AT_START="1")
    try:
        await eventually(lambda: '"target": "streaming"' in log.read_text(), what="the first runner to stream")
        for n in range(3):
            await world.append("a", {"n": n})
        with trio.fail_after(30):
            await trio.to_thread.run_sync(first.wait)  # its handler kills it: no timing on our side
    finally:
        if first.poll() is None:
            first.send_signal(signal.SIGKILL)
            first.wait(timeout=30)
    assert first.returncode == -signal.SIGKILL
    assert not handled(record_file)
    on_disk = Journal(state_dir / "journal.json", server_url=world.url)
    assert [held.subscription for held in on_disk.held_claims()] == [world.sub], "journaled before the batch"

    restarted = trio.current_time()
    second = start_runner_process(config, log)
    try:
        await eventually(
            lambda: {entry["message"]["n"] for entry in handled(record_file)} == set(range(3)),  # type: ignore[index]
            timeout=LONG_LEASE_MS / 1000 / 2,
            what="the work, handed back and claimed again at once",
        )
        resumed_after = trio.current_time() - restarted
    finally:
        second.send_signal(signal.SIGTERM)
        second.wait(15)
    assert '"claim.returned"' in log.read_text(), "the restarted runner handed the killed one's claim back"
    print(f"kill -9 as the first batch starts, lease {LONG_LEASE_MS / 1000:g} s: all handled in {resumed_after:.2f} s")


@pytest.fixture
async def own_proxy(own_server: DevServer, nursery: trio.Nursery) -> AsyncIterator[Proxy]:
    proxy = Proxy(own_server.port)
    await nursery.start(proxy.run)
    yield proxy
    proxy.thaw()


async def test_events_a_restarted_server_skipped_are_replayed_in_order(own_world: World, own_proxy: Proxy) -> None:
    """The server comes back without the subscription, and events arrive before the runner can
    re-create it: the re-created subscription starts past them, so only the runner's journal
    can hand them over. Nothing older of the subscription arrives after anything newer."""
    world = own_world
    await world.create("a", "b")
    recorder = Recorder()
    runner = Runner(world.settings(server_url=own_proxy.url), handlers={world.sub: recorder})
    with captured_logs() as logs:
        async with running(runner):
            for n in range(6):
                await world.append("ab"[n % 2], {"n": n})
            await eventually(lambda: recorder.count == 6, what="the events before the restart")
            # Acknowledged, not just handled: what was handled but not acked is delivered again.
            await eventually(lambda: not runner.health().in_flight, what="the last claim's done ack")
            own_proxy.freeze()  # the runner cannot reach the server until the test says so
            await trio.to_thread.run_sync(world.server.restart)
            for n in range(6, 26):
                await world.append("ab"[n % 2], {"n": n})
            own_proxy.thaw()
            await eventually(lambda: recorder.count >= 26, timeout=20, what="the skipped events")
            await world.append("a", {"n": 26})
            await eventually(lambda: {26} <= {m["n"] for m in recorder.messages()}, what="a new event")
    replays = [entry for entry in logs if entry["event"] == "subscription.gap_replay"]
    for name in ("a", "b"):
        numbers = [message["n"] for message in recorder.messages(world.stream(name))]
        assert numbers == sorted(numbers), f"stream {name} out of order: {numbers}; replays: {replays}"
        assert set(numbers) >= set(range(6 if name == "a" else 7, 26, 2))
    assert {entry["stream"] for entry in replays} == {world.stream("a"), world.stream("b")}
    assert any(batch.replayed and batch.wake_id == "replay" for batch in recorder.batches)
    assert 'pullwake_subscription_gaps_total{action="replayed"} 2.0' in runner.metrics_exposition()[0].decode()


async def test_a_frozen_runner_never_starts_a_batch_on_a_lease_it_lost(
    world: World, record_file: Path, tmp_path: Path
) -> None:
    """The claim is answered just before the process freezes (SIGSTOP) past its lease; another
    runner takes over. After SIGCONT the frozen runner must prove its lease before handing the
    batch to its handler, and finds it gone."""
    await world.create("a")
    config = write_config(tmp_path / "runner.toml", world, tmp_path / "state")
    log = tmp_path / "runner.log"
    frozen = start_runner_process(config, log, PULLWAKE_TEST_ANNOUNCE="1")
    successor = Recorder("successor")
    try:
        await eventually(lambda: '"target": "streaming"' in log.read_text(), what="the runner to stream")
        # Its catch-up read is held at the server, so the freeze lands between claim and batch.
        await world.inject(world.stream_path(world.stream("a")), method="GET", delayMs=1_500, count=1)
        await world.append("a", {"n": 1})
        await eventually(lambda: '"claim.started"' in log.read_text(), what="the claim to be granted")
        frozen.send_signal(signal.SIGSTOP)
        runner = Runner(
            world.settings(subscriptions=(world.spec(lease_ttl_ms=2_000),)), handlers={world.sub: successor}
        )
        async with running(runner):
            await eventually(lambda: successor.count == 1, timeout=15, what="the other runner to take over")
            frozen.send_signal(signal.SIGCONT)
            await eventually(lambda: '"claim.lease_lost"' in log.read_text(), what="the frozen runner to notice")
    finally:
        frozen.send_signal(signal.SIGCONT)
        frozen.send_signal(signal.SIGTERM)
        frozen.wait(15)
    assert successor.messages() == [{"n": 1}]
    assert started_by(record_file, frozen.pid) == [], "the frozen runner handed the batch to its handler"


async def test_the_end_of_a_503_storm_ends_the_reconnect_wait(world: World, nursery: trio.Nursery) -> None:
    """Every request through the proxy answers 503 for a while; the backoff grows to 8 s. When the
    storm ends, the next liveness probe that gets through ends the wait: no sleeping it out."""
    await world.create("a")
    proxy = Proxy(world.server.port)
    await nursery.start(proxy.run)
    recorder = Recorder()
    settings = world.settings(server_url=proxy.url, backoff_initial=4.0, backoff_max=30.0, backoff_jitter=0.0)
    runner = Runner(settings, handlers={world.sub: recorder})
    async with running(runner):
        await world.append("a", {"n": 0})
        await eventually(lambda: recorder.count == 1)
        proxy.refuse()
        await eventually(lambda: runner.health().reconnect_count >= 2, timeout=15, what="a second failed attempt")
        for n in range(1, 11):
            await world.append("a", {"n": n})  # straight to the server: the work piles up behind the storm
        assert runner.state is State.RECONNECTING
        proxy.thaw()
        ended = trio.current_time()
        await eventually(lambda: recorder.count == 11, timeout=20, what="everything after the storm")
        recovered = trio.current_time() - ended
    assert proxy.refused >= 2
    # The backoff in force when the storm ended was 8 s: anything near it means it was slept out.
    assert recovered < 3.0, f"all handled {recovered:.2f} s after the storm ended"
    print(f"503 storm: all handled {recovered:.2f} s after it ended (backoff then 8 s)")


async def test_a_token_accepted_again_ends_the_reconnect_wait(world: World, nursery: trio.Nursery) -> None:
    """Every request answers 401 for a while, then the token is accepted again: the next liveness
    probe ends the wait, as after a 503 storm (a 401 used to count as an answer: the backoff ran out)."""
    await world.create("a")
    proxy = Proxy(world.server.port)
    await nursery.start(proxy.run)
    recorder = Recorder()
    settings = world.settings(server_url=proxy.url, backoff_initial=4.0, backoff_max=30.0, backoff_jitter=0.0)
    runner = Runner(settings, handlers={world.sub: recorder})
    async with running(runner):
        await world.append("a", {"n": 0})
        await eventually(lambda: recorder.count == 1)
        proxy.refuse(401)
        await eventually(lambda: runner.health().reconnect_count >= 2, timeout=15, what="a second failed attempt")
        for n in range(1, 11):
            await world.append("a", {"n": n})
        assert runner.state is State.RECONNECTING
        proxy.thaw()
        ended = trio.current_time()
        await eventually(lambda: recorder.count == 11, timeout=20, what="everything after the 401s")
        recovered = trio.current_time() - ended
    assert proxy.refused >= 2
    assert recovered < 3.0, f"all handled {recovered:.2f} s after the token was accepted again"
    print(f"401 storm: all handled {recovered:.2f} s after it ended (backoff then 8 s)")


async def test_a_replay_in_progress_holds_up_no_other_subscription_and_its_own_new_events_follow_it(
    own_world: World, own_proxy: Proxy
) -> None:
    """Issue 22: after a server restart, new events are not queued behind replays. Subscription A's
    gap replay is held in its handler; B's new events are handled meanwhile, and A's new events
    come right after A's gap, in order. (B has no gap of its own: with one slot, replays are one at
    a time too, and which subscription's gap goes first is the server's order of answers.)"""
    world = own_world
    await world.create("a", "b")
    held, release = trio.Event(), trio.Event()

    async def hold_replays(batch: Batch) -> None:
        if batch.replayed:
            held.set()
            await release.wait()
        await a_handled(batch)

    a_handled, b_handled = Recorder(), Recorder()
    a, b = f"{world.sub}-a", f"{world.sub}-b"
    settings = world.settings(
        server_url=own_proxy.url,
        max_concurrent_claims=1,  # a replay takes no claim slot: one is enough for B
        subscriptions=(world.spec(a, pattern=world.stream("a")), world.spec(b, pattern=world.stream("b"))),
    )
    runner = Runner(settings, handlers={a: hold_replays, b: b_handled})
    async with running(runner):
        await world.append("a", {"n": 0})
        await world.append("b", {"n": 0})
        await eventually(lambda: a_handled.count == b_handled.count == 1, what="the events before the restart")
        await eventually(lambda: not runner.health().in_flight, what="their done acks")
        own_proxy.freeze()
        await trio.to_thread.run_sync(world.server.restart)
        for n in (1, 2):  # skipped by the re-created subscription: A's gap
            await world.append("a", {"n": n})
        own_proxy.thaw()
        with trio.fail_after(20):
            await held.wait()
        await world.append("b", {"n": 3})
        await world.append("a", {"n": 3})
        await eventually(lambda: b_handled.count == 2, timeout=10, what="B's new event while A's replay is held")
        assert a_handled.count == 1, "A's replay was still held all along"
        release.set()
        await eventually(lambda: a_handled.count == 4, timeout=10, what="A's gap, then its new event")
    assert [m["n"] for m in a_handled.messages()] == [0, 1, 2, 3], "A's new event came after its gap"
    assert [m["n"] for m in b_handled.messages()] == [0, 3]
