"""How the wake stream is followed, and how subscriptions are kept in place."""

from __future__ import annotations

import trio

from machine import State
from runner import Batch, Runner, WakeStreamClosed
from tests.support import Recorder, World, captured_logs, eventually, running


async def test_long_poll_mode_follows_the_wake_stream(world: World) -> None:
    await world.create("a")
    recorder = Recorder()
    runner = Runner(world.settings(live_mode="long-poll"), handlers={world.sub: recorder})
    async with running(runner):
        for n in range(10):
            await world.append("a", {"n": n})
        await eventually(lambda: recorder.count == 10)
    assert [message["n"] for message in recorder.messages()] == list(range(10))


async def test_httpx_own_transport_stays_selectable_and_does_the_whole_job(world: World) -> None:
    """`http_transport = "httpx"`: SSE wake stream, claims, reads and acks over httpx's own pool."""
    await world.create("a")
    recorder = Recorder()
    runner = Runner(world.settings(http_transport="httpx"), handlers={world.sub: recorder})
    async with running(runner):
        for n in range(5):
            await world.append("a", {"n": n})
        await eventually(lambda: recorder.count == 5)
        tail = await world.client.tail(world.stream("a"))

        async def acked_to_the_tail() -> bool:
            return (await world.acked_offsets()).get(world.stream("a")) == tail

        await eventually(acked_to_the_tail, what="every event acknowledged")
    assert [message["n"] for message in recorder.messages()] == list(range(5))


async def test_a_server_that_refuses_sse_gets_long_polls_instead(world: World) -> None:
    await world.create("a")
    recorder = Recorder()
    runner = Runner(world.settings(), handlers={world.sub: recorder})
    await world.client.create_stream(world.wake)
    await world.inject(world.stream_path(world.wake), method="GET", status=405, count=1)
    with captured_logs() as logs:
        async with running(runner):
            await world.append("a", {"n": 1})
            await eventually(lambda: recorder.count == 1)
    assert any(entry["event"] == "wake.sse_refused" and entry["fallback"] == "long-poll" for entry in logs)
    assert runner.health().reconnect_count == 0, "falling back is not a failure"


async def test_a_closed_wake_stream_stops_the_runner_with_a_clear_error(world: World) -> None:
    recorder = Recorder()
    runner = Runner(world.settings(), handlers={world.sub: recorder})
    raised: list[BaseException] = []
    try:
        async with trio.open_nursery() as nursery:
            await runner.start(nursery)
            await runner.wait_until(State.STREAMING)
            response = await world.http.post(world.stream_path(world.wake), headers={"Stream-Closed": "true"})
            assert response.status_code == 204
            await runner.wait_stopped()
    except* WakeStreamClosed as group:
        raised.extend(group.exceptions)
    assert len(raised) == 1, "run() raises WakeStreamClosed: the runner's job cannot go on"
    assert "closed by its owner" in str(raised[0])
    assert runner.state is State.STOPPED
    assert "closed by its owner" in (runner.health().last_error or "")


async def test_no_more_claims_at_once_than_max_concurrent_claims(world: World) -> None:
    subscriptions = [f"{world.sub}-{i}" for i in range(4)]
    specs = tuple(world.spec(sub, pattern=f"jobs-{world.uid}/{i}/*") for i, sub in enumerate(subscriptions))
    await world.create(*(f"{i}/x" for i in range(4)))
    active, most = 0, 0

    async def handler(batch: Batch) -> None:
        nonlocal active, most
        active += 1
        most = max(most, active)
        await trio.sleep(0.2)
        active -= 1

    runner = Runner(
        world.settings(subscriptions=specs, max_concurrent_claims=2), handlers=dict.fromkeys(subscriptions, handler)
    )
    async with running(runner):
        for i in range(4):
            await world.append(f"{i}/x", {"n": i})
        await eventually(lambda: runner.health().claims["completed"] == 4)
    assert most == 2


