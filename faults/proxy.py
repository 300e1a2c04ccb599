"""A small TCP proxy for fault tests: it can freeze connections without closing them, or cut them."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import trio


class Proxy:
    """Forwards 127.0.0.1:<port> to an upstream loopback port.

    - `freeze()`: stop moving bytes on every open connection and on new ones, keeping the
      sockets open: the peer sees a connection that is alive but silent.
    - `freeze(existing_only=True)`: only the connections open right now go silent.
    - `thaw()`: move bytes again everywhere.
    - `cut()`: close every open connection at once.
    - `refuse()`: cut every open connection and answer every new request with 503, as an
      overloaded load balancer would; `thaw()` ends it. `refuse(401)`: a gateway that refuses
      the token for a while (a rotation gone wrong).

    `on_request(method, target)` is called for every HTTP/1.1 request a client sends through
    it (bodies framed by Content-Length, as the runner's client sends them): a request count.
    """

    def __init__(self, upstream_port: int, on_request: Callable[[str, str], None] | None = None) -> None:
        self.upstream_port = upstream_port
        self._on_request = on_request
        self.port = 0
        self.connections = 0
        self._gates: dict[int, trio.Event] = {}
        self._scopes: dict[int, trio.CancelScope] = {}
        self._new_connections_frozen = False
        self._refusing = False
        self._status = b"503 Service Unavailable"
        self.refused = 0
        self._ids = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        async with trio.open_nursery() as nursery:
            task_status.started()
            await trio.serve_listeners(self._serve, listeners, handler_nursery=nursery)

    def freeze(self, *, existing_only: bool = False) -> None:
        for ident, gate in self._gates.items():
            if gate.is_set():
                self._gates[ident] = trio.Event()
        self._new_connections_frozen = not existing_only

    def refuse(self, status: int = 503) -> None:
        self._status = {503: b"503 Service Unavailable", 401: b"401 Unauthorized"}[status]
        self._refusing = True
        self.cut()

    def thaw(self) -> None:
        self._refusing = False
        self._new_connections_frozen = False
        for gate in self._gates.values():
            gate.set()

    def cut(self) -> None:
        for scope in self._scopes.values():
            scope.cancel()

    async def _serve(self, client: trio.SocketStream) -> None:
        if self._refusing:
            await self._answer_503(client)
            return
        self._ids += 1
        ident = self._ids
        self.connections += 1
        gate = trio.Event()
        if not self._new_connections_frozen:
            gate.set()
        self._gates[ident] = gate
        try:
            with trio.CancelScope() as scope:
                self._scopes[ident] = scope
                try:
                    upstream = await trio.open_tcp_stream("127.0.0.1", self.upstream_port)
                except OSError:
                    await client.aclose()
                    return
                async with client, upstream, trio.open_nursery() as nursery:
                    heads = RequestHeads(self._on_request) if self._on_request is not None else None
                    nursery.start_soon(partial(self._pump, client, upstream, ident, nursery.cancel_scope, heads))
                    nursery.start_soon(partial(self._pump, upstream, client, ident, nursery.cancel_scope))
        finally:
            self._scopes.pop(ident, None)
            self._gates.pop(ident, None)

    async def _answer_503(self, client: trio.SocketStream) -> None:
        async with client:
            try:
                request = b""
                while b"\r\n\r\n" not in request:
                    data = await client.receive_some(65536)
                    if not data:
                        return
                    request += data
                self.refused += 1
                await client.send_all(
                    b"HTTP/1.1 " + self._status + b"\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
                )
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass

    async def _pump(
        self,
        source: trio.SocketStream,
        sink: trio.SocketStream,
        ident: int,
        both: trio.CancelScope,
        heads: RequestHeads | None = None,
    ) -> None:
        try:
            while True:
                await self._gates[ident].wait()
                data = await source.receive_some(65536)
                if not data:
                    break
                if heads is not None:
                    heads.feed(data)
                await self._gates[ident].wait()
                await sink.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        both.cancel()


class RequestHeads:
    """Finds the request lines in one connection's client-to-server bytes."""

    def __init__(self, on_request: Callable[[str, str], None]) -> None:
        self._on_request = on_request
        self._buffer = b""
        self._body_left = 0

    def feed(self, data: bytes) -> None:
        self._buffer += data
        while True:
            if self._body_left:
                skipped = min(self._body_left, len(self._buffer))
                self._buffer, self._body_left = self._buffer[skipped:], self._body_left - skipped
                if self._body_left:
                    return
            end = self._buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            head, self._buffer = self._buffer[:end].decode("latin-1"), self._buffer[end + 4 :]
            request_line, *headers = head.split("\r\n")
            method, target, *_ = request_line.split(" ")
            for header in headers:
                name, _, value = header.partition(":")
                if name.strip().lower() == "content-length":
                    self._body_left = int(value)
            self._on_request(method, target)
