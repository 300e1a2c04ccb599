"""Hostile and broken input stays bounded: no spin, no flood, no unbounded memory, no crash.

Each test runs a real runner against a real HTTP server of the tests' own on loopback
(faults/hostile.py) that answers like a Durable Streams server except for the one thing
the test breaks, and asserts the bound a user would notice: request rate, handler
calls, memory, the runner still running.
"""

from __future__ import annotations

import json
from typing import Any

import psutil
import pytest
import trio

from faults.hostile import (
    OFFSETS,
    STREAM,
    SUBSCRIPTION,
    WAKE,
    HostileServer,
    Request,
    claim_answer,
    head,
    reply,
    sse,
    wake_event,
)
from machine import State
from runner import Batch, Runner, Settings, SubscriptionSpec
from tests.support import Recorder, World, captured_logs, eventually, running

WINDOW = 3.0  # seconds each misbehaviour is given to show a spin


def settings(server: HostileServer, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "server_url": server.url,
        "runner_id": "hostile-test",
        "wake_stream": "wake/pool",
        "subscriptions": (SubscriptionSpec(id="s", pattern="jobs/*", manage=False),),
        "control_stream_enabled": False,
        "heartbeat_interval": 0.5,
        "heartbeat_timeout": 0.5,
        "keepalive_timeout": 5.0,
        "request_timeout": 2.0,
        "backoff_initial": 1.0,
        "backoff_max": 5.0,
        "handler_retry_initial": 0.05,
        "drain_timeout": 0.5,
        "finalizer_timeout": 1.0,
        "sweep_interval": 3600.0,
    }
    values.update(overrides)
    return Settings(**values)


class Handled:
    def __init__(self, delay: float = 0.0) -> None:
        self.batches: list[Batch] = []
        self.delay = delay

    async def __call__(self, batch: Batch) -> None:
        self.batches.append(batch)
        await trio.sleep(self.delay)


async def run_for(runner: Runner, seconds: float) -> None:
    async with trio.open_nursery() as nursery:
        await runner.start(nursery)
        await trio.sleep(seconds)
        with trio.fail_after(10):
            await runner.stop()


@pytest.fixture
async def server(request: pytest.FixtureRequest, nursery: trio.Nursery) -> HostileServer:
    hostile = HostileServer(answers=getattr(request, "param", {}))
    await nursery.start(hostile.run)
    return hostile


def acks(server: HostileServer) -> list[Request]:
    return [r for r in server.requests if r.method == "POST" and r.path == SUBSCRIPTION + "/ack"]


@pytest.mark.parametrize(
    "server", [{("POST", SUBSCRIPTION + "/claim"): reply(200, claim_answer(lease_ttl_ms=0))}], indirect=True
)
async def test_a_zero_lease_does_not_turn_renewals_into_a_spin(server: HostileServer) -> None:
    handler = Handled(delay=WINDOW)
    await run_for(Runner(settings(server), handlers={"s": handler}), WINDOW + 0.5)
    assert len(handler.batches) == 1
    # Renewals at a third of the protocol's 1 s floor: about 3 a second (it was ~390 a second).
    assert len(acks(server)) <= 4 * WINDOW, f"{len(acks(server))} acks in {WINDOW:g} s"


STUCK = {
    ("GET", STREAM): reply(200, [{"n": 1}], {"stream-next-offset": OFFSETS[0]}),  # the offset it was read from
}


@pytest.mark.parametrize("server", [STUCK], indirect=True)
async def test_a_read_that_does_not_advance_is_handled_once_and_never_acked(server: HostileServer) -> None:
    handler = Handled()
    with captured_logs() as logs:
        await run_for(Runner(settings(server), handlers={"s": handler}), WINDOW)
    assert len(handler.batches) <= 1, f"the same batch went to the handler {len(handler.batches)} times"
    offsets = [ack["offset"] for r in acks(server) for ack in r.json()["acks"]]  # type: ignore[index]
    assert offsets == [], f"acked {offsets}"
    assert any("did not advance" in str(entry.get("error", "")) for entry in logs)


@pytest.mark.parametrize(
    "server",
    [{("GET", WAKE + "?live"): reply(204, headers={"stream-next-offset": OFFSETS[1]})}],
    indirect=True,
)
async def test_a_long_poll_answered_at_once_is_paced(server: HostileServer) -> None:
    await run_for(Runner(settings(server, live_mode="long-poll"), handlers={"s": Handled()}), WINDOW)
    polls = sum(1 for r in server.requests if r.path == WAKE and r.query.get("live") == "long-poll")
    assert polls <= WINDOW + 2, f"{polls} long-polls in {WINDOW:g} s (it was ~500 a second)"