async def test_a_conflicting_subscription_is_reported_and_served_as_it_is(world: World) -> None:
    await world.create("a")
    # Someone else created this id with another configuration (a different lease).
    await world.client.create_stream(world.wake)
    await world.client.ensure_subscription(
        world.sub, wake_stream=world.wake, pattern=f"jobs-{world.uid}/*", lease_ttl_ms=7_000
    )
    recorder = Recorder()
    runner = Runner(world.settings(), handlers={world.sub: recorder})
    with captured_logs() as logs:
        async with running(runner):
            await world.append("a", {"n": 1})
            await eventually(lambda: recorder.count == 1)
    conflicts = [entry for entry in logs if entry["event"] == "subscription.conflict"]
    assert conflicts
    assert conflicts[0]["log_level"] == "error"
    assert "different configuration" in conflicts[0]["detail"]
    assert (await world.get_subscription(world.sub))["lease_ttl_ms"] == 7_000, "left as it is"


async def test_a_vanished_subscription_is_put_back(world: World) -> None:
    await world.create("a")
    recorder = Recorder()
    runner = Runner(world.settings(sweep_interval=0.3), handlers={world.sub: recorder})
    with captured_logs() as logs:
        async with running(runner):
            await world.delete_subscription(world.sub)
            # The next sweep's claim finds it gone and puts it back.
            await eventually(lambda: any(entry["event"] == "subscription.was_missing" for entry in logs))
            await world.append("a", {"n": 1})
            await eventually(lambda: recorder.count == 1, what="an event on the re-created subscription")
    assert (await world.get_subscription(world.sub))["pattern"] == f"jobs-{world.uid}/*"


async def test_a_subscription_deleted_under_a_claim_is_put_back_at_once_and_its_unacked_event_replayed(
    world: World,
) -> None:
    await world.create("a")
    batches: list[Batch] = []
    deleted = trio.Event()

    async def hold_the_first(batch: Batch) -> None:
        batches.append(batch)
        if len(batches) == 1:
            await world.delete_subscription(world.sub)
            deleted.set()
            await trio.sleep_forever()  # until the lease keeper's ack finds the subscription gone

    runner = Runner(world.settings(sweep_interval=3600.0), handlers={world.sub: hold_the_first})
    with captured_logs() as logs:
        async with running(runner):
            await world.append("a", {"n": 1})
            with trio.fail_after(15):
                await deleted.wait()
            # The server answers 404 SUBSCRIPTION_NOT_FOUND to the renewal: the claim ends as
            # "subscription gone" (not as a lease lost), the subscription is put back, and what
            # the server skipped is replayed.
            await eventually(lambda: len(batches) == 2, timeout=5, what="the event handed over again")
    assert batches[1].messages == [{"n": 1}]
    assert batches[1].replayed
    assert "claim.subscription_gone" in [entry["event"] for entry in logs]


async def test_a_wake_stream_re_created_under_the_runner_misses_no_work(world: World) -> None:
    """Someone deletes and re-creates the wake stream, and work arrives before the runner is back:
    the wake written there may sit below the runner's offset, yet the work is not missed (the
    new connection's sweep claims it, rather than re-reading the whole stream)."""
    await world.create("a")
    spec = world.spec(manage=False)
    await world.client.create_stream(world.wake)
    await world.client.ensure_subscription(spec.id, wake_stream=world.wake, pattern=spec.pattern)
    recorder = Recorder()
    settings = world.settings(subscriptions=(spec,), state_dir=world.tmp / "state", backoff_initial=1.0)
    runner = Runner(settings, handlers={world.sub: recorder})
    async with running(runner):
        for n in range(3):
            await world.append("a", {"n": n})
        await eventually(lambda: recorder.count == 3)
        assert (await world.http.delete(world.stream_path(world.wake))).status_code == 204
        await eventually(lambda: runner.state is not State.STREAMING, what="the runner to lose its stream")
        await world.client.create_stream(world.wake)
        await world.append("a", {"n": 3})  # its wake lands in the new stream, before the runner is back
        await eventually(lambda: recorder.count == 4, timeout=10, what="the event after the re-creation")
    assert [message["n"] for message in recorder.messages()] == [0, 1, 2, 3]
