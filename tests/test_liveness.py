"""The liveness heartbeat and the stall rule, in virtual time, through the real driver."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import trio
import trio.testing

from machine import Event, State
from runner._driver import Driver, StateContext
from runner._health import Vitals
from runner._state.checkpoint import WakePosition
from runner._wake.liveness import Liveness
from runner.errors import TokenRefused, TransportError
from tests.driver_harness import Fakes, drive_to, settle

INTERVAL, TIMEOUT, THRESHOLD = 5.0, 2.0, 2


class Probe:
    """A scripted HEAD of the wake stream: 'hang', 'fail', or a tail offset."""

    def __init__(self, script: Callable[[int], str]) -> None:
        self.script = script
        self.calls: list[float] = []

    async def __call__(self) -> str:
        self.calls.append(trio.current_time())
        answer = self.script(len(self.calls))
        if answer == "hang":
            await trio.sleep_forever()
        if answer == "fail":
            raise TransportError("connection refused")
        if answer == "401":
            raise TokenRefused("the server refused the service token", status=401)
        return answer


def liveness_for(driver: Driver, probe: Probe, position: WakePosition | None = None) -> Liveness:
    return Liveness(
        probe,
        driver,
        position or WakePosition("0000_0001"),
        Vitals("test"),
        interval=INTERVAL,
        timeout=TIMEOUT,
        threshold=THRESHOLD,
    )


async def test_failed_probes_reset_a_hung_connect_after_the_threshold(autojump_clock: trio.testing.MockClock) -> None:
    fakes = Fakes()
    driver = fakes.driver()
    probe = Probe(lambda n: "hang")
    liveness = liveness_for(driver, probe)
    async with trio.open_nursery() as nursery:
        await nursery.start(driver.run)
        await drive_to(driver, State.CONNECTING)
        [connect] = fakes.running()
        nursery.start_soon(liveness.run)
        started = trio.current_time()
        await driver.wait_until(State.RECONNECTING)
        # Probes at 5 and 10 each give up after 2 s: the second failure, at 12 s, resets.
        assert trio.current_time() - started == pytest.approx(INTERVAL * THRESHOLD + TIMEOUT)
        assert connect.cancelled, "the hung connect attempt observed cancellation"
        assert liveness.failures == THRESHOLD
        nursery.cancel_scope.cancel()


async def test_failures_must_be_consecutive(autojump_clock: trio.testing.MockClock) -> None:
    fakes = Fakes()
    driver = fakes.driver()
    probe = Probe(lambda n: "fail" if n % 2 else "0000_0001")
    liveness = liveness_for(driver, probe)
    async with trio.open_nursery() as nursery:
        await nursery.start(driver.run)
        await drive_to(driver, State.STREAMING)
        nursery.start_soon(liveness.run)
        await trio.sleep(INTERVAL * 40 + 1)
        assert len(probe.calls) == 40
        assert driver.state is State.STREAMING
        assert liveness.resets == 0
        nursery.cancel_scope.cancel()


async def test_resets_continue_while_failures_last_then_stop(autojump_clock: trio.testing.MockClock) -> None:
    fakes = Fakes()

    async def quick_backoff(context: StateContext) -> None:
        await trio.sleep(1)
        await context.emit(Event.BACKOFF_ELAPSED)

    fakes.scripts["backoff"] = quick_backoff
    driver = fakes.driver()
    server_down_until = 8  # probes 1..7 fail, then the server answers
    probe = Probe(lambda n: "fail" if n < server_down_until else "0000_0001")
    liveness = liveness_for(driver, probe)
    async with trio.open_nursery() as nursery:
        await nursery.start(driver.run)
        await drive_to(driver, State.CONNECTING)
        nursery.start_soon(liveness.run)
        await trio.sleep(INTERVAL * 20)
        # Probes 2..7 are at or above the threshold, and each finds the runner connecting again.
        assert liveness.resets == server_down_until - THRESHOLD
        assert liveness.failures == 0
        connects = [life for life in fakes.lives if life.name == "connect"]
        assert len(connects) == liveness.resets + 1
        nursery.cancel_scope.cancel()


async def test_a_reset_is_never_sent_from_reconnecting_or_stopping(autojump_clock: trio.testing.MockClock) -> None:
    fakes = Fakes()
    driver = fakes.driver()
    liveness = liveness_for(driver, Probe(lambda n: "fail"))
    async with trio.open_nursery() as nursery:
        await nursery.start(driver.run)
        await drive_to(driver, State.STOPPING)
        nursery.start_soon(liveness.run)
        await trio.sleep(INTERVAL * 10 + 1)
        assert liveness.failures == 10
        assert liveness.resets == 0
        assert driver.state is State.STOPPING
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize(
    ("scenario", "reset"),
    [
        ("stalled: behind twice, nothing arrived", True),
        ("slow but moving: behind twice, something arrived", False),
        ("caught up in between", False),
        ("reconnected in between", False),
    ],
)
async def test_the_stall_rule(scenario: str, reset: bool, autojump_clock: trio.testing.MockClock) -> None:
    fakes = Fakes()
    driver = fakes.driver()
    position = WakePosition("0000_0005")
    tails = {"caught up in between": ["0000_0009", "0000_0005", "0000_0009"]}.get(scenario, ["0000_0009"] * 3)
    probe = Probe(lambda n: tails[min(n, 3) - 1])
    liveness = liveness_for(driver, probe, position)
    async with trio.open_nursery() as nursery:
        await nursery.start(driver.run)
        await drive_to(driver, State.STREAMING)
        epoch = driver.epoch
        await liveness.beat()
        if scenario.startswith("slow"):
            position.advance("0000_0007")
        if scenario.startswith("reconnected"):
            await driver.send(Event.STREAM_END, epoch=epoch)
            await settle()
            await driver.send(Event.CONNECTED, epoch=driver.epoch)
            await settle()
        await liveness.beat()
        if scenario.startswith("caught"):
            await liveness.beat()
        await settle()
        assert (liveness.resets == 1) is reset
        assert (driver.state is State.RECONNECTING) is reset
        nursery.cancel_scope.cancel()


def test_health_is_degraded_while_probes_fail_or_the_stream_is_down() -> None:
    vitals = Vitals("test")
    vitals.started()
    vitals.entered(State.CONNECTING)
    vitals.entered(State.STREAMING)
    assert vitals.snapshot(State.STREAMING, [], None).status == "ok"
    vitals.heartbeat(False, 1)
    health = vitals.snapshot(State.STREAMING, [], None)
    assert health.status == "degraded"
    assert "probe" in (health.reason or "")
    vitals.heartbeat(True, 0)
    vitals.entered(State.RECONNECTING)
    health = vitals.snapshot(State.RECONNECTING, [], None)
    assert (health.status, health.reconnect_count, health.stream_connected) == ("degraded", 1, False)
    vitals.started()
    assert vitals.snapshot(State.STOPPED, [], None).reconnect_count == 0, "counters start fresh on every start"


async def test_only_an_answer_after_a_failure_ends_a_backoff(autojump_clock: trio.testing.MockClock) -> None:
    fakes = Fakes()
    driver = fakes.driver()
    probe = Probe(lambda n: "fail" if n == 1 else "0000_0001")
    liveness = liveness_for(driver, probe)
    async with trio.open_nursery() as nursery:
        await nursery.start(driver.run)
        await drive_to(driver, State.RECONNECTING)
        nursery.start_soon(liveness.run)
        await trio.sleep(INTERVAL + 1)
        assert driver.state is State.RECONNECTING, "a failed probe ends nothing"
        await trio.sleep(INTERVAL)
        assert State(driver.state) is State.CONNECTING, "the first answer after the failure ends the wait"
        await driver.send(Event.CONNECT_FAILED, epoch=driver.epoch)
        await settle()
        await trio.sleep(INTERVAL * 4)
        assert State(driver.state) is State.RECONNECTING, "a server answering all along gets the backoff's pace"
        nursery.cancel_scope.cancel()


async def test_the_first_good_probe_after_a_refused_token_ends_a_backoff(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # A 401 storm: the server answers, but refuses the service token; the runner cannot work.
    fakes = Fakes()
    driver = fakes.driver()
    probe = Probe(lambda n: "401" if n <= 3 else "0000_0001")
    liveness = liveness_for(driver, probe)
    async with trio.open_nursery() as nursery:
        await nursery.start(driver.run)
        await drive_to(driver, State.RECONNECTING)
        nursery.start_soon(liveness.run)
        await trio.sleep(INTERVAL * 3 + 1)
        assert driver.state is State.RECONNECTING, "a refused token ends nothing"
        await trio.sleep(INTERVAL)
        assert State(driver.state) is State.CONNECTING, "the token accepted again ends the wait at the next probe"
        nursery.cancel_scope.cancel()
