"""The driver's structural guarantees: cancellation by state, epochs, stop."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from machine import Effect, Event, State, Step
from runner._driver import Driver, Envelope, StateContext
from tests.driver_harness import Fakes, drive_to, running_driver, settle


class FakeConnection:
    def __init__(self) -> None:
        self.closed = False

    async def aclose(self) -> None:
        await trio.lowlevel.checkpoint()  # as a network close would: it must survive a cancelled caller
        self.closed = True


@pytest.mark.parametrize(("state", "activity"), [(State.CONNECTING, "connect"), (State.STREAMING, "consume")])
async def test_stream_reset_cancels_a_hung_activity(state: State, activity: str) -> None:
    fakes = Fakes()
    async with running_driver(fakes, state) as driver:
        [hung] = fakes.running()
        assert hung.name == activity

        # The heartbeat is a runner-lifetime sender: it speaks for the epoch it observed.
        await driver.send(Event.STREAM_RESET, epoch=driver.epoch)
        await settle()

        assert hung.cancelled, f"the hung {activity} activity must observe trio cancellation"
        assert hung.finished
        assert driver.state is State.RECONNECTING


async def test_connected_from_an_abandoned_connect_is_dropped_and_its_connection_closed() -> None:
    fakes = Fakes()
    async with running_driver(fakes, State.CONNECTING) as driver:
        [connect] = fakes.running()
        stale_epoch = driver.epoch

        # The reset and the connect attempt's success race; the reset wins.
        await driver.send(Event.STREAM_RESET, epoch=stale_epoch)
        connection = FakeConnection()
        await connect.context.emit(Event.CONNECTED, payload=connection)
        await settle()

        assert driver.state is State.RECONNECTING
        assert driver.epoch == stale_epoch + 1
        assert connection.closed, "a connection nobody took over must be closed, not leaked"
        assert [effect for effect, _ in fakes.effects] == [], "a dropped CONNECTED must not reset the backoff"


async def test_connected_hands_its_connection_to_the_streaming_activity() -> None:
    fakes = Fakes()
    async with running_driver(fakes, State.CONNECTING) as driver:
        [connect] = fakes.running()
        connection = FakeConnection()
        await connect.context.emit(Event.CONNECTED, payload=connection)
        await settle()
        [consume] = fakes.running()
        assert consume.context.trigger.payload is connection
        assert not connection.closed

        await driver.send(Event.STREAM_ERROR, epoch=driver.epoch)
        await settle()
        assert connection.closed, "leaving streaming closes the connection it was handed"


async def test_an_event_from_an_older_epoch_never_moves_the_machine() -> None:
    fakes = Fakes()
    async with running_driver(fakes, State.STREAMING) as driver:
        old = driver.epoch
        await driver.send(Event.STREAM_END, epoch=old)  # streaming -> connecting
        await settle()
        assert driver.state is State.CONNECTING
        for event in (Event.CONNECT_FAILED, Event.STREAM_RESET, Event.STOP, Event.CONNECTED):
            await driver.send(event, epoch=old)
        await settle()
        assert driver.state is State.CONNECTING


async def test_a_crashing_activity_sends_its_declared_failure_event() -> None:
    fakes = Fakes()

    async def explode(context: StateContext) -> None:
        raise RuntimeError("bug in connect")

    fakes.scripts["connect"] = explode
    driver = fakes.driver()
    async with trio.open_nursery() as nursery:
        await nursery.start(driver.run)
        await driver.send(Event.START)
        await settle()
        assert driver.state is State.RECONNECTING
        nursery.cancel_scope.cancel()


def test_the_driver_refuses_missing_activities_or_effects() -> None:
    with pytest.raises(ValueError, match="drain"):
        Driver({"connect": Fakes().activity("x")}, {})
    fakes = Fakes()
    activities = {name: fakes.activity(name) for name in ("connect", "consume", "backoff", "drain")}
    with pytest.raises(ValueError, match="effects"):
        Driver(activities, {Effect.CLAIM: lambda envelope: None})


async def drain_in(seconds: float, context: StateContext) -> None:
    await trio.sleep(seconds)
    await context.emit(Event.DRAINED)


@pytest.mark.parametrize("state", list(State))
async def test_stop_from_every_state_reaches_stopped(state: State, autojump_clock: trio.testing.MockClock) -> None:
    fakes = Fakes()
    fakes.scripts["drain"] = lambda context: drain_in(5, context)
    async with running_driver(fakes, state) as driver:
        await driver.stop()
        assert driver.state is State.STOPPED
        assert fakes.running() == []


async def test_concurrent_stops_share_one_sequence(autojump_clock: trio.testing.MockClock) -> None:
    fakes = Fakes()
    fakes.scripts["drain"] = lambda context: drain_in(5, context)
    driver = fakes.driver()
    returned: list[float] = []

    async def stop() -> None:
        await driver.stop()
        returned.append(trio.current_time())

    async with trio.open_nursery() as nursery:
        await nursery.start(driver.run)
        await drive_to(driver, State.STREAMING)
        started = trio.current_time()
        async with trio.open_nursery() as stoppers:
            for _ in range(3):
                stoppers.start_soon(stop)
    assert [life.name for life in fakes.lives].count("drain") == 1, "one drain for all the callers"
    assert len(returned) == 3
    assert all(at - started == pytest.approx(5) for at in returned), "every caller waits for the same drain"


async def test_start_stop_start_in_one_driver(autojump_clock: trio.testing.MockClock) -> None:
    fakes = Fakes()
    fakes.scripts["drain"] = lambda context: drain_in(1, context)
    driver = fakes.driver()
    for _ in range(3):
        async with trio.open_nursery() as nursery:
            await nursery.start(driver.run)
            await drive_to(driver, State.STREAMING)
            await driver.stop()
        assert driver.state is State.STOPPED
        assert not driver.running
    assert fakes.running() == []


async def test_an_activity_knows_its_state_and_can_start_work_in_its_nursery() -> None:
    fakes = Fakes()
    started = trio.Event()

    async def helper() -> None:
        started.set()
        await trio.sleep_forever()

    async def connect(context: StateContext) -> None:
        context.nursery.start_soon(helper)

    fakes.scripts["connect"] = connect
    async with running_driver(fakes, State.CONNECTING):
        [life] = fakes.running()
        assert life.context.state is State.CONNECTING
        await started.wait()


async def test_an_activity_speaks_for_its_epoch_and_its_error_reaches_the_effects() -> None:
    fakes = Fakes()
    error = RuntimeError("the stream closed for good")
    async with running_driver(fakes, State.STREAMING) as driver:
        [consume] = fakes.running()
        await consume.context.emit(Event.STREAM_CLOSED, error=error)
        await settle()
        assert driver.state is State.STOPPING
        [envelope] = [env for e, env in fakes.effects if e is Effect.FATAL]
        assert envelope.epoch == consume.epoch
        assert envelope.error is error


async def test_an_activity_from_an_older_epoch_cannot_speak(autojump_clock: trio.testing.MockClock) -> None:
    fakes = Fakes()
    async with running_driver(fakes, State.STREAMING) as driver:
        [consume] = fakes.running()
        await driver.send(Event.STREAM_END, epoch=driver.epoch)
        await settle()
        await consume.context.emit(Event.CONNECT_FAILED)  # from the streaming that is over
        await settle()
        assert driver.state is State.CONNECTING


async def test_busy_for_counts_how_long_a_transition_waits_for_the_old_activity(
    autojump_clock: trio.testing.MockClock,
) -> None:
    fakes = Fakes()

    async def stubborn(context: StateContext) -> None:
        try:
            await trio.sleep_forever()
        finally:
            with trio.CancelScope(shield=True):
                await trio.sleep(7)

    fakes.scripts["consume"] = stubborn
    async with running_driver(fakes, State.STREAMING) as driver:
        await trio.sleep(100)
        assert driver.busy_for() == 0.0
        await driver.send(Event.STREAM_ERROR, epoch=driver.epoch)
        await trio.sleep(5)
        assert driver.busy_for() == 5.0
        await trio.sleep(5)
        assert driver.state is State.RECONNECTING
        assert driver.busy_for() == 0.0


async def test_a_crash_event_speaks_for_the_crashed_activitys_epoch_and_carries_the_error() -> None:
    fakes = Fakes()
    error = RuntimeError("bug in connect")

    async def explode(context: StateContext) -> None:
        raise error

    fakes.scripts["connect"] = explode
    seen: list[tuple[Step, Envelope, int]] = []
    driver = Driver(
        {name: fakes.activity(name) for name in ("connect", "consume", "backoff", "drain")},
        dict.fromkeys(Effect, lambda envelope: None),
        on_step=lambda step, envelope, epoch: seen.append((step, envelope, epoch)),
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(driver.run)
        await driver.send(Event.START)
        await settle()
        assert driver.state is State.RECONNECTING
        step, crash, epoch = seen[-1]
        assert (step.source, step.event, step.target, epoch) == (
            State.CONNECTING,
            Event.CONNECT_FAILED,
            State.RECONNECTING,
            driver.epoch,
        )
        assert (crash.event, crash.epoch) == (Event.CONNECT_FAILED, 1)
        assert isinstance(crash.error, BaseExceptionGroup)
        assert crash.error.exceptions == (error,)
        nursery.cancel_scope.cancel()


async def test_a_running_driver_cannot_be_run_again() -> None:
    fakes = Fakes()
    async with running_driver(fakes) as driver:
        with pytest.raises(RuntimeError, match=r"^this driver is already running$"):
            await driver.run()


async def test_payloads_nobody_takes_over_are_closed() -> None:
    fakes = Fakes()
    driver = fakes.driver()
    unsent = FakeConnection()
    await driver.send(Event.CONNECTED, payload=unsent)  # no driver running
    assert unsent.closed

    ignored, queued = FakeConnection(), FakeConnection()
    async with trio.open_nursery() as nursery:
        await nursery.start(driver.run)
        await drive_to(driver, State.STREAMING)
        await driver.send(Event.CONNECTED, epoch=driver.epoch, payload=ignored)  # ignored in streaming
        await settle()
        assert ignored.closed
        await drive_to(driver, State.STOPPING)
        await driver.send(Event.DRAINED, epoch=driver.epoch)
        await driver.send(Event.CONNECTED, payload=queued)  # still queued when the run ends
        await settle()
        assert driver.state is State.STOPPED
        assert queued.closed
        nursery.cancel_scope.cancel()


async def test_a_driver_cancelled_from_outside_still_closes_the_connection_its_state_held() -> None:
    fakes = Fakes()
    connection = FakeConnection()
    driver = fakes.driver()
    async with trio.open_nursery() as nursery:
        await nursery.start(driver.run)
        await drive_to(driver, State.CONNECTING)
        await driver.send(Event.CONNECTED, epoch=driver.epoch, payload=connection)
        await settle()
        assert driver.state is State.STREAMING
        nursery.cancel_scope.cancel()  # e.g. the host program's nursery goes away
    assert connection.closed, "disposal is shielded from the cancellation that caused it"


async def stubborn(context: StateContext) -> None:
    """An activity that takes 10 s to end once cancelled: the transition away from its state waits."""
    try:
        await trio.sleep_forever()
    finally:
        with trio.CancelScope(shield=True):
            await trio.sleep(10)


async def test_a_flood_of_events_waits_for_room_in_the_inbox_instead_of_queueing_without_bound(
    autojump_clock: trio.testing.MockClock,
) -> None:
    fakes = Fakes()
    fakes.scripts["consume"] = stubborn
    driver = fakes.driver(buffer=2)
    assert driver.busy_for() == 0.0, "not running, so not busy"
    sent = 0

    async def send_stop() -> None:
        nonlocal sent
        await driver.send(Event.STOP)
        sent += 1

    async with trio.open_nursery() as nursery:
        await nursery.start(driver.run)
        await drive_to(driver, State.STREAMING)
        await driver.send(Event.STREAM_ERROR, epoch=driver.epoch)  # leaving streaming takes 10 s
        for _ in range(3):
            nursery.start_soon(send_stop)
        await trio.sleep(5)
        assert sent == 2, "two fit in the inbox; the third sender waits"
        await trio.sleep(10)
        assert sent == 3
        assert driver.state is State.STOPPING
        nursery.cancel_scope.cancel()


async def test_a_sender_waiting_on_a_full_inbox_when_the_driver_goes_away_closes_its_connection(
    autojump_clock: trio.testing.MockClock,
) -> None:
    fakes = Fakes()
    fakes.scripts["consume"] = stubborn
    driver = fakes.driver(buffer=1)
    connection = FakeConnection()
    async with trio.open_nursery() as outside, trio.open_nursery() as nursery:
        await nursery.start(driver.run)
        await drive_to(driver, State.STREAMING)
        await driver.send(Event.STREAM_ERROR, epoch=driver.epoch)  # leaving streaming takes 10 s
        await driver.send(Event.STOP)  # the inbox is full
        outside.start_soon(lambda: driver.send(Event.CONNECTED, payload=connection))
        await trio.sleep(1)
        assert not connection.closed, "still waiting to be delivered"
        nursery.cancel_scope.cancel()  # e.g. the host program's nursery goes away
    assert connection.closed, "a connection nobody will take over is closed, not leaked"


async def test_a_connection_queued_in_the_inbox_when_the_driver_is_cancelled_from_outside_is_closed(
    autojump_clock: trio.testing.MockClock,
) -> None:
    fakes = Fakes()
    fakes.scripts["consume"] = stubborn
    driver = fakes.driver()
    queued = FakeConnection()
    async with trio.open_nursery() as nursery:
        await nursery.start(driver.run)
        await drive_to(driver, State.STREAMING)
        await driver.send(Event.STREAM_ERROR, epoch=driver.epoch)  # leaving streaming takes 10 s
        await driver.send(Event.CONNECTED, payload=queued)  # queued behind that transition
        await trio.sleep(1)
        assert not queued.closed, "still waiting in the inbox"
        nursery.cancel_scope.cancel()  # e.g. the host program's nursery goes away
    assert queued.closed, "a connection nobody will take over is closed, not leaked"
