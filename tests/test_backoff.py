"""Reconnect backoff, in virtual time, through the real driver."""

from __future__ import annotations

import itertools
import random

import pytest
import trio
import trio.testing

from machine import Effect, Event, State
from runner._driver import Driver, StateContext
from runner._wake.reconnect import BackoffActivity
from runner._wire.retrying import (
    PROBE_INTERVAL,
    REQUEST_ATTEMPTS,
    REQUEST_RETRY_INITIAL,
    Backoff,
    next_attempt,
    retrying,
)
from runner.errors import ServerError, TransportError, Unreachable

INITIAL, MAXIMUM, JITTER = 1.0, 30.0, 0.2


class FailingConnect:
    """A connect activity that fails at once, except when told to succeed."""

    def __init__(self) -> None:
        self.attempts_at: list[float] = []
        self.succeed_next = False
        self.error: BaseException | None = None
        """What each failed attempt ends with (None: no error attached)."""
        self._waiters: list[tuple[int, trio.Event]] = []

    async def attempts(self, count: int) -> None:
        event = trio.Event()
        self._waiters.append((count, event))
        await event.wait()

    async def __call__(self, context: StateContext) -> None:
        self.attempts_at.append(trio.current_time())
        for count, event in self._waiters:
            if len(self.attempts_at) >= count:
                event.set()
        if self.succeed_next:
            self.succeed_next = False
            await context.emit(Event.CONNECTED)
        else:
            await context.emit(Event.CONNECT_FAILED, error=self.error)


async def fail_stream(context: StateContext) -> None:
    await context.emit(Event.STREAM_ERROR)


async def idle(context: StateContext) -> None:
    await trio.sleep_forever()


def driver_with(connect: FailingConnect, backoff: BackoffActivity) -> Driver:
    return Driver(
        {"connect": connect, "consume": fail_stream, "backoff": backoff, "drain": idle},
        {
            Effect.CLAIM: lambda e: None,
            Effect.FATAL: lambda e: None,
            Effect.RESYNC: lambda e: None,
            Effect.RESET_BACKOFF: backoff.reset,
        },
    )


def gaps(times: list[float]) -> list[float]:
    return [later - earlier for earlier, later in itertools.pairwise(times)]


def assert_schedule(delays: list[float], first_attempt: int = 0) -> None:
    for n, delay in enumerate(delays, start=first_attempt):
        base = min(MAXIMUM, INITIAL * 2**n)
        assert base * (1 - JITTER) - 1e-9 <= delay <= base + 1e-9, (
            f"delay {n} = {delay} outside jitter bounds of {base}"
        )


async def test_delays_double_to_the_cap_within_jitter_and_reset_after_connected(
    autojump_clock: trio.testing.MockClock,
) -> None:
    connect = FailingConnect()
    backoff = BackoffActivity(Backoff(INITIAL, MAXIMUM, jitter=JITTER, rng=random.Random(7)))
    driver = driver_with(connect, backoff)
    async with trio.open_nursery() as nursery:
        await nursery.start(driver.run)
        await driver.send(Event.START)
        await connect.attempts(9)
        delays = gaps(connect.attempts_at)
        assert_schedule(delays)
        assert delays[-1] >= MAXIMUM * (1 - JITTER), "after enough failures the delay sits at the cap"
        assert len(set(delays)) == len(delays), "jitter makes every delay different"

        # One good connection, then the stream fails: the next wait is short again.
        connect.succeed_next = True
        count = len(connect.attempts_at)
        await connect.attempts(count + 4)
        after_reset = gaps(connect.attempts_at[count:])
        assert_schedule(after_reset)
        assert driver.state in (State.CONNECTING, State.RECONNECTING)
        nursery.cancel_scope.cancel()


def test_backoff_never_exceeds_the_configured_maximum() -> None:
    backoff = Backoff(0.5, 7.0, jitter=0.5, rng=random.Random(1))
    delays = [backoff.next_delay() for _ in range(200)]
    assert max(delays) <= 7.0
    assert min(delays) >= 0.25


