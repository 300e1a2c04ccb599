"""Following the wake stream (runner/_wake/follower.py) against the in-memory wire, in virtual time.

`connect` opens the live read and hands it over with CONNECTED (or says CONNECT_FAILED);
`consume` turns wake events into WAKE and says how the read ended.
"""

from __future__ import annotations

from typing import Any, cast

import pytest
import trio
import trio.testing

from machine import Event
from runner._config import SubscriptionSpec
from runner._dispatch import Wake
from runner._driver import Envelope, StateContext
from runner._health import Vitals
from runner._state.checkpoint import WakePosition
from runner._state.journal import Journal
from runner._wake.follower import MIN_USEFUL_STREAM, LongPollRead, WakeFollower
from runner._wake.reading import ITEMS_PER_STEP
from runner._wake.subscriptions import SubscriptionKeeper
from runner._wire.protocol import Frame, ReadResult
from runner.errors import (
    ImmediateClose,
    ProtocolError,
    StreamNotFound,
    StreamRewound,
    StreamSilent,
    TransportError,
    WakeStreamClosed,
)
from tests.fake_wire import FakeWire, ScriptedRead, offset_of

WAKES = "wake/pool"


class Context:
    """What an activity gets of the driver: its trigger, and a record of what it emitted."""

    def __init__(self, payload: object = None) -> None:
        self.trigger = Envelope(Event.CONNECTED, payload=payload)
        self.emitted: list[Envelope] = []

    async def emit(self, event: Event, *, payload: object = None, error: BaseException | None = None) -> None:
        await trio.lowlevel.checkpoint()
        self.emitted.append(Envelope(event, payload=payload, error=error))

    @property
    def events(self) -> list[Event]:
        return [envelope.event for envelope in self.emitted]

    @property
    def last(self) -> Envelope:
        return self.emitted[-1]

    @property
    def wakes(self) -> list[object]:
        return [envelope.payload for envelope in self.emitted if envelope.event is Event.WAKE]


def follower(
    wire: FakeWire,
    offset: str | None = None,
    *,
    vitals: Vitals | None = None,
    specs: tuple[SubscriptionSpec, ...] = (),
    **options: Any,
) -> tuple[WakeFollower, WakePosition, Vitals]:
    position = WakePosition(offset)
    vitals = vitals or Vitals("test")
    journal = Journal(None, server_url="http://127.0.0.1:1")
    keeper = SubscriptionKeeper(wire, specs, wake_stream=WAKES, journal=journal, vitals=vitals)
    return (
        WakeFollower(wire, wake_stream=WAKES, position=position, vitals=vitals, keeper=keeper, **options),
        position,
        vitals,
    )


async def connect(wake: WakeFollower) -> Context:
    context = Context()
    await wake.connect(cast(StateContext, context))
    return context


async def consume(wake: WakeFollower, read: object) -> Context:
    context = Context(read)
    await wake.consume(cast(StateContext, context))
    return context


def wake_event(subscription: str = "s1", generation: int = 1, **extra: Any) -> dict[str, Any]:
    return {"type": "wake", "subscription_id": subscription, "generation": generation, **extra}


def ignored(vitals: Vitals, reason: str) -> float | None:
    return vitals.metrics.registry.get_sample_value("pullwake_wake_items_ignored_total", {"reason": reason})


# -- connect ---------------------------------------------------------------------------------


async def test_a_first_start_without_a_checkpoint_reads_live_from_the_tail(
    autojump_clock: trio.testing.MockClock,
) -> None:
    wire = FakeWire()
    wire.add_stream(WAKES, [wake_event(), wake_event()])
    read = ScriptedRead()
    wire.sse_reads.append(read)
    wake, position, _ = follower(wire)
    context = await connect(wake)
    assert context.events == [Event.CONNECTED]
    assert context.last.payload is read
    assert position.offset == offset_of(2), "history before the first start is not replayed"
    assert read.offset == offset_of(2)
    assert [call.args for call in wire.called("open_sse")] == [(WAKES, offset_of(2))]
    assert wake.mode == "sse"


