"""Following the wake stream: the `connecting` and `streaming` activities (docs/design.md §4.2).

`connect` prepares the server side (managed subscriptions), finds the offset to
resume from, and opens the live read; it hands the open read over with
CONNECTED. `consume` turns wake events into WAKE, advances the wake offset, and
reports how the live read ended: STREAM_END (clean), STREAM_ERROR, or
STREAM_CLOSED (the wake stream reached EOF: fatal).

The keep-alive watchdog ends a live read that stays silent past `keepalive_timeout`.
Silence alone is not death, though: some servers send no keep-alive while idle, so a
liveness probe that finds the server answering with nothing missed on the wake stream
(`server_answered`) counts as hearing from it.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Awaitable, Callable
from contextlib import aclosing
from typing import cast

import structlog
import trio

from machine import Event

from .._dispatch import Wake
from .._driver import StateContext
from .._health import Vitals
from .._state.checkpoint import WakePosition
from .._wire.answers import WakeEvent, parse
from .._wire.protocol import Frame, LiveRead, Wire, is_after
from ..errors import (
    ClientError,
    ImmediateClose,
    ProtocolError,
    SSERefused,
    StreamNotFound,
    StreamRewound,
    StreamSilent,
    TransportError,
    WakeStreamClosed,
)
from .reading import ITEMS_PER_STEP, Tally, paced_long_polls
from .subscriptions import SubscriptionKeeper

log = structlog.get_logger("pullwake.wake")

# A live read that ends this soon counts as an error, whatever it delivered, so a server or
# proxy that closes at once (or after each message) cannot drive a tight reconnect loop:
# the backoff paces it.
MIN_USEFUL_STREAM = 1.0


class LongPollRead:
    """`live=long-poll`, one request after the other, as a live read."""

    def __init__(self, wire: Wire, path: str, offset: str, hold: float) -> None:
        self._wire = wire
        self._path = path
        self._hold = hold
        self.offset = offset

    async def aclose(self) -> None:
        pass

    async def frames(self) -> AsyncGenerator[Frame, None]:
        # Each request is bounded by the hold time plus the request deadline, and each answer
        # (204 included) is a frame: the keep-alive watchdog never waits on a silent one.
        # Closed with this generator, not left to the garbage collector (a closed stream, a rewind).
        async with aclosing(paced_long_polls(self._wire, self._path, self.offset, hold=self._hold)) as results:
            async for result in results:
                if not result.is_json:
                    raise ProtocolError(f"wake stream {self._path} is not a JSON stream ({result.content_type})")
                self.offset = result.next_offset
                yield Frame(result.messages, result.next_offset, result.closed)


class WakeFollower:
    """The connect and consume activities for one run."""

    def __init__(
        self,
        wire: Wire,
        *,
        wake_stream: str,
        position: WakePosition,
        vitals: Vitals,
        keeper: SubscriptionKeeper,
        share: Callable[[str], Awaitable[bool]] | None = None,
        known: Callable[[str], bool] | None = None,
        live_mode: str = "sse",
        connect_timeout: float = 10.0,
        keepalive_timeout: float = 75.0,
        long_poll_timeout: float = 30.0,
    ) -> None:
        self._wire = wire
        self._path = wake_stream
        self._position = position
        self._vitals = vitals
        self._keeper = keeper
        self._share = share
        self._known = known
        self._confirmed = False
        """The subscriptions new to this runner were created or confirmed (at the run's first connect)."""
        self.mode = live_mode
        self._connect_timeout = connect_timeout
        self._keepalive = keepalive_timeout
        self._hold = long_poll_timeout
        self._tally = Tally(vitals, f"wake stream {wake_stream}")
        self._missing = False
        self._watchdog: trio.CancelScope | None = None
        """The live read being watched for silence, while there is one."""

    async def connect(self, context: StateContext) -> None:
        try:
            await self._keeper.ensure_wake_stream()
            connection = await self._open()
            if not self._confirmed:
                # Opened first: a wake the server writes meanwhile is after our offset, not lost.
                try:
                    await self._keeper.ensure_all(self._unknown)
                except BaseException:
                    with trio.CancelScope(shield=True), trio.move_on_after(1.0):
                        await connection.aclose()
                    raise
                self._confirmed = True
        except ClientError as exc:
            self._vitals.error(exc)
            log.warning("wake.connect_failed", wake_stream=self._path, error=str(exc))
            await context.emit(Event.CONNECT_FAILED, error=exc)
            return
        log.info("wake.connected", wake_stream=self._path, mode=self.mode, offset=connection.offset)
        await context.emit(Event.CONNECTED, payload=connection)

    async def _unknown(self, subscription: str) -> bool:
        """Must `subscription` be created or confirmed before the wake stream is followed?

        Only one this runner (and its fleet) never saw on this server, and only if it is this
        runner's share: it may not exist yet, and an event appended once the runner follows must
        not be skipped by a subscription created after it (a new subscription links existing
        streams at their tail). One the journal knows is confirmed by its first claim instead
        (the dispatcher), after following began: if the server forgot it, putting it back finds
        the gap from the journal's offsets and replays it, so nothing waits and nothing is lost.
        """
        if self._known is not None and self._known(subscription):
            return False
        return self._share is None or await self._share(subscription)

    async def tail(self, *, timeout: float | None = None) -> str:
        """HEAD of the wake stream: its tail. Also the liveness probe."""
        return await self._wire.tail(self._path, timeout=timeout)

    async def _open(self) -> LiveRead:
        # The tail says the stream is there, and whether our offset still means anything. A
        # stream that went missing and came back, or whose tail is behind our offset, was
        # re-created: our offset means nothing in it. Offsets alone cannot always tell (the
        # new tail may land exactly where we were), so a stream seen missing counts as new.
        # Either way the read resumes at the tail: the sweep that every new connection
        # makes (the RESYNC effect) claims whatever is pending, without re-reading history.
        try:
            tail = await self.tail()
        except StreamNotFound:
            self._missing = True
            raise
        if self._position.offset is None:
            self._position.advance(tail)  # first start without a checkpoint
        elif self._missing or is_after(self._position.offset, tail):
            why = "it went missing and came back" if self._missing else f"our offset is past its tail {tail}"
            self._resume_at(tail, why)
        self._missing = False
        offset = self._position.offset
        assert offset is not None
        if self.mode == "sse":
            try:
                with trio.fail_after(self._connect_timeout):
                    return await self._wire.open_sse(self._path, offset)
            except trio.TooSlowError:
                raise TransportError(f"opening the wake stream took longer than {self._connect_timeout:g} s") from None
            except SSERefused as exc:
                log.warning("wake.sse_refused", wake_stream=self._path, reason=str(exc), fallback="long-poll")
                self.mode = "long-poll"
        return LongPollRead(self._wire, self._path, offset, self._hold)

    def _resume_at(self, offset: str, why: str) -> None:
        """Our offset means nothing in this stream any more: go on from the server's."""
        log.warning(
            "wake.stream_rewound",
            wake_stream=self._path,
            offset=self._position.offset,
            resume_at=offset,
            why=why,
            detail="resuming there; the sweep of the new connection claims whatever is pending",
        )
        self._position.advance(offset)

    async def consume(self, context: StateContext) -> None:
        connection = cast(LiveRead, context.trigger.payload)
        started = trio.current_time()
        try:
            delivered, closed = await self._follow(connection, context)
        except ClientError as exc:
            self._vitals.error(exc)
            log.warning("wake.stream_error", wake_stream=self._path, error=str(exc))
            await context.emit(Event.STREAM_ERROR, error=exc)
            return
        error: BaseException
        if closed:
            error = WakeStreamClosed(f"the wake stream {self._path} was closed by its owner (EOF)")
            self._vitals.error(error)
            log.error("wake.stream_closed", wake_stream=self._path, offset=self._position.offset)
            await context.emit(Event.STREAM_CLOSED, error=error)
        elif (lived := trio.current_time() - started) < MIN_USEFUL_STREAM:
            error = ImmediateClose(f"the wake stream ended after {lived:.2f} s ({delivered} message(s))")
            self._vitals.error(error)
            await context.emit(Event.STREAM_ERROR, error=error)
        else:
            log.info("wake.stream_ended", wake_stream=self._path, delivered=delivered)
            await context.emit(Event.STREAM_END)

    def server_answered(self) -> None:
        """A liveness probe found the server answering, with nothing missed on the wake stream.

        A silent live read is then trusted for another `keepalive_timeout`: its silence is an
        idle server that sends no keep-alive, not a dead connection.
        """
        if self._watchdog is not None:
            self._watchdog.deadline = max(self._watchdog.deadline, trio.current_time() + self._keepalive)

    async def _follow(self, connection: LiveRead, context: StateContext) -> tuple[int, bool]:
        """Relay wakes until the live read ends or stays silent too long; returns (delivered, stream closed)."""
        with trio.CancelScope(deadline=trio.current_time() + self._keepalive) as watchdog:
            self._watchdog = watchdog
            try:
                return await self._relay(connection, context, watchdog)
            finally:
                self._watchdog = None
        raise StreamSilent(
            f"wake stream {self._path}: silent for {self._keepalive:g} s "
            "(no event, no keep-alive, and no liveness probe vouched for the server)"
        )

    async def _relay(self, connection: LiveRead, context: StateContext, watchdog: trio.CancelScope) -> tuple[int, bool]:
        delivered, since_data = 0, False
        async with aclosing(connection.frames()) as frames:
            async for frame in frames:
                watchdog.deadline = max(watchdog.deadline, trio.current_time() + self._keepalive)
                delivered += len(frame.messages)
                since_data = since_data or bool(frame.messages) or frame.unusable is not None
                if frame.unusable is not None:
                    self._tally.ignored("unusable event", frame.unusable)
                for index, message in enumerate(frame.messages, 1):
                    wake = self._wake_of(message)
                    if wake is not None:
                        await context.emit(Event.WAKE, payload=wake)
                    elif index % ITEMS_PER_STEP == 0:
                        await trio.lowlevel.checkpoint()  # a huge frame must not freeze the runner
                if frame.offset is not None:
                    current = self._position.offset
                    if current is not None and is_after(current, frame.offset):
                        if not since_data:
                            continue  # an empty answer just past a lagging tail: keep our offset
                        self._resume_at(frame.offset, "the server went back")
                        raise StreamRewound(f"the wake stream {self._path} went back from {current} to {frame.offset}")
                    self._position.advance(frame.offset)
                    since_data = False
                if frame.closed:
                    return delivered, True
        return delivered, False

    def _wake_of(self, message: object) -> Wake | None:
        self._vitals.wake_received()
        if not isinstance(message, dict):
            self._tally.ignored("not an object", message)
            return None
        if message.get("type") != "wake":
            self._vitals.ignored("other type")  # newer protocol versions: not a problem
            return None
        try:
            event: WakeEvent = parse(WakeEvent, message, what="wake")
        except ProtocolError as exc:
            self._tally.ignored("malformed wake", str(exc))
            return None
        stream = event.stream if isinstance(event.stream, str) else None
        return Wake(event.subscription_id, stream, event.generation, event.ts_ms)
