"""One HTTP/1.1 connection of the lean transport, the pool it lives in, and the budgets that bound it.

A `Connection` is h11 over one trio stream (TCP or TLS); a `Pool` keeps the idle ones of
one origin, most recently used first, and never opens more than its slots; a `Budget`
bounds one request in bytes and in total time. Used only by runner/_wire/transport.py.
"""

from __future__ import annotations

import math
import select
from collections.abc import Mapping
from dataclasses import dataclass
from typing import NoReturn

import h11
import httpx
import trio

LIVE_BODY = "pullwake.live_body"
"""Request extension: the response body is a live stream (no size cap, no total deadline)."""

TOTAL_TIMEOUT = "pullwake.total_timeout"
"""Request extension: this request's total deadline in seconds (None: none), instead of the transport's."""

# One receive per wake-up: large enough for a whole small answer, small enough to stay bounded.
READ_SIZE = 64 * 1024


class NoAnswer(httpx.RemoteProtocolError):
    """The server closed the connection before sending a single byte of an answer."""


class ResponseTooLarge(httpx.RemoteProtocolError):
    """The server sent more than a configured cap allows; the connection is closed."""


class HeadersTooLarge(ResponseTooLarge):
    """The response head is over `max_header_bytes`."""


class BodyTooLarge(ResponseTooLarge):
    """A bounded response body is over `max_body_bytes`."""


class DeadlineExceeded(httpx.ReadTimeout):
    """A bounded request did not finish (body included) within its total deadline."""


@dataclass(frozen=True, slots=True)
class Origin:
    scheme: bytes
    host: str
    port: int


@dataclass(slots=True)
class Budget:
    """The time limits of one request: per-phase timeouts and an absolute total deadline."""

    connect: float | None
    read: float | None
    write: float | None
    pool: float | None
    deadline: float
    total: float | None

    @classmethod
    def of(cls, request: httpx.Request, default_total: float | None) -> Budget:
        timeouts: Mapping[str, float | None] = request.extensions.get("timeout", {})
        total = None if request.extensions.get(LIVE_BODY) else request.extensions.get(TOTAL_TIMEOUT, default_total)
        return cls(
            connect=timeouts.get("connect"),
            read=timeouts.get("read"),
            write=timeouts.get("write"),
            pool=timeouts.get("pool"),
            deadline=math.inf if total is None else trio.current_time() + total,
            total=total,
        )

    def until(self, timeout: float | None) -> float:
        """The moment an operation with `timeout` must give up: its own limit or the deadline."""
        if timeout is None:
            return self.deadline
        return min(self.deadline, trio.current_time() + timeout)

    def expired(
        self, request: httpx.Request, limit: float, phase: type[httpx.TimeoutException], timeout: float | None
    ) -> NoReturn:
        """Raise the right timeout: the total deadline's own error, or the phase's."""
        if limit >= self.deadline:
            raise DeadlineExceeded(
                f"the request did not finish within its total deadline of {self.total:g} s", request=request
            )
        raise phase(f"{_PHASE_NAMES[phase]} timed out after {timeout:g} s", request=request)


_PHASE_NAMES: dict[type[httpx.TimeoutException], str] = {
    httpx.ConnectTimeout: "connecting",
    httpx.ReadTimeout: "waiting for the server",
    httpx.WriteTimeout: "sending the request",
    httpx.PoolTimeout: "waiting for a free connection",
}


