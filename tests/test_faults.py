"""Never alive-but-idle: a fault campaign against the real reference server.

Faults come from the server's own /_test/inject-error endpoint, from a TCP proxy
between the runner and the server that can freeze or cut connections, and from
stopping and restarting the server. In every scenario a producer keeps appending
during the fault; afterwards every event is handled and the health snapshot
tells an operator what happened.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
import trio

from faults.proxy import Proxy
from machine import State
from runner import Runner
from runner._service.devserver import DevServer
from runner.errors import ClientError
from tests.support import Recorder, World, eventually, running


class Producer:
    """Appends numbered events round-robin, retrying through outages, until cancelled."""

    def __init__(self, world: World, streams: list[str], *, every: float = 0.03) -> None:
        self.world = world
        self.streams = streams
        self.every = every
        self.sent: list[int] = []
        self.required_from = 0
        """Events before this index may be lost by the server itself (see the restart scenario)."""
        self.before_retry: Callable[[], Awaitable[None]] | None = None

    async def run(self) -> None:
        n, repair = 0, False
        while True:
            try:
                if repair and self.before_retry is not None:
                    await self.before_retry()
                repair = False
                await self.world.append(self.streams[n % len(self.streams)], {"n": n})
            except ClientError:
                repair = True
                await trio.sleep(0.1)
                continue
            self.sent.append(n)
            n += 1
            await trio.sleep(self.every)


@pytest.fixture
async def proxy(shared_server: DevServer, nursery: trio.Nursery) -> AsyncIterator[Proxy]:
    proxy = Proxy(shared_server.port)
    await nursery.start(proxy.run)
    yield proxy
    proxy.thaw()


def handled_numbers(recorder: Recorder) -> Counter[int]:
    return Counter(message["n"] for message in recorder.messages())


async def produce_through(
    world: World,
    runner: Runner,
    recorder: Recorder,
    fault: Callable[[Producer], Awaitable[None]],
    *,
    exactly_once: bool,
) -> Producer:
    """Run `fault` while a producer appends; stop producing; wait until every event is handled."""
    producer = Producer(world, ["a", "b"])
    async with trio.open_nursery() as nursery:
        nursery.start_soon(producer.run)
        await eventually(lambda: len(producer.sent) >= 5, what="the producer to get going")
        await fault(producer)
        count = len(producer.sent)
        await eventually(lambda: len(producer.sent) >= count + 5, what="appends after the fault")
        nursery.cancel_scope.cancel()
    required = set(producer.sent[producer.required_from :])
    try:
        await eventually(lambda: set(handled_numbers(recorder)) >= required, timeout=30)
    except AssertionError:
        missing = sorted(required - set(handled_numbers(recorder)))
        raise AssertionError(f"events never handled: {missing}; runner: {runner.health()}") from None
    if exactly_once:
        assert max(handled_numbers(recorder).values()) == 1, "nothing was handled twice"
    return producer


async def test_a_hung_connect_is_reset_by_the_heartbeat_and_recovers(world: World, proxy: Proxy) -> None:
    await world.create("a", "b")
    recorder = Recorder()
    settings = world.settings(server_url=proxy.url, connect_timeout=30.0, request_timeout=30.0)
    runner = Runner(settings, handlers={world.sub: recorder})
    timings: dict[str, float] = {}

    async def fault(producer: Producer) -> None:
        # Every request for the wake stream now hangs for a minute at the server...
        await world.inject(world.stream_path(world.wake), delayMs=60_000, count=100_000)
        hung_at = trio.current_time()
        proxy.cut()  # ...and the live stream is gone, so the runner must connect into the hang.
        await eventually(lambda: runner.health().liveness_resets >= 1, what="the heartbeat to reset the connect")
        timings["detected"] = trio.current_time() - hung_at
        assert runner.health().status == "degraded"
        await trio.sleep(1)
        await world.clear_faults()
        cleared_at, count = trio.current_time(), recorder.count
        await eventually(lambda: recorder.count > count, timeout=30, what="the first event after the fault")
        timings["recovered"] = trio.current_time() - cleared_at

    async with running(runner):
        await produce_through(world, runner, recorder, fault, exactly_once=True)
        health = runner.health()
    # threshold (2) x interval (0.5 s) + probe timeout (0.5 s), plus scheduling slack
    assert timings["detected"] < 2.5, timings
    assert health.reconnect_count >= 2
    assert health.liveness_resets >= 1
    assert "liveness" in (health.last_error or "") or "probe" in (health.last_error or "")
    print(f"hung connect: detected after {timings['detected']:.2f} s, recovered {timings['recovered']:.2f} s after")


async def test_a_frozen_live_stream_is_detected_and_recovered(world: World, proxy: Proxy) -> None:
    await world.create("a", "b")
    recorder = Recorder()
    settings = world.settings(server_url=proxy.url, keepalive_timeout=60.0)
    runner = Runner(settings, handlers={world.sub: recorder})
    timings: dict[str, float] = {}

    async def fault(producer: Producer) -> None:
        # The open connections go silent but stay open; new connections work.
        frozen_at = trio.current_time()
        proxy.freeze(existing_only=True)
        await eventually(lambda: runner.health().liveness_resets >= 1, what="the stall to be detected")
        timings["detected"] = trio.current_time() - frozen_at
        count = recorder.count
        await eventually(lambda: recorder.count > count, what="events to flow again")
        timings["recovered"] = trio.current_time() - frozen_at

    async with running(runner):
        await produce_through(world, runner, recorder, fault, exactly_once=True)
        health = runner.health()
    assert health.liveness_resets >= 1
    assert health.reconnect_count >= 1
    assert runner.state is State.STOPPED
    print(
        f"frozen stream: detected after {timings['detected']:.2f} s, flowing again after {timings['recovered']:.2f} s"
    )


async def test_a_server_restart_is_survived_and_subscriptions_are_put_back(own_world: World) -> None:
    world = own_world
    await world.create("a", "b")
    recorder = Recorder()
    runner = Runner(world.settings(state_dir=world.tmp / "state"), handlers={world.sub: recorder})
    spec = world.settings().subscriptions[0]
    timings: dict[str, float] = {}

    async def ensure_subscription() -> None:
        # A producer that depends on the subscription puts it back too: the reference
        # server forgets subscriptions on restart and links existing streams at their tail.
        await world.client.ensure_subscription(
            spec.id, wake_stream=world.wake, pattern=spec.pattern, lease_ttl_ms=spec.lease_ttl_ms
        )

    async def fault(producer: Producer) -> None:
        producer.before_retry = ensure_subscription
        stopped_at = trio.current_time()
        await trio.to_thread.run_sync(world.server.stop)
        await eventually(lambda: runner.state is not State.STREAMING, what="the runner to notice")
        timings["detected"] = trio.current_time() - stopped_at
        await trio.sleep(1)
        await trio.to_thread.run_sync(world.server.start)
        # Events still pending when the server stopped are gone with its in-memory subscriptions;
        # everything appended from now on must be handled.
        producer.required_from = len(producer.sent)
        restarted_at, count = trio.current_time(), recorder.count
        await eventually(lambda: runner.state is State.STREAMING, timeout=20, what="the runner to reconnect")
        await eventually(lambda: recorder.count > count, timeout=20, what="the first event after the restart")
        timings["recovered"] = trio.current_time() - restarted_at

    async with running(runner):
        await produce_through(world, runner, recorder, fault, exactly_once=False)
        health = runner.health()
        assert (await world.get_subscription(world.sub))["pattern"] == spec.pattern
    assert health.reconnect_count >= 1
    assert health.last_error is not None
    print(f"server restart: noticed after {timings['detected']:.2f} s, working {timings['recovered']:.2f} s after")


async def test_bursts_of_5xx_on_claim_and_ack_are_retried(world: World) -> None:
    await world.create("a", "b")
    recorder = Recorder()
    runner = Runner(world.settings(), handlers={world.sub: recorder})

    async def fault(producer: Producer) -> None:
        await world.inject(world.subscription_path("claim"), status=503, count=3)
        await world.inject(world.subscription_path("ack"), status=500, count=4)
        await eventually(lambda: "50" in (runner.health().last_error or ""), what="the errors to be seen")

    async with running(runner):
        await produce_through(world, runner, recorder, fault, exactly_once=True)
        await eventually(lambda: not runner.health().in_flight)
        acked = await world.acked_offsets()
        for name in ("a", "b"):
            assert acked[world.stream(name)] == await world.client.tail(world.stream(name)), "all progress acked"
    health = runner.health()
    assert health.claims["fenced"] == 0
    assert health.claims["error"] == 0, "transient 5xx are retried inside the claim, not surfaced as failures"


async def test_dropped_connections_on_catch_up_reads_are_retried(world: World) -> None:
    await world.create("a", "b")
    recorder = Recorder()
    runner = Runner(world.settings(), handlers={world.sub: recorder})

    async def fault(producer: Producer) -> None:
        for name in ("a", "b"):
            await world.inject(world.stream_path(world.stream(name)), method="GET", dropConnection=True, count=3)
        await eventually(lambda: "TransportError" in (runner.health().last_error or "") or recorder.count > 20)

    async with running(runner):
        await produce_through(world, runner, recorder, fault, exactly_once=True)
    assert runner.health().claims["error"] == 0


async def test_truncated_and_corrupted_bodies_are_clear_errors_and_retried(world: World) -> None:
    await world.create("a", "b")
    recorder = Recorder()
    runner = Runner(world.settings(subscriptions=(world.spec(lease_ttl_ms=1_500),)), handlers={world.sub: recorder})
    seen_errors: list[str] = []

    def error_seen(fragment: str) -> bool:
        error = runner.health().last_error or ""
        if fragment in error:
            seen_errors.append(error)
        return fragment in error

    async def fault(producer: Producer) -> None:
        await world.inject(world.stream_path(world.stream("a")), method="GET", truncateBodyBytes=7, count=2)
        await eventually(lambda: error_seen("ProtocolError"), what="a truncated read to be reported")
        await world.inject(world.stream_path(world.stream("b")), method="GET", corruptBody=True, count=2)
        await world.inject(world.subscription_path("claim"), corruptBody=True, count=1)
        await world.inject(
            world.stream_path(world.wake), method="GET", injectSseEvent={"eventType": "data", "data": "{oops"}
        )
        await eventually(lambda: error_seen("not JSON"), what="a corrupted body to be reported")

    async with running(runner):
        await produce_through(world, runner, recorder, fault, exactly_once=False)
    assert runner.state is State.STOPPED
    assert len(seen_errors) >= 2, "both the truncated and the corrupted body were reported"
    assert all("ProtocolError" in error or "not JSON" in error for error in seen_errors)
