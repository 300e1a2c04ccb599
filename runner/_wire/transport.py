"""A lean HTTP/1.1 transport for httpx: h11 over trio sockets, made for the runner's workload.

The runner sends many small requests to one server (claim, read, ack, append) and holds a
few live bodies (SSE) open for hours. httpx's default transport (httpcore) costs about 1 ms
of CPU per request here, mostly pool bookkeeping and separate sends for headers and body
with yields in between. This transport keeps the httpx API (`httpx.AsyncClient(transport=
LeanTransport(...))`, httpx exceptions, streaming responses) and does less:

- one keep-alive pool per (scheme, host, port), at most `max_connections` open at once,
  idle connections reused last-in first-out (the warmest socket, and the oldest ones age out);
- one `send_all` per request: request line, headers and body serialised by h11 into one buffer;
- input bounds (hostile-input issue): a cap on the response head (`max_header_bytes`), on a
  bounded body (`max_body_bytes`), and a total deadline per bounded request (`total_timeout`),
  so a server dripping one byte a second cannot hold a request beyond its deadline.

Bounded and live bodies. A transport cannot see whether httpx will read the body at once or
hand it to the caller as a stream, so every request is bounded unless it says otherwise with
the `LIVE_BODY` request extension::

    request = client.build_request("GET", url, extensions={LIVE_BODY: True})
    response = await client.send(request, stream=True)

A live body has no size cap and no total deadline, only the per-read timeout; it is yielded as
it arrives (never accumulated here), so capping one SSE line or event is the caller's job.
`TOTAL_TIMEOUT` in the request extensions overrides the transport's total deadline for one
request (a long-poll that holds longer than usual).

TLS uses the caller's `ssl.SSLContext`, or a default one created on the first https request:
building a certificate store costs tens of milliseconds that a plain-http client never needs.
"""

from __future__ import annotations

import ssl

import h11
import httpx
import trio

from .connection import (
    LIVE_BODY,
    TOTAL_TIMEOUT,
    BodyTooLarge,
    Budget,
    Connection,
    DeadlineExceeded,
    HeadersTooLarge,
    NoAnswer,
    Origin,
    Pool,
    ResponseTooLarge,
    reason,
)

__all__ = [
    "LIVE_BODY",
    "TOTAL_TIMEOUT",
    "BodyTooLarge",
    "DeadlineExceeded",
    "HeadersTooLarge",
    "LeanTransport",
    "NoAnswer",
    "ResponseTooLarge",
]


_DEFAULT_PORTS = {b"http": 80, b"https": 443}
# Methods a server must treat as safe to repeat (RFC 9110 §9.2.2).
_IDEMPOTENT = frozenset({"GET", "HEAD", "PUT", "DELETE", "OPTIONS", "TRACE"})