async def test_a_checkpoint_before_the_tail_is_where_the_read_resumes(autojump_clock: trio.testing.MockClock) -> None:
    wire = FakeWire()
    wire.add_stream(WAKES, [wake_event()] * 5)
    wire.sse_reads.append(ScriptedRead())
    wake, position, _ = follower(wire, offset_of(3))
    context = await connect(wake)
    assert context.events == [Event.CONNECTED]
    assert position.offset == offset_of(3)
    assert cast(ScriptedRead, context.last.payload).offset == offset_of(3)


async def test_sse_refused_falls_back_to_long_polls_from_the_same_offset(
    autojump_clock: trio.testing.MockClock,
) -> None:
    wire = FakeWire()
    wire.add_stream(WAKES, [wake_event()] * 5)
    wake, _, _ = follower(wire, offset_of(3))
    context = await connect(wake)
    assert context.events == [Event.CONNECTED]
    read = context.last.payload
    assert isinstance(read, LongPollRead)
    assert read.offset == offset_of(3)
    assert wake.mode == "long-poll", "the fallback sticks: later connects do not try SSE again"
    await connect(wake)
    assert len(wire.called("open_sse")) == 1


async def test_long_poll_mode_never_tries_sse(autojump_clock: trio.testing.MockClock) -> None:
    wire = FakeWire()
    wire.add_stream(WAKES)
    wire.sse_reads.append(ScriptedRead())
    wake, _, _ = follower(wire, live_mode="long-poll")
    context = await connect(wake)
    assert isinstance(context.last.payload, LongPollRead)
    assert wire.called("open_sse") == []


async def test_an_offset_past_the_tail_resumes_at_the_tail(autojump_clock: trio.testing.MockClock) -> None:
    wire = FakeWire()
    wire.add_stream(WAKES, [wake_event()] * 2)
    wire.sse_reads.append(ScriptedRead())
    wake, position, _ = follower(wire, offset_of(7))
    context = await connect(wake)
    assert context.events == [Event.CONNECTED]
    assert position.offset == offset_of(2)
    assert cast(ScriptedRead, context.last.payload).offset == offset_of(2)


async def test_a_missing_wake_stream_fails_the_connect_and_when_back_it_is_read_from_its_tail(
    autojump_clock: trio.testing.MockClock,
) -> None:
    wire = FakeWire()
    wake, position, vitals = follower(wire, offset_of(1))
    context = await connect(wake)
    assert context.events == [Event.CONNECT_FAILED]
    assert isinstance(context.last.error, StreamNotFound)
    assert vitals.last_error == "StreamNotFound: HEAD wake/pool: 404 stream not found"
    assert position.offset == offset_of(1)

    # Re-created, and already past where we were: our offset means nothing in it.
    wire.add_stream(WAKES, [wake_event()] * 4)
    context = await connect(wake)
    assert context.events == [Event.CONNECTED]
    assert position.offset == offset_of(4)

    # Seen once: the next connect trusts the offset again.
    position.advance(offset_of(2))
    context = await connect(wake)
    assert position.offset == offset_of(2)
    assert cast(LongPollRead, context.last.payload).offset == offset_of(2)


async def test_only_subscriptions_new_to_the_runner_and_its_own_are_put_in_place_before_following_and_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    wire = FakeWire()
    wire.add_stream(WAKES)
    specs = tuple(SubscriptionSpec(id=name, pattern=f"{name}/*") for name in ("known", "mine", "peers"))
    journal = Journal(None, server_url="http://127.0.0.1:1")
    journal.learn("known", {"known/1": offset_of(3)})  # acknowledged on this server before: its claim confirms it
    assert journal.knows("known")
    assert not journal.knows("mine")

    async def share(subscription: str) -> bool:
        await trio.lowlevel.checkpoint()
        return subscription != "peers"

    wake, _, _ = follower(wire, specs=specs, share=share, known=journal.knows)
    assert (await connect(wake)).events == [Event.CONNECTED]
    assert [call.args[0] for call in wire.called("ensure_subscription")] == ["mine"]
    assert (await connect(wake)).events == [Event.CONNECTED]
    assert len(wire.called("ensure_subscription")) == 1, "a reconnect puts nothing in place again"