@pytest.mark.parametrize(
    "server",
    [{("GET", WAKE + "?live"): sse(("data", []), ("control", {"streamNextOffset": OFFSETS[1]}), then_idle=0)}],
    indirect=True,
)
async def test_a_stream_that_closes_after_each_message_is_paced(server: HostileServer) -> None:
    await run_for(Runner(settings(server), handlers={"s": Handled()}), WINDOW)
    connects = sum(1 for r in server.requests if r.path == WAKE and r.query.get("live") == "sse")
    assert connects <= WINDOW + 2, f"{connects} connections in {WINDOW:g} s (it was ~40 a second)"


ENDLESS_LINE_SENT = [0]


async def endless_line(request: Request, stream: trio.SocketStream) -> None:
    await stream.send_all(head(200, {"content-type": "text/event-stream"}, length=None) + b"data: ")
    chunk = b"x" * 65536
    while True:
        await stream.send_all(chunk)
        ENDLESS_LINE_SENT[0] += len(chunk)


@pytest.mark.parametrize("server", [{("GET", WAKE + "?live"): endless_line}], indirect=True)
async def test_an_endless_sse_line_does_not_grow_memory(server: HostileServer) -> None:
    process = psutil.Process()
    before = process.memory_info().rss
    runner = Runner(settings(server, max_event_bytes=64 * 1024), handlers={"s": Handled()})
    peak = before
    async with trio.open_nursery() as nursery:
        await runner.start(nursery)
        with trio.move_on_after(WINDOW):
            while True:
                peak = max(peak, process.memory_info().rss)
                await trio.sleep(0.05)
        await runner.stop()
    sent_mb = ENDLESS_LINE_SENT[0] / 2**20
    grew_mb = (peak - before) / 2**20
    assert sent_mb > 100, f"the server only sent {sent_mb:.0f} MB"
    assert grew_mb < 40, f"RSS grew {grew_mb:.0f} MB while the server sent {sent_mb:.0f} MB of one line"
    print(f"endless SSE line: {sent_mb:.0f} MB sent, RSS grew {grew_mb:.1f} MB")


BAD_FIELDS = {
    ("GET", WAKE + "?live"): sse(
        ("data", [wake_event(ts=10**400), wake_event(generation=True), "junk", {"type": "from-the-future"}]),
        ("control", {"streamNextOffset": OFFSETS[1], "streamClosed": "false"}),
    ),
}


@pytest.mark.parametrize("server", [BAD_FIELDS], indirect=True)
async def test_no_field_value_stops_the_runner(server: HostileServer) -> None:
    handler = Handled()
    runner = Runner(settings(server), handlers={"s": handler})
    with captured_logs() as logs:
        async with trio.open_nursery() as nursery:
            await runner.start(nursery)
            await eventually(lambda: len(handler.batches) >= 1, what="the wake with a huge ts to be worked")
            await trio.sleep(1.0)
            assert runner.state is not State.STOPPED, "a string 'false' is not the end of the stream"
            await runner.stop()
    ignored = [entry for entry in logs if entry["event"] == "wake.ignored"]
    assert 1 <= len(ignored) <= 3, "ignored items are summarised, not logged one by one"
    exposition = runner.metrics_exposition()[0].decode()
    assert 'pullwake_wake_items_ignored_total{reason="not an object"}' in exposition


WRONG_TYPES = {
    ("POST", SUBSCRIPTION + "/claim"): reply(200, claim_answer(token={"a": "dict"})),
}


@pytest.mark.parametrize("server", [WRONG_TYPES], indirect=True)
async def test_a_claim_answer_with_wrong_types_is_refused_not_coerced(server: HostileServer) -> None:
    handler = Handled()
    await run_for(Runner(settings(server), handlers={"s": handler}), 2.0)
    assert handler.batches == []
    assert not any(r.headers.get("authorization", "").startswith("Bearer {") for r in server.requests)
    assert server.count("POST", SUBSCRIPTION + "/claim") >= 1


ESCAPING = {
    ("POST", SUBSCRIPTION + "/claim"): reply(
        200,
        claim_answer(
            streams=[
                {"path": "../../admin", "acked_offset": OFFSETS[0], "tail_offset": OFFSETS[1], "has_pending": True}
            ]
        ),
    ),
}


@pytest.mark.parametrize("server", [ESCAPING], indirect=True)
async def test_a_stream_path_outside_the_root_is_never_requested(server: HostileServer) -> None:
    await run_for(Runner(settings(server), handlers={"s": Handled()}), 2.0)
    assert not any("admin" in r.path for r in server.requests)
    assert all(r.path.startswith("/v1/stream/") for r in server.requests)