class LeanTransport(httpx.AsyncBaseTransport):
    """HTTP/1.1 over h11 and trio, with a small keep-alive pool and input bounds.

    `max_connections` bounds the connections open to one origin at once (size it to the
    runner's concurrency); a request waits for a free one up to its pool timeout.
    `keepalive_expiry` retires idle connections before common server idle timeouts (Node's
    is 5 s) so a request rarely races the server closing the socket.
    """

    def __init__(
        self,
        *,
        max_connections: int = 16,
        ssl_context: ssl.SSLContext | None = None,
        keepalive_expiry: float = 4.0,
        max_header_bytes: int = 64 * 1024,
        max_body_bytes: int = 16 * 1024 * 1024,
        total_timeout: float | None = 60.0,
    ) -> None:
        if max_connections < 1:
            raise ValueError("max_connections must be at least 1")
        self._max_connections = max_connections
        self._ssl_context = ssl_context
        self._keepalive_expiry = keepalive_expiry
        self._max_header_bytes = max_header_bytes
        self._max_body_bytes = max_body_bytes
        self._total_timeout = total_timeout
        self._pools: dict[tuple[bytes, bytes, int | None], Pool] = {}
        self._closed = False

    @property
    def open_connections(self) -> int:
        return sum(len(pool.open) for pool in self._pools.values())

    @property
    def idle_connections(self) -> int:
        return sum(len(pool.idle) for pool in self._pools.values())

    async def aclose(self) -> None:
        """Close every connection, idle or in use; responses still streaming end with a ReadError."""
        self._closed = True
        for pool in self._pools.values():
            pool.close_all()
        await trio.lowlevel.checkpoint()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if self._closed:
            raise httpx.ConnectError("the transport is closed", request=request)
        pool = self._pool_for(request)
        budget = Budget.of(request, self._total_timeout)
        await self._take_slot(pool, request, budget)
        try:
            return await self._exchange(pool, request, budget)
        except BaseException:
            pool.slots.release()
            raise

    def _pool_for(self, request: httpx.Request) -> Pool:
        url = request.url
        key = (url.raw_scheme, url.raw_host, url.port)
        pool = self._pools.get(key)
        if pool is None:
            if url.raw_scheme not in _DEFAULT_PORTS:
                raise httpx.UnsupportedProtocol(f"unsupported URL scheme {url.scheme!r}", request=request)
            port = url.port or _DEFAULT_PORTS[url.raw_scheme]
            origin = Origin(url.raw_scheme, url.raw_host.decode("ascii"), port)
            pool = self._pools[key] = Pool(origin, self._max_connections)
        return pool

    async def _take_slot(self, pool: Pool, request: httpx.Request, budget: Budget) -> None:
        try:
            pool.slots.acquire_nowait()  # the common case: no yield, no cancel scope
        except trio.WouldBlock:
            limit = budget.until(budget.pool)
            with trio.move_on_at(limit) as scope:
                await pool.slots.acquire()
            if scope.cancelled_caught:
                budget.expired(request, limit, httpx.PoolTimeout, budget.pool)

    async def _exchange(self, pool: Pool, request: httpx.Request, budget: Budget) -> httpx.Response:
        """Send the request and read the response head, retrying once where that is safe."""
        body = _body_bytes(request)
        connection = await self._connection(pool, request, budget)
        try:
            return await self._send_and_receive_head(pool, connection, request, body, budget)
        except (httpx.ReadError, httpx.WriteError, httpx.RemoteProtocolError):
            pool.discard(connection)
            if not _may_retry(request, connection, body):
                raise
        except BaseException:
            pool.discard(connection)
            raise
        # The server never saw or never answered the request: one more try on a new connection.
        connection = await self._open(pool, request, budget)
        try:
            return await self._send_and_receive_head(pool, connection, request, body, budget)
        except BaseException:
            pool.discard(connection)
            raise

    async def _connection(self, pool: Pool, request: httpx.Request, budget: Budget) -> Connection:
        """The most recently used idle connection that is still good, else a new one."""
        if pool.idle:
            now = trio.current_time()
            while pool.idle:
                connection = pool.idle.pop()
                if now - connection.idle_since < self._keepalive_expiry and not connection.looks_closed():
                    self._retire_expired(pool, now)
                    return connection
                pool.discard(connection)
        return await self._open(pool, request, budget)

    def _retire_expired(self, pool: Pool, now: float) -> None:
        # LIFO reuse leaves the oldest idle connections at the bottom, where they expire.
        while pool.idle and now - pool.idle[0].idle_since >= self._keepalive_expiry:
            pool.discard(pool.idle.pop(0))

    async def _open(self, pool: Pool, request: httpx.Request, budget: Budget) -> Connection:
        origin = pool.origin
        limit = budget.until(budget.connect)
        opened: list[trio.SocketStream] = []  # so a failure after the TCP connect closes the socket
        try:
            with trio.move_on_at(limit) as scope:
                stream = await self._connect(origin, opened)
        except (trio.BrokenResourceError, OSError) as exc:
            _close_all(opened)
            raise httpx.ConnectError(
                f"cannot connect to {origin.host}:{origin.port}: {reason(exc)}", request=request
            ) from exc
        except BaseException:
            _close_all(opened)
            raise
        if scope.cancelled_caught:
            _close_all(opened)
            budget.expired(request, limit, httpx.ConnectTimeout, budget.connect)
        connection = Connection(stream, opened[0].socket, self._max_header_bytes)
        pool.open.add(connection)
        return connection

    async def _connect(self, origin: Origin, opened: list[trio.SocketStream]) -> trio.abc.Stream:
        socket_stream = await trio.open_tcp_stream(origin.host, origin.port)
        opened.append(socket_stream)
        if origin.scheme != b"https":
            return socket_stream
        tls = trio.SSLStream(socket_stream, self._tls_context(), server_hostname=origin.host, https_compatible=True)
        await tls.do_handshake()
        return tls

    def _tls_context(self) -> ssl.SSLContext:
        if self._ssl_context is None:
            self._ssl_context = ssl.create_default_context()
        return self._ssl_context

    async def _send_and_receive_head(
        self, pool: Pool, connection: Connection, request: httpx.Request, body: bytes | None, budget: Budget
    ) -> httpx.Response:
        connection.received = 0
        await self._send_request(connection, request, body, budget)
        while True:
            event = await connection.next_event(request, budget)
            if isinstance(event, h11.Response):
                break
            if not isinstance(event, h11.InformationalResponse):
                raise httpx.RemoteProtocolError(f"expected a response, got {type(event).__name__}", request=request)
        bounded = not request.extensions.get(LIVE_BODY)
        return httpx.Response(
            event.status_code,
            headers=event.headers.raw_items(),  # as sent (h11 lowercases its own copy)
            stream=_Body(self, pool, connection, request, budget, self._max_body_bytes if bounded else None),
            extensions={"http_version": b"HTTP/" + event.http_version, "reason_phrase": event.reason},
        )

    async def _send_request(
        self, connection: Connection, request: httpx.Request, body: bytes | None, budget: Budget
    ) -> None:
        protocol = connection.h11
        try:
            head = protocol.send(
                h11.Request(method=request.method, target=request.url.raw_path, headers=request.headers.raw)
            )
            if body is not None:
                # The whole request in one buffer: one send, one wake-up of the server.
                data = protocol.send(h11.Data(data=body)) if body else b""
                await connection.send(
                    b"".join((head or b"", data or b"", protocol.send(h11.EndOfMessage()) or b"")), request, budget
                )
                return
            await connection.send(head or b"", request, budget)
            assert isinstance(request.stream, httpx.AsyncByteStream), "an AsyncClient sends async streams"
            async for chunk in request.stream:
                await connection.send(protocol.send(h11.Data(data=chunk)) or b"", request, budget)
            await connection.send(protocol.send(h11.EndOfMessage()) or b"", request, budget)
        except h11.LocalProtocolError as exc:
            raise httpx.LocalProtocolError(f"cannot send this request: {exc}", request=request) from exc

    def _recycle(self, pool: Pool, connection: Connection) -> None:
        """The response is complete: keep the connection for the next request if HTTP allows."""
        if connection.reusable() and not self._closed:
            connection.h11.start_next_cycle()
            connection.served += 1
            connection.idle_since = trio.current_time()
            pool.idle.append(connection)
        else:
            pool.discard(connection)
        pool.slots.release()

    def _abandon(self, pool: Pool, connection: Connection) -> None:
        """The response was not read to its end: its connection is in an unknown place, close it."""
        pool.discard(connection)
        pool.slots.release()