async def test_a_subscription_that_cannot_be_put_in_place_fails_the_connect(
    autojump_clock: trio.testing.MockClock,
) -> None:
    wire = FakeWire()
    wire.add_stream(WAKES)
    wire.fail_server("create_stream")
    wake, _, vitals = follower(wire, specs=(SubscriptionSpec(id="s1", pattern="jobs/*"),))
    context = await connect(wake)
    assert context.events == [Event.CONNECT_FAILED]
    assert vitals.last_error == "ServerError: create_stream: 503 unavailable"
    assert wire.called("tail") == [], "no read is opened before the subscriptions are in place"

    context = await connect(wake)
    assert context.events == [Event.CONNECTED]
    assert "s1" in wire.subscriptions


@pytest.mark.parametrize(("options", "limit"), [({}, 10.0), ({"connect_timeout": 3.0}, 3.0)])
async def test_an_sse_open_that_hangs_fails_the_connect_after_the_connect_timeout(
    autojump_clock: trio.testing.MockClock, options: dict[str, Any], limit: float
) -> None:
    wire = FakeWire()
    wire.add_stream(WAKES)
    wire.hang("open_sse")
    wake, _, _ = follower(wire, **options)
    started = trio.current_time()
    context = await connect(wake)
    assert trio.current_time() - started == pytest.approx(limit)
    assert context.events == [Event.CONNECT_FAILED]
    error = context.last.error
    assert isinstance(error, TransportError)
    assert str(error) == f"opening the wake stream took longer than {limit:g} s"
    assert wake.mode == "sse"


async def test_the_tail_is_a_head_of_the_wake_stream(autojump_clock: trio.testing.MockClock) -> None:
    wire = FakeWire()
    wire.add_stream(WAKES, [wake_event()] * 3)
    wake, _, _ = follower(wire)
    assert await wake.tail(timeout=1.0) == offset_of(3)
    assert [call.args for call in wire.called("tail")] == [(WAKES, 1.0)]


# -- consume ---------------------------------------------------------------------------------


async def test_wakes_become_wake_events_and_the_offset_follows_each_frame(
    autojump_clock: trio.testing.MockClock,
) -> None:
    wire = FakeWire()
    stamp = 1_700_000_000_000
    read = ScriptedRead(
        Frame([wake_event("s1", 3, stream="jobs/a", ts=stamp), wake_event("s2", 9)], "00000002"),
        Frame([wake_event("s1", 4, ts="late")], "00000003"),
        MIN_USEFUL_STREAM,
    )
    wake, position, vitals = follower(wire, "00000000")
    context = await consume(wake, read)
    assert context.wakes == [Wake("s1", "jobs/a", 3, stamp), Wake("s2", None, 9, None), Wake("s1", None, 4, None)]
    assert context.events[-1] is Event.STREAM_END
    assert position.offset == "00000003"
    assert vitals.events_received == 3


async def test_a_live_read_silent_past_the_keepalive_timeout_ends_and_each_frame_or_answering_probe_extends_it(
    autojump_clock: trio.testing.MockClock,
) -> None:
    keep_alive = Frame([], "00000001")  # an empty frame: the server's keep-alive
    read = ScriptedRead(*[step for _ in range(5) for step in (8.0, keep_alive)], 1000.0)
    wake, _, _ = follower(FakeWire(), "00000001", keepalive_timeout=10.0)
    start = trio.current_time()
    ended = trio.Event()
    async with trio.open_nursery() as nursery:

        async def probe_answers_at_45() -> None:
            await trio.sleep(45)
            wake.server_answered()  # an idle server that sends no keep-alive: trusted 10 s more
            ended.set()

        nursery.start_soon(probe_answers_at_45)
        context = await consume(wake, read)
    assert ended.is_set()
    assert context.events == [Event.STREAM_ERROR]
    assert trio.current_time() - start == 45 + 10, "silent from 40 s, vouched for at 45 s"
    assert isinstance(context.last.error, StreamSilent)
    assert "silent for 10 s" in str(context.last.error)
    wake.server_answered()  # no live read: nothing to extend, nothing breaks