async def huge_claim(request: Request, stream: trio.SocketStream) -> None:
    body = json.dumps(claim_answer(padding="x" * (40 * 2**20))).encode()
    await stream.send_all(head(200, {"content-type": "application/json"}, length=len(body)))
    for start in range(0, len(body), 2**20):
        await stream.send_all(body[start : start + 2**20])


async def dripping_claim(request: Request, stream: trio.SocketStream) -> None:
    body = json.dumps(claim_answer()).encode()
    await stream.send_all(head(200, {"content-type": "application/json"}, length=len(body)))
    for byte in body:
        await stream.send_all(bytes([byte]))
        await trio.sleep(1)


@pytest.mark.parametrize("server", [{("POST", SUBSCRIPTION + "/claim"): huge_claim}], indirect=True)
async def test_a_huge_answer_is_refused_at_its_cap(server: HostileServer) -> None:
    process = psutil.Process()
    before = process.memory_info().rss
    runner = Runner(settings(server, max_response_bytes=1024 * 1024), handlers={"s": Handled()})
    with captured_logs() as logs:
        await run_for(runner, 2.0)
    grew_mb = (process.memory_info().rss - before) / 2**20
    assert grew_mb < 30, f"RSS grew {grew_mb:.0f} MB for a 40 MB answer capped at 1 MB"
    assert any("1048576" in str(entry.get("error", "")) for entry in logs), "the error names the cap"


@pytest.mark.parametrize("server", [{("POST", SUBSCRIPTION + "/claim"): dripping_claim}], indirect=True)
async def test_a_drip_fed_answer_ends_at_the_request_deadline(server: HostileServer) -> None:
    runner = Runner(settings(server, request_deadline=1.5), handlers={"s": Handled()})
    with captured_logs() as logs:
        await run_for(runner, 3.0)
    failures = [entry for entry in logs if entry["event"] in ("request.retry", "claim.failed")]
    assert failures, "the dripping claim answer was cut off"
    claims = [r.at for r in server.requests if r.path == SUBSCRIPTION + "/claim"]
    assert len(claims) >= 2, "the first claim request ended at its deadline and was retried"


@pytest.mark.parametrize(
    ("max_event_bytes", "counted_as"),
    [
        (1024 * 1024, 'reason="unusable event"} 1.0'),  # about 3.4 MB in one data event: dropped unread
        (8 * 1024 * 1024, 'reason="not an object"} 500000.0'),  # read, and every item counted
    ],
)
async def test_one_huge_append_of_junk_to_the_wake_stream_neither_floods_the_log_nor_freezes_the_runner(
    world: World, max_event_bytes: int, counted_as: str
) -> None:
    """A single append of 500,000 numbers (1 MB) to the wake stream, through the reference server:
    it was 500,000 warnings and a loop frozen for 24 s. Now: counted, summarised, and the runner
    keeps answering while it reads past them."""
    recorder = Recorder()
    runner = Runner(world.settings(max_event_bytes=max_event_bytes), handlers={world.sub: recorder})
    longest_gap = 0.0

    async def watch_the_loop() -> None:
        nonlocal longest_gap
        while True:
            before = trio.current_time()
            await trio.sleep(0.01)
            longest_gap = max(longest_gap, trio.current_time() - before - 0.01)

    with captured_logs() as logs:
        async with running(runner), trio.open_nursery() as nursery:
            nursery.start_soon(watch_the_loop)
            tail = await world.client.append(world.wake, list(range(500_000)))

            async def past_the_junk() -> bool:
                return runner.health().offset == tail

            await eventually(past_the_junk, timeout=30, what="the wake offset to move past the junk")
            await world.create("a")
            await world.append("a", {"n": 1})
            await eventually(lambda: recorder.count == 1, what="work after the junk")
            nursery.cancel_scope.cancel()
    ignored = [entry for entry in logs if entry["event"] == "wake.ignored"]
    assert len(ignored) <= 2, f"{len(ignored)} log lines for one bad append"
    exposition = runner.metrics_exposition()[0].decode()
    counted = [line for line in exposition.splitlines() if line.startswith("pullwake_wake_items_ignored_total{")]
    assert counted == ["pullwake_wake_items_ignored_total{" + counted_as], counted
    assert longest_gap < 2.0, f"the runner's loop was held {longest_gap:.2f} s"
    print(f"500,000 junk items: loop held at most {longest_gap * 1000:.0f} ms")