class Connection:
    """One HTTP/1.1 connection: a trio stream (TLS or not) and its h11 state machine."""

    __slots__ = ("_socket", "h11", "idle_since", "max_header_bytes", "received", "served", "stream")

    def __init__(self, stream: trio.abc.Stream, socket: trio.socket.SocketType, max_header_bytes: int) -> None:
        self.stream = stream
        self._socket = socket
        self.max_header_bytes = max_header_bytes
        self.h11 = h11.Connection(h11.CLIENT, max_incomplete_event_size=max_header_bytes)
        self.idle_since = 0.0
        self.served = 0
        """Requests finished on this connection: above zero, it came from the idle pool."""
        self.received = 0
        """Bytes received for the current request: zero means the server never answered it."""

    def close(self) -> None:
        # Closing the socket directly is synchronous, so it works in `finally` blocks and
        # under cancellation; TLS close_notify is not worth waiting for on a discarded socket.
        self._socket.close()

    def looks_closed(self) -> bool:
        """An idle connection should be silent: readable means the server closed it (or broke framing)."""
        try:
            poller = select.poll()
            poller.register(self._socket.fileno(), select.POLLIN)
            return bool(poller.poll(0))
        except (OSError, ValueError):
            return True

    def reusable(self) -> bool:
        return self.h11.our_state is h11.DONE and self.h11.their_state is h11.DONE

    async def send(self, data: bytes, request: httpx.Request, budget: Budget) -> None:
        limit = budget.until(budget.write)
        try:
            if limit == math.inf:
                await self.stream.send_all(data)
                return
            with trio.move_on_at(limit) as scope:
                await self.stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            raise httpx.WriteError(f"sending the request failed: {reason(exc)}", request=request) from exc
        if scope.cancelled_caught:
            budget.expired(request, limit, httpx.WriteTimeout, budget.write)

    async def next_event(self, request: httpx.Request, budget: Budget) -> h11.Event:
        """The next response event, receiving from the socket only when h11 needs more bytes."""
        while True:
            try:
                event = self.h11.next_event()
            except h11.RemoteProtocolError as exc:
                raise self._protocol_error(exc, request) from exc
            if event is h11.NEED_DATA:
                self.h11.receive_data(await self._receive(request, budget))
            elif event is h11.PAUSED:
                raise httpx.RemoteProtocolError("the server sent data after the response", request=request)
            else:
                assert isinstance(event, h11.Event)
                return event

    def buffered_event(self, request: httpx.Request) -> h11.Event | None:
        """The next response event if the bytes received already hold it, else None (no socket read)."""
        try:
            event = self.h11.next_event()
        except h11.RemoteProtocolError as exc:
            raise self._protocol_error(exc, request) from exc
        if event is h11.NEED_DATA:
            return None
        if event is h11.PAUSED:
            raise httpx.RemoteProtocolError("the server sent data after the response", request=request)
        assert isinstance(event, h11.Event)
        return event

    async def _receive(self, request: httpx.Request, budget: Budget) -> bytes:
        limit = budget.until(budget.read)
        try:
            if limit == math.inf:
                data = await self.stream.receive_some(READ_SIZE)
            else:
                with trio.move_on_at(limit) as scope:
                    data = await self.stream.receive_some(READ_SIZE)
                if scope.cancelled_caught:
                    budget.expired(request, limit, httpx.ReadTimeout, budget.read)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            raise httpx.ReadError(f"receiving the response failed: {reason(exc)}", request=request) from exc
        self.received += len(data)
        return data if isinstance(data, bytes) else bytes(data)

    def _protocol_error(self, exc: h11.RemoteProtocolError, request: httpx.Request) -> httpx.RemoteProtocolError:
        if self.received == 0:  # h11 fails on EOF before any byte: the server closed without a word
            return NoAnswer("the server closed the connection without answering", request=request)
        if exc.error_status_hint == 431:  # h11's "receive buffer too long": an unfinished head over the cap
            return HeadersTooLarge(
                f"response head over the max_header_bytes cap of {self.max_header_bytes} bytes", request=request
            )
        return httpx.RemoteProtocolError(f"malformed response: {exc}", request=request)


def reason(exc: BaseException) -> str:
    """The underlying cause of a stream error, named (trio wraps OSError and SSLError)."""
    if isinstance(exc, trio.BrokenResourceError) and exc.__cause__ is not None:
        exc = exc.__cause__
    text = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    attempts = exc.__cause__
    if isinstance(attempts, BaseExceptionGroup):  # trio.open_tcp_stream: one error per address tried
        text += " (" + "; ".join(reason(attempt) for attempt in attempts.exceptions) + ")"
    return text


class Pool:
    """The connections to one origin: the idle ones on a stack, and a slot per request in flight."""

    __slots__ = ("idle", "open", "origin", "slots")

    def __init__(self, origin: Origin, limit: int) -> None:
        self.origin = origin
        self.idle: list[Connection] = []
        self.open: set[Connection] = set()
        # A slot is held by each request from start to the end of its response. Requests take
        # an idle connection when there is one and open a new one only when none is idle, so
        # open connections never exceed the slots.
        self.slots = trio.Semaphore(limit)

    def discard(self, connection: Connection) -> None:
        connection.close()
        self.open.discard(connection)

    def close_all(self) -> None:
        for connection in list(self.open):
            self.discard(connection)
        self.idle.clear()