async def test_the_first_frame_sets_an_offset_never_set(autojump_clock: trio.testing.MockClock) -> None:
    wake, position, _ = follower(FakeWire())
    context = await consume(wake, ScriptedRead(Frame([], "00000004"), MIN_USEFUL_STREAM))
    assert position.offset == "00000004"
    assert context.events == [Event.STREAM_END]


async def test_items_that_are_not_wakes_are_counted_not_emitted(autojump_clock: trio.testing.MockClock) -> None:
    read = ScriptedRead(
        Frame([{"type": "hello"}, {"type": "hello"}, ["not", "an", "object"]], "00000003"),
        Frame([{"type": "wake", "generation": 1}, wake_event("s1", 2)], "00000005"),
        Frame([], None, unusable="not JSON"),
        MIN_USEFUL_STREAM,
    )
    wake, position, vitals = follower(FakeWire(), "00000000")
    context = await consume(wake, read)
    assert context.wakes == [Wake("s1", None, 2, None)]
    assert context.events[-1] is Event.STREAM_END
    assert ignored(vitals, "other type") == 2
    assert ignored(vitals, "not an object") == 1
    assert ignored(vitals, "malformed wake") == 1
    assert ignored(vitals, "unusable event") == 1
    assert vitals.events_received == 5
    assert position.offset == "00000005"
    # The first ignored item is reported at once (later ones are summarised once a minute).
    assert vitals.last_error == "wake stream wake/pool: ignored 1 item(s): not an object: ['not', 'an', 'object']"


async def test_a_malformed_wake_says_what_was_wrong(autojump_clock: trio.testing.MockClock) -> None:
    read = ScriptedRead(Frame([{"type": "wake", "subscription_id": "s1"}], "00000001"), MIN_USEFUL_STREAM)
    wake, _, vitals = follower(FakeWire(), "00000000")
    context = await consume(wake, read)
    assert context.wakes == []
    assert vitals.last_error is not None
    assert vitals.last_error.startswith("wake stream wake/pool: ignored 1 item(s): malformed wake: wake: malformed")
    assert "generation" in vitals.last_error


async def test_a_huge_frame_lets_other_tasks_run_every_so_many_items(autojump_clock: trio.testing.MockClock) -> None:
    count = 5 * ITEMS_PER_STEP
    read = ScriptedRead(Frame([{"type": "other"}] * count, offset_of(count)), MIN_USEFUL_STREAM)
    wake, _, vitals = follower(FakeWire(), "00000000")
    seen: list[int] = []
    async with trio.open_nursery() as nursery:

        async def watch() -> None:
            while vitals.events_received < count:
                seen.append(vitals.events_received)
                await trio.lowlevel.checkpoint()

        nursery.start_soon(watch)
        context = await consume(wake, read)
    assert context.events == [Event.STREAM_END]
    during = {value for value in seen if 0 < value < count}
    assert during, "other tasks ran while the frame was worked through"
    assert all(value % ITEMS_PER_STEP == 0 for value in during), during


async def test_a_closed_wake_stream_is_fatal_after_its_last_wakes(autojump_clock: trio.testing.MockClock) -> None:
    read = ScriptedRead(5.0, Frame([wake_event()], "00000001", closed=True), Frame([wake_event("s9")], "00000002"))
    wake, position, vitals = follower(FakeWire(), "00000000")
    context = await consume(wake, read)
    assert context.events == [Event.WAKE, Event.STREAM_CLOSED]
    error = context.last.error
    assert isinstance(error, WakeStreamClosed)
    assert str(error) == "the wake stream wake/pool was closed by its owner (EOF)"
    assert vitals.last_error == f"WakeStreamClosed: {error}"
    assert position.offset == "00000001"


async def test_a_closed_wake_stream_is_fatal_even_at_once(autojump_clock: trio.testing.MockClock) -> None:
    wake, _, _ = follower(FakeWire(), "00000000")
    context = await consume(wake, ScriptedRead(Frame([], "00000000", closed=True)))
    assert context.events == [Event.STREAM_CLOSED]


