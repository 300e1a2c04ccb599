"""Following the wake stream: the `connecting` and `streaming` activities.

`connect` prepares the server side (managed subscriptions), finds the offset to
resume from, and opens the live read; it hands the open read over with
CONNECTED. `consume` turns wake events into WAKE, advances the wake offset, and
reports how the live read ended: STREAM_END (clean), STREAM_ERROR, or
STREAM_CLOSED (the wake stream reached EOF: fatal).
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from contextlib import aclosing
from dataclasses import dataclass
from typing import cast

import structlog
import trio

from machine import Event

from ._checkpoint import WakePosition
from ._driver import StateContext
from ._exceptions import (
    ClientError,
    ImmediateClose,
    ProtocolError,
    SSERefused,
    StreamNotFound,
    StreamRewound,
    TransportError,
    WakeStreamClosed,
)
from ._health import Vitals
from ._subscriptions import SubscriptionKeeper
from ._wire import Frame, LiveRead, Wire, is_after

log = structlog.get_logger("pullwake.wake")

# A live read that ends cleanly this soon without delivering anything counts as an error,
# so a server or proxy that closes at once cannot drive a tight reconnect loop.
MIN_USEFUL_STREAM = 1.0


@dataclass(frozen=True)
class Wake:
    """A reason to claim a subscription."""

    subscription: str
    stream: str | None = None
    generation: int | None = None
    """The server's generation of the wake; None for a wake of the runner's own (a sweep),
    which is always worth a claim."""
    ts_ms: int | None = None
    """Server time the wake was written (ms since the epoch), for latency."""


class LongPollRead:
    """`live=long-poll`, one request after the other, as a live read."""

    def __init__(self, wire: Wire, path: str, offset: str, hold: float) -> None:
        self._wire = wire
        self._path = path
        self._hold = hold
        self.offset = offset

    async def aclose(self) -> None:
        pass

    async def frames(self, keepalive: float) -> AsyncGenerator[Frame, None]:
        # Each request is bounded by the hold time plus the request timeout: that is the watchdog.
        while True:
            result = await self._wire.long_poll(self._path, self.offset, hold=self._hold)
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
        self.mode = live_mode
        self._connect_timeout = connect_timeout
        self._keepalive = keepalive_timeout
        self._hold = long_poll_timeout

    async def connect(self, context: StateContext) -> None:
        try:
            await self._keeper.ensure_all()
            connection = await self._open()
        except ClientError as exc:
            self._vitals.error(exc)
            log.warning("wake.connect_failed", wake_stream=self._path, error=str(exc))
            await context.emit(Event.CONNECT_FAILED, error=exc)
            return
        log.info("wake.connected", wake_stream=self._path, mode=self.mode, offset=connection.offset)
        await context.emit(Event.CONNECTED, payload=connection)

    async def tail(self, *, timeout: float | None = None) -> str:
        """HEAD of the wake stream: its tail. Also the liveness probe.

        A missing wake stream means our offset refers to nothing: should the stream come
        back (re-created), it is read from the start. Offsets alone cannot tell: the new
        stream's tail may land exactly where we were in the old one.
        """
        try:
            return await self._wire.tail(self._path, timeout=timeout)
        except StreamNotFound:
            if self._position.offset not in (None, "-1"):
                self._rewind("the wake stream is missing")
            raise

    async def _open(self) -> LiveRead:
        # The tail says the stream is there, and whether our offset still means anything.
        tail = await self.tail()
        if self._position.offset is None:
            # First start without a checkpoint: begin at the tail (the start-up sweep covers the past).
            self._position.advance(tail)
        elif is_after(self._position.offset, tail):
            self._rewind(f"our offset is past its tail {tail}")
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

    def _rewind(self, why: str) -> None:
        """Deleted and re-created under us: our offset means nothing in the new stream, and a read
        from it would skip what is there. Every wake in the new stream is news: read it all."""
        log.warning("wake.stream_rewound", wake_stream=self._path, offset=self._position.offset, why=why)
        self._position.advance("-1")

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
        elif delivered == 0 and trio.current_time() - started < MIN_USEFUL_STREAM:
            error = ImmediateClose("the wake stream closed at once without delivering anything")
            self._vitals.error(error)
            await context.emit(Event.STREAM_ERROR, error=error)
        else:
            log.info("wake.stream_ended", wake_stream=self._path, delivered=delivered)
            await context.emit(Event.STREAM_END)

    async def _follow(self, connection: LiveRead, context: StateContext) -> tuple[int, bool]:
        """Relay wakes until the live read ends; returns (messages delivered, stream closed)."""
        delivered = 0
        async with aclosing(connection.frames(self._keepalive)) as frames:
            async for frame in frames:
                delivered += len(frame.messages)
                for message in frame.messages:
                    wake = self._wake_of(message)
                    if wake is not None:
                        await context.emit(Event.WAKE, payload=wake)
                if frame.offset is not None:
                    current = self._position.offset
                    if current is not None and is_after(current, frame.offset):
                        self._rewind(f"the server went back to {frame.offset}")
                        raise StreamRewound(f"the wake stream {self._path} went back from {current} to {frame.offset}")
                    self._position.advance(frame.offset)
                if frame.closed:
                    return delivered, True
        return delivered, False

    def _wake_of(self, message: object) -> Wake | None:
        self._vitals.wake_received()
        if not isinstance(message, dict):
            log.warning("wake.malformed", wake_stream=self._path, message=repr(message)[:200])
            return None
        if message.get("type") != "wake":
            log.debug("wake.other_event", type=message.get("type"))
            return None
        subscription = message.get("subscription_id")
        generation = message.get("generation")
        if not isinstance(subscription, str) or not subscription or not isinstance(generation, int):
            log.warning("wake.malformed", wake_stream=self._path, message=repr(message)[:200])
            return None
        stream = message.get("stream")
        ts = message.get("ts")
        return Wake(
            subscription,
            stream if isinstance(stream, str) else None,
            generation,
            ts if isinstance(ts, int) else None,
        )