def _close_all(streams: list[trio.SocketStream]) -> None:
    for stream in streams:
        stream.socket.close()


def _body_bytes(request: httpx.Request) -> bytes | None:
    """The request body when it is in memory (and so can be sent with the head and resent)."""
    try:
        return request.content
    except httpx.RequestNotRead:
        return None


def _may_retry(request: httpx.Request, connection: Connection, body: bytes | None) -> bool:
    """Whether a failed attempt can be repeated without risking a request processed twice.

    Only when not one byte of an answer came back, and the body can be sent again. Then
    either the method is idempotent, or the connection came from the idle pool: a reused
    connection that dies before answering is the server closing it while it sat idle, before
    it read our request (the race every keep-alive client has).
    """
    if connection.received or body is None:
        return False
    return connection.served > 0 or request.method in _IDEMPOTENT


class _Body(httpx.AsyncByteStream):
    """A response body read from the connection as the caller iterates it.

    A class with `__anext__` rather than an async generator: httpx may drop the iterator
    mid-stream (a live body closed early), and a suspended generator would be finalised
    later by the event loop with a warning; this one holds nothing that needs finalising.
    """

    def __init__(
        self,
        transport: LeanTransport,
        pool: Pool,
        connection: Connection,
        request: httpx.Request,
        budget: Budget,
        max_bytes: int | None,
    ) -> None:
        self._transport = transport
        self._pool = pool
        self._connection: Connection | None = connection
        self._request = request
        self._budget = budget
        self._max_bytes = max_bytes
        self._seen = 0
        self._next: h11.Event | None = None
        """An event after the data returned last, received with it."""

    def __aiter__(self) -> _Body:
        return self

    async def __anext__(self) -> bytes:
        connection = self._connection
        if connection is None:
            raise StopAsyncIteration
        try:
            event, self._next = self._next, None
            if event is None:
                event = await connection.next_event(self._request, self._budget)
            if isinstance(event, h11.Data):
                # Everything the same socket read brought, as one piece: a live read's server writes
                # each line of an event as a chunk of its own, and each piece costs every layer above.
                pieces = [event.data]
                while (more := connection.buffered_event(self._request)) is not None:
                    if not isinstance(more, h11.Data):
                        self._next = more
                        break
                    pieces.append(more.data)
                data = b"".join(pieces)
        except BaseException:
            self._end(reuse=False)
            raise
        if isinstance(event, h11.Data):
            self._count(len(data))
            return data
        self._end(reuse=isinstance(event, h11.EndOfMessage))
        raise StopAsyncIteration

    def _count(self, size: int) -> None:
        self._seen += size
        if self._max_bytes is not None and self._seen > self._max_bytes:
            self._end(reuse=False)
            raise BodyTooLarge(
                f"response body over the max_body_bytes cap of {self._max_bytes} bytes", request=self._request
            )

    def _end(self, *, reuse: bool) -> None:
        connection, self._connection = self._connection, None
        if connection is None:
            return
        if reuse:
            self._transport._recycle(self._pool, connection)
        else:
            self._transport._abandon(self._pool, connection)

    async def aclose(self) -> None:
        self._end(reuse=False)
