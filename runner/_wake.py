"""Following the wake stream: the `connecting` and `streaming` activities.

`connect` prepares the server side (managed subscriptions), finds the offset to
resume from, and opens the live read; it hands the open connection over with
CONNECTED. `consume` turns wake events into WAKE, advances the wake offset, and
reports how the live read ended: STREAM_END (clean), STREAM_ERROR, or
STREAM_CLOSED (the wake stream reached EOF: fatal).
"""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator, Awaitable, Callable
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any

import httpx
import structlog
import trio
from httpx_sse import EventSource

from machine import Event

from ._checkpoint import WakePosition
from ._client import StreamsClient, is_after
from ._driver import StateContext
from ._exceptions import (
    ClientError,
    ImmediateClose,
    ProtocolError,
    RequestError,
    StreamNotFound,
    StreamRewound,
    StreamSilent,
    TransportError,
    WakeStreamClosed,
)
from ._health import Vitals

log = structlog.get_logger("pullwake.wake")

# A live read that ends cleanly this soon without delivering anything counts as an error,
# so a server or proxy that closes at once cannot drive a tight reconnect loop.
MIN_USEFUL_STREAM = 1.0
_SSE_REFUSED = {400, 405, 406, 415, 501}


@dataclass(frozen=True)
class Wake:
    """A reason to claim a subscription."""

    subscription: str
    stream: str | None = None
    generation: int | None = None
    ts_ms: int | None = None
    """Server time the wake was written (ms since the epoch), for latency."""

    @property
    def from_sweep(self) -> bool:
        return self.generation is None


class SSERefused(ClientError):
    """The server or a proxy will not serve SSE here (never escapes: we fall back to long-poll)."""


class SSEConnection:
    """An open `live=sse` read."""

    mode = "sse"

    def __init__(self, response: httpx.Response, offset: str) -> None:
        self._response = response
        self.offset = offset

    async def aclose(self) -> None:
        await self._response.aclose()

    async def frames(self, keepalive: float) -> AsyncGenerator[tuple[list[Any], str | None, bool], None]:
        async with aclosing(EventSource(self._response).aiter_sse()) as events:
            while True:
                with trio.move_on_after(keepalive) as watchdog:
                    try:
                        sse = await anext(events)
                    except StopAsyncIteration:
                        return
                    except httpx.TransportError as exc:
                        raise TransportError(f"wake stream: {type(exc).__name__}: {exc}") from exc
                if watchdog.cancelled_caught:
                    raise StreamSilent(f"wake stream silent for {keepalive:g} s (no data, no keep-alive)")
                if sse.event == "data":
                    yield _parse(sse.data, list, "data"), None, False
                elif sse.event == "control":
                    control = _parse(sse.data, dict, "control")
                    offset = control.get("streamNextOffset")
                    if offset is not None and not isinstance(offset, str):
                        raise ProtocolError(f"wake stream: control event with a bad offset {offset!r}")
                    yield [], offset, bool(control.get("streamClosed"))
                # Other event types belong to newer protocol versions: ignore them.


def _parse(data: str, kind: type, name: str) -> Any:
    try:
        value = json.loads(data)
    except ValueError as exc:
        raise ProtocolError(f"wake stream: {name} event is not JSON ({exc})") from exc
    if not isinstance(value, kind):
        raise ProtocolError(f"wake stream: {name} event should be a JSON {kind.__name__}")
    return value


class LongPollConnection:
    """`live=long-poll`, one request after the other."""

    mode = "long-poll"

    def __init__(self, client: StreamsClient, path: str, offset: str, hold: float) -> None:
        self._client = client
        self._path = path
        self._hold = hold
        self.offset = offset

    async def aclose(self) -> None:
        pass

    async def frames(self, keepalive: float) -> AsyncGenerator[tuple[list[Any], str | None, bool], None]:
        # Each request is bounded by the hold time plus the request timeout: that is the watchdog.
        while True:
            result = await self._client.long_poll(self._path, self.offset, hold=self._hold)
            if not result.is_json:
                raise ProtocolError(f"wake stream {self._path} is not a JSON stream ({result.content_type})")
            self.offset = result.next_offset
            yield result.messages, result.next_offset, result.closed


class WakeFollower:
    """The connect and consume activities for one run."""

    def __init__(
        self,
        client: StreamsClient,
        *,
        wake_stream: str,
        position: WakePosition,
        vitals: Vitals,
        prepare: Callable[[], Awaitable[None]],
        live_mode: str = "sse",
        connect_timeout: float = 10.0,
        keepalive_timeout: float = 75.0,
        long_poll_timeout: float = 30.0,
    ) -> None:
        self._client = client
        self._path = wake_stream
        self._position = position
        self._vitals = vitals
        self._prepare = prepare
        self.mode = live_mode
        self._connect_timeout = connect_timeout
        self._keepalive = keepalive_timeout
        self._hold = long_poll_timeout

    async def connect(self, context: StateContext) -> None:
        try:
            await self._prepare()
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
            return await self._client.tail(self._path, timeout=timeout)
        except StreamNotFound:
            if self._position.offset not in (None, "-1"):
                self._rewind("the wake stream is missing")
            raise

    async def _open(self) -> SSEConnection | LongPollConnection:
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
                    return await self._open_sse(offset)
            except trio.TooSlowError:
                raise TransportError(f"opening the wake stream took longer than {self._connect_timeout:g} s") from None
            except SSERefused as exc:
                log.warning("wake.sse_refused", wake_stream=self._path, reason=str(exc), fallback="long-poll")
                self.mode = "long-poll"
        return LongPollConnection(self._client, self._path, offset, self._hold)

    def _rewind(self, why: str) -> None:
        """Deleted and re-created under us: our offset means nothing in the new stream, and a read
        from it would skip what is there. Every wake in the new stream is news: read it all."""
        log.warning("wake.stream_rewound", wake_stream=self._path, offset=self._position.offset, why=why)
        self._position.advance("-1")

    async def _open_sse(self, offset: str) -> SSEConnection:
        try:
            response = await self._client.open_sse(self._path, offset)
        except RequestError as exc:
            if exc.status in _SSE_REFUSED:
                raise SSERefused(str(exc)) from exc
            raise
        content_type = response.headers.get("content-type", "")
        if not content_type.startswith("text/event-stream"):
            await response.aclose()
            raise SSERefused(f"answered {content_type or 'no content type'} to an SSE request")
        return SSEConnection(response, offset)

    async def consume(self, context: StateContext) -> None:
        connection = context.trigger.payload
        assert isinstance(connection, SSEConnection | LongPollConnection)
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

    async def _follow(self, connection: SSEConnection | LongPollConnection, context: StateContext) -> tuple[int, bool]:
        """Relay wakes until the live read ends; returns (messages delivered, stream closed)."""
        delivered = 0
        async with aclosing(connection.frames(self._keepalive)) as frames:
            async for messages, offset, closed in frames:
                delivered += len(messages)
                for message in messages:
                    wake = self._wake_of(message)
                    if wake is not None:
                        await context.emit(Event.WAKE, payload=wake)
                if offset is not None:
                    current = self._position.offset
                    if current is not None and is_after(current, offset):
                        self._rewind(f"the server went back to {offset}")
                        raise StreamRewound(f"the wake stream {self._path} went back from {current} to {offset}")
                    self._position.advance(offset)
                if closed:
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