async def test_a_read_that_ends_cleanly_after_a_while_is_a_stream_end(autojump_clock: trio.testing.MockClock) -> None:
    wake, _, vitals = follower(FakeWire(), "00000000")
    context = await consume(wake, ScriptedRead(Frame([wake_event()], "00000001"), MIN_USEFUL_STREAM - 0.001, 0.001))
    assert context.events == [Event.WAKE, Event.STREAM_END]
    assert context.last.error is None
    assert vitals.last_error is None


async def test_a_read_that_ends_at_once_is_an_error_so_the_backoff_paces_it(
    autojump_clock: trio.testing.MockClock,
) -> None:
    wake, _, vitals = follower(FakeWire(), "00000000")
    await trio.sleep(100)  # the clock does not start at zero
    read = ScriptedRead(Frame([wake_event()], "00000001"), 0.5, Frame([wake_event()], "00000002"))
    context = await consume(wake, read)
    assert context.events == [Event.WAKE, Event.WAKE, Event.STREAM_ERROR]
    error = context.last.error
    assert isinstance(error, ImmediateClose)
    assert str(error) == "the wake stream ended after 0.50 s (2 message(s))"
    assert vitals.last_error == f"ImmediateClose: {error}"


async def test_an_error_of_the_read_is_a_stream_error(autojump_clock: trio.testing.MockClock) -> None:
    failure = TransportError("keep-alive missed")
    read = ScriptedRead(Frame([wake_event()], "00000001"), 30.0, failure)
    wake, position, vitals = follower(FakeWire(), "00000000")
    context = await consume(wake, read)
    assert context.events == [Event.WAKE, Event.STREAM_ERROR]
    assert context.last.error is failure
    assert vitals.last_error == "TransportError: keep-alive missed"
    assert position.offset == "00000001"


async def test_a_server_that_goes_back_after_data_rewinds_and_reconnects(
    autojump_clock: trio.testing.MockClock,
) -> None:
    read = ScriptedRead(Frame([wake_event()], "00000005"), Frame([wake_event("s2")], "00000002"), 10.0)
    wake, position, _ = follower(FakeWire(), "00000000")
    context = await consume(wake, read)
    assert context.events == [Event.WAKE, Event.WAKE, Event.STREAM_ERROR]
    error = context.last.error
    assert isinstance(error, StreamRewound)
    assert str(error) == "the wake stream wake/pool went back from 00000005 to 00000002"
    assert position.offset == "00000002", "the read resumes where the server is now"


async def test_an_empty_answer_just_past_a_lagging_tail_keeps_our_offset(
    autojump_clock: trio.testing.MockClock,
) -> None:
    read = ScriptedRead(
        Frame([wake_event()], "00000005"),
        Frame([], "00000003"),
        Frame([], "00000004"),
        Frame([wake_event("s2")], "00000006"),
        MIN_USEFUL_STREAM,
    )
    wake, position, _ = follower(FakeWire(), "00000000")
    context = await consume(wake, read)
    assert context.events == [Event.WAKE, Event.WAKE, Event.STREAM_END]
    assert position.offset == "00000006"


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(Frame([wake_event("s2")], None), id="messages-without-an-offset"),
        pytest.param(Frame([], None, unusable="too big"), id="an-unusable-event"),
    ],
)
async def test_data_since_the_last_offset_makes_a_step_back_a_rewind(
    autojump_clock: trio.testing.MockClock, data: Frame
) -> None:
    read = ScriptedRead(Frame([wake_event()], "00000005"), data, Frame([], "00000003"), 10.0)
    wake, position, _ = follower(FakeWire(), "00000000")
    context = await consume(wake, read)
    assert context.events[-1] is Event.STREAM_ERROR
    assert isinstance(context.last.error, StreamRewound)
    assert position.offset == "00000003"