@pytest.mark.parametrize(("initial", "maximum", "jitter"), [(0, 1, 0.1), (2, 1, 0.1), (1, 2, 1.0), (1, 2, -0.1)])
def test_backoff_rejects_nonsense(initial: float, maximum: float, jitter: float) -> None:
    with pytest.raises(ValueError, match="backoff"):
        Backoff(initial, maximum, jitter=jitter)


async def test_a_server_that_cannot_be_reached_is_asked_again_soon_and_an_answer_brings_back_the_doubling(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A restart refuses connections at once: the runner asks every half second at most (with
    jitter), however long it lasts, rather than doubling to seconds and finding the server late.
    The doubling is not moved on meanwhile; an answer (a 5xx) paces the attempts as before."""
    connect = FailingConnect()
    connect.error = Unreachable("connection refused")
    backoff = BackoffActivity(Backoff(INITIAL, MAXIMUM, jitter=JITTER, rng=random.Random(3)))
    driver = driver_with(connect, backoff)
    async with trio.open_nursery() as nursery:
        await nursery.start(driver.run)
        await driver.send(Event.START)
        await connect.attempts(40)
        delays = gaps(connect.attempts_at)
        assert all(PROBE_INTERVAL * (1 - JITTER) - 1e-9 <= delay <= PROBE_INTERVAL + 1e-9 for delay in delays), delays
        assert len(set(delays)) > 1, "jitter: a fleet does not probe in lockstep"

        connect.error = ServerError("overloaded", status=503)
        count = len(connect.attempts_at)
        await connect.attempts(count + 5)
        assert_schedule(gaps(connect.attempts_at[count:]))  # the attempt before the change was still refused
        nursery.cancel_scope.cancel()


def test_only_a_server_that_gave_no_answer_is_probed_soon() -> None:
    backoff = Backoff(INITIAL, MAXIMUM, jitter=0.0)
    assert next_attempt(backoff, Unreachable("refused")) == PROBE_INTERVAL
    assert backoff.attempt == 0, "probing does not move the doubling on"
    assert next_attempt(backoff, TransportError("timed out")) == INITIAL
    assert next_attempt(backoff, ServerError("busy", status=503)) == 2 * INITIAL
    assert next_attempt(backoff, ServerError("busy", status=503, retry_after=7.0)) == 7.0, "Retry-After believed"
    unreachable_but_asked = Unreachable("refused")
    unreachable_but_asked.retry_after = 9.0  # type: ignore[attr-defined]
    assert next_attempt(backoff, unreachable_but_asked) == 9.0
    assert next_attempt(Backoff(0.1, 1.0, jitter=0.0), Unreachable("refused")) == 0.1, "never above the initial delay"


async def test_a_request_that_cannot_reach_the_server_is_sent_again_soon_and_only_so_often(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A claim sent while the server restarts is refused at once: it is sent again within
    REQUEST_RETRY_INITIAL each time, not after a delay doubled to seconds, so it finds the server
    as soon as it answers (it holds a claim slot meanwhile); and still only REQUEST_ATTEMPTS times."""
    sent_at: list[float] = []

    async def refused() -> None:
        sent_at.append(trio.current_time())
        raise Unreachable("connection refused")

    with pytest.raises(Unreachable):
        await retrying(refused, what="claim")
    assert len(sent_at) == REQUEST_ATTEMPTS
    assert all(gap <= REQUEST_RETRY_INITIAL + 1e-9 for gap in gaps(sent_at)), gaps(sent_at)

    sent_at.clear()

    async def busy() -> None:
        sent_at.append(trio.current_time())
        raise ServerError("overloaded", status=503)

    with pytest.raises(ServerError):
        await retrying(busy, what="claim")
    assert gaps(sent_at)[-1] > 2 * REQUEST_RETRY_INITIAL, "an answer still doubles the delay"