async def test_an_unusable_event_with_an_offset_moves_the_offset(autojump_clock: trio.testing.MockClock) -> None:
    read = ScriptedRead(Frame([], "00000005", unusable="too big"), Frame([], "00000004"), MIN_USEFUL_STREAM)
    wake, position, _ = follower(FakeWire(), "00000000")
    context = await consume(wake, read)
    assert context.events == [Event.STREAM_END]
    assert position.offset == "00000005"


# -- long-poll -------------------------------------------------------------------------------


async def test_long_polls_deliver_wakes_and_hold_when_there_is_nothing(autojump_clock: trio.testing.MockClock) -> None:
    wire = FakeWire()
    wire.add_stream(WAKES, [wake_event("s1", 1), wake_event("s2", 1), wake_event("s3", 1)])
    wake, position, _ = follower(wire, "-1", live_mode="long-poll")
    opened = await connect(wake)
    read = cast(LongPollRead, opened.last.payload)
    context = Context(read)
    with trio.move_on_after(100):
        await wake.consume(cast(StateContext, context))
    assert context.wakes == [Wake("s1", None, 1, None), Wake("s2", None, 1, None), Wake("s3", None, 1, None)]
    assert position.offset == offset_of(3)
    assert read.offset == offset_of(3)
    reads = [call.at for call in wire.called("read")]
    # Two chunks at once, then each poll held for the default 30 s on the quiet stream.
    assert reads[:4] == [0.0, 0.0, 30.0, 60.0]


async def test_the_long_poll_hold_is_configurable(autojump_clock: trio.testing.MockClock) -> None:
    wire = FakeWire()
    wire.add_stream(WAKES)
    wake, _, _ = follower(wire, "-1", live_mode="long-poll", long_poll_timeout=5.0)
    opened = await connect(wake)
    with trio.move_on_after(12):
        await consume(wake, opened.last.payload)
    assert [call.at for call in wire.called("read")] == [5.0, 10.0]


async def test_a_long_polled_stream_its_owner_closed_is_fatal(autojump_clock: trio.testing.MockClock) -> None:
    wire = FakeWire()
    wire.add_stream(WAKES, [wake_event()])
    wire.closed.add(WAKES)
    wake, _, _ = follower(wire, "-1", live_mode="long-poll")
    opened = await connect(wake)
    context = await consume(wake, opened.last.payload)
    assert context.events == [Event.WAKE, Event.STREAM_CLOSED]


class PlainTextWire(FakeWire):
    async def long_poll(self, path: str, offset: str, *, hold: float) -> ReadResult:
        await self._call("long_poll", path, offset)
        return ReadResult(["x"], offset_of(1), up_to_date=True, closed=False, content_type="text/plain")


async def test_a_wake_stream_that_is_not_json_is_a_stream_error(autojump_clock: trio.testing.MockClock) -> None:
    wire = PlainTextWire()
    wire.add_stream(WAKES)
    wake, _, _ = follower(wire, "-1", live_mode="long-poll")
    opened = await connect(wake)
    context = await consume(wake, opened.last.payload)
    assert context.events == [Event.STREAM_ERROR]
    error = context.last.error
    assert isinstance(error, ProtocolError)
    assert str(error) == "wake stream wake/pool is not a JSON stream (text/plain)"


async def test_an_empty_first_answer_behind_our_offset_keeps_it(autojump_clock: trio.testing.MockClock) -> None:
    read = ScriptedRead(Frame([], "00000003"), Frame([wake_event()], "00000006"), MIN_USEFUL_STREAM)
    wake, position, _ = follower(FakeWire(), "00000005")
    context = await consume(wake, read)
    assert context.events == [Event.WAKE, Event.STREAM_END]
    assert position.offset == "00000006"


async def test_an_unusable_event_is_reported_with_why(autojump_clock: trio.testing.MockClock) -> None:
    wake, _, vitals = follower(FakeWire(), "00000000")
    await consume(wake, ScriptedRead(Frame([], None, unusable="over 1 MiB"), MIN_USEFUL_STREAM))
    assert vitals.last_error == "wake stream wake/pool: ignored 1 item(s): unusable event: over 1 MiB"
