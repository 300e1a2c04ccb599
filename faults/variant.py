"""A second pull-wake server, made from the reference server and a rewriting HTTP proxy.

`VariantServer` forwards every request to a real server (the Node reference server in the
tests) and rewrites the answers where an independently written server behaves differently.
The differences are the ones a Redis-backed server showed (DESIGN.md §2, "Servers differ
where the protocol is silent"); each is a boolean field, all on by default:

- `config_conflict`: a subscription PUT with another configuration answers 409
  `CONFIG_CONFLICT` (the reference says 409 `SUBSCRIPTION_ALREADY_EXISTS`).
- `not_found`: a missing subscription answers 404 `NOT_FOUND` (reference:
  `SUBSCRIPTION_NOT_FOUND`).
- `gone`: ack or release on a deleted subscription answers 410 `SUBSCRIPTION_GONE`
  (reference: 404 `SUBSCRIPTION_NOT_FOUND`; every 404 of an ack or release becomes 410).
- `grant_idle_claims`: a claim with nothing pending is granted (reference: 409
  `NO_PENDING_WORK`). The grant has a fresh wake id, the highest generation this proxy has seen
  for the subscription (0 if none: an empty grant fences nobody), a token of the proxy's own,
  the subscription's `lease_ttl_ms`, and the subscription's linked streams with
  `tail_offset == acked_offset` and `has_pending: false`. Ack and release with that token are
  answered here (200 `{"ok":true,"next_wake":false}` / 204) without forwarding; the acks in them
  are not checked. The real server knows nothing of the grant.
- `quiet_sse`: live SSE reads carry no keep-alives while idle: a `control` event is dropped
  unless it follows a `data` event or says `streamClosed` (so the catch-up `control` of an idle
  stream is dropped too); instead the response ends cleanly every `sse_cycle` seconds.
- `expiring_tokens`: claim answers carry a token alias of the proxy's instead of the real token;
  an alias older than `token_ttl` seconds answers 401 `TOKEN_EXPIRED`; every successful ack answer
  carries `"token"`, a new alias valid for another `token_ttl` (older aliases keep their own expiry).
  Aliases are mapped back to the real token on the way upstream; unknown tokens pass unchanged.
- `clamp_lease`: `lease_ttl_ms` outside 1000..600000 on a subscription PUT is clamped into range
  (reference: 400 `INVALID_REQUEST`).

Every request is recorded in `exchanges` (method, path without query, status answered). Tokens
are never logged or recorded. One request per connection (`connection: close`).

    variant = VariantServer(server.url, sse_cycle=1.0)   # or VariantServer.only(server.url, "gone")
    await nursery.start(variant.run)                     # then talk to variant.url
"""

from __future__ import annotations

import json
import math
import re
import secrets
from collections.abc import AsyncGenerator
from contextlib import aclosing
from dataclasses import dataclass, field, replace
from typing import Any
from urllib.parse import parse_qs, urlsplit

import h11
import httpx
import trio

from faults.hostile import receive_request

DIFFERENCES = (
    "config_conflict",
    "not_found",
    "gone",
    "grant_idle_claims",
    "quiet_sse",
    "expiring_tokens",
    "clamp_lease",
)
LEASE_RANGE = (1_000, 600_000)
SUBSCRIPTION = re.compile(r"/__ds/subscriptions/(?P<id>[^/]+)(?:/(?P<action>[a-z]+))?$")
HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "content-encoding", "host"}


@dataclass(frozen=True)
class Exchange:
    method: str
    path: str
    status: int


@dataclass
class Answer:
    status: int
    headers: list[tuple[str, str]]
    body: bytes

    def json(self) -> Any:
        try:
            return json.loads(self.body) if self.body else None
        except ValueError:
            return None

    @property
    def code(self) -> str | None:
        data = self.json()
        error = data.get("error") if isinstance(data, dict) else None
        return error.get("code") if isinstance(error, dict) else None


def answer(status: int, body: object = None) -> Answer:
    payload = b"" if body is None else json.dumps(body).encode()
    return Answer(status, [("content-type", "application/json")] if payload else [], payload)


def error(status: int, code: str, message: str) -> Answer:
    return answer(status, {"error": {"code": code, "message": message}})


@dataclass
class _Alias:
    real: str | None
    """The real claim token, or None for a claim this proxy granted itself."""
    expires: float


@dataclass(frozen=True)
class _Request:
    method: str
    target: str
    headers: dict[str, str]
    body: bytes

    @property
    def path(self) -> str:
        return urlsplit(self.target).path

    @property
    def bearer(self) -> str:
        return self.headers.get("authorization", "").removeprefix("Bearer ")


@dataclass
class VariantServer:
    """The proxy: `upstream` is the real server's base URL; `url` is this one's once `run` started."""

    upstream: str
    config_conflict: bool = True
    not_found: bool = True
    gone: bool = True
    grant_idle_claims: bool = True
    quiet_sse: bool = True
    expiring_tokens: bool = True
    clamp_lease: bool = True
    sse_cycle: float = 60.0
    token_ttl: float = 300.0
    exchanges: list[Exchange] = field(default_factory=list)
    port: int = 0
    _aliases: dict[str, _Alias] = field(default_factory=dict, init=False, repr=False)
    _generations: dict[str, int] = field(default_factory=dict, init=False, repr=False)
    _http: httpx.AsyncClient = field(init=False, repr=False)

    @classmethod
    def only(cls, upstream: str, *differences: str, sse_cycle: float = 60.0, token_ttl: float = 300.0) -> VariantServer:
        """A variant with just these differences switched on (names from DIFFERENCES)."""
        if unknown := set(differences) - set(DIFFERENCES):
            raise ValueError(f"unknown differences: {sorted(unknown)}")
        variant = cls(upstream, sse_cycle=sse_cycle, token_ttl=token_ttl)
        for name in DIFFERENCES:
            setattr(variant, name, name in differences)
        return variant

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def count(self, method: str, path_suffix: str = "", status: int | None = None) -> int:
        return sum(
            1
            for exchange in self.exchanges
            if exchange.method == method and exchange.path.endswith(path_suffix) and status in (None, exchange.status)
        )

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        self._http = httpx.AsyncClient(timeout=httpx.Timeout(10.0, read=None))
        async with self._http, trio.open_nursery() as nursery:
            task_status.started()
            await trio.serve_listeners(self._serve, listeners, handler_nursery=nursery)

    # --- one connection, one request ------------------------------------------------------

    async def _serve(self, stream: trio.SocketStream) -> None:
        """Answer one request; if the upstream fails, close the connection unanswered."""
        async with stream:
            connection = h11.Connection(h11.SERVER)
            try:
                request = await _read_request(connection, stream)
                if request is None:
                    return
                if request.method == "GET" and parse_qs(urlsplit(request.target).query).get("live") == ["sse"]:
                    await self._sse(connection, stream, request)
                else:
                    await self._send(connection, stream, request, await self._answer(request))
            except (trio.BrokenResourceError, trio.ClosedResourceError, h11.ProtocolError, httpx.TransportError):
                pass

    async def _answer(self, request: _Request) -> Answer:
        match = SUBSCRIPTION.search(request.path)
        action = match["action"] if match else None
        configure = match is not None and action is None and request.method == "PUT"
        if configure and self.clamp_lease:
            request = replace(request, body=_clamped(request.body))
        alias: _Alias | None = None
        if action in ("ack", "release") and (alias := self._aliases.get(request.bearer)) is not None:
            if self.expiring_tokens and alias.expires <= trio.current_time():
                return error(401, "TOKEN_EXPIRED", "Token expired")
            if alias.real is None:
                return self._granted_answer(action)
            request = replace(request, headers={**request.headers, "authorization": f"Bearer {alias.real}"})
        result = await self._forward(request)
        code = result.code
        if configure and result.status == 409 and self.config_conflict:
            return error(409, "CONFIG_CONFLICT", "subscription exists with another configuration")
        if action in ("ack", "release") and result.status == 404 and self.gone:
            return error(410, "SUBSCRIPTION_GONE", "subscription was deleted")
        if result.status == 404 and code == "SUBSCRIPTION_NOT_FOUND" and self.not_found:
            return error(404, "NOT_FOUND", "no such subscription")
        data = result.json()
        if match is not None and action == "claim":
            subscription = match["id"]
            if result.status == 409 and code == "NO_PENDING_WORK" and self.grant_idle_claims:
                return await self._grant(request.path[: match.end("id")], subscription, result)
            if result.status == 200 and isinstance(data, dict):
                if isinstance(data.get("generation"), int):
                    self._generations[subscription] = max(self._generations.get(subscription, 0), data["generation"])
                if self.expiring_tokens and isinstance(data.get("token"), str):
                    return answer(200, {**data, "token": self._alias(data["token"])})
        if action == "ack" and result.status == 200 and self.expiring_tokens and isinstance(data, dict):
            return answer(200, {**data, "token": self._alias(request.bearer)})
        return result

    # --- tokens and grants ----------------------------------------------------------------

    def _alias(self, real: str | None) -> str:
        token = ("vg_" if real is None else "va_") + secrets.token_urlsafe(24)
        self._aliases[token] = _Alias(real, trio.current_time() + self.token_ttl)
        return token

    def _granted_answer(self, action: str) -> Answer:
        if action == "release":
            return answer(204)
        data: dict[str, object] = {"ok": True, "next_wake": False}
        if self.expiring_tokens:
            data["token"] = self._alias(None)
        return answer(200, data)

    async def _grant(self, resource: str, subscription: str, refused: Answer) -> Answer:
        read = await self._forward(_Request("GET", resource, {}, b""))
        config = read.json()
        if read.status != 200 or not isinstance(config, dict):
            return refused
        streams = [
            {
                "path": linked.get("path"),
                "link_type": linked.get("link_type"),
                "acked_offset": linked.get("acked_offset"),
                "tail_offset": linked.get("acked_offset"),
                "has_pending": False,
            }
            for linked in config.get("streams") or []
            if isinstance(linked, dict)
        ]
        grant = {
            "wake_id": f"w_{secrets.token_hex(12)}",
            "generation": self._generations.get(subscription, 0),
            "token": self._alias(None),
            "streams": streams,
            "lease_ttl_ms": config.get("lease_ttl_ms", 30_000),
        }
        return answer(200, grant)

    # --- upstream and downstream ----------------------------------------------------------

    async def _upstream(self, request: _Request) -> httpx.Response:
        headers = {name: value for name, value in request.headers.items() if name not in HOP_BY_HOP}
        headers["accept-encoding"] = "identity"
        url = httpx.URL(self.upstream + request.target)
        built = self._http.build_request(request.method, url, headers=headers, content=request.body)
        return await self._http.send(built, stream=True)

    async def _forward(self, request: _Request) -> Answer:
        response = await self._upstream(request)
        try:
            body = await response.aread()
        finally:
            await response.aclose()
        return Answer(response.status_code, list(response.headers.items()), body)

    async def _send(
        self, connection: h11.Connection, stream: trio.SocketStream, request: _Request, result: Answer
    ) -> None:
        self.exchanges.append(Exchange(request.method, request.path, result.status))
        headers = [(name, value) for name, value in result.headers if name.lower() not in HOP_BY_HOP]
        headers += [("content-length", str(len(result.body))), ("connection", "close")]
        data = connection.send(h11.Response(status_code=result.status, headers=headers)) or b""
        if result.body:
            data += connection.send(h11.Data(data=result.body)) or b""
        await stream.send_all(data + (connection.send(h11.EndOfMessage()) or b""))

    async def _sse(self, connection: h11.Connection, stream: trio.SocketStream, request: _Request) -> None:
        response = await self._upstream(request)
        try:
            if response.status_code != 200:
                body = await response.aread()
                await self._send(
                    connection, stream, request, Answer(response.status_code, [*response.headers.items()], body)
                )
                return
            self.exchanges.append(Exchange(request.method, request.path, 200))
            headers = [(name, value) for name, value in response.headers.items() if name.lower() not in HOP_BY_HOP]
            await stream.send_all(
                connection.send(h11.Response(status_code=200, headers=[*headers, ("connection", "close")])) or b""
            )
            with trio.move_on_after(self.sse_cycle if self.quiet_sse else math.inf):
                previous: str | None = None
                async with aclosing(_events(response)) as events:  # closed here, not by the garbage collector
                    async for name, lines in events:
                        closed = name == "control" and any(
                            '"streamClosed":true' in line.replace(" ", "") for line in lines
                        )
                        if not self.quiet_sse or name != "control" or previous == "data" or closed:
                            await stream.send_all(connection.send(h11.Data(data="".join(lines).encode())) or b"")
                        previous = name
            await stream.send_all(connection.send(h11.EndOfMessage()) or b"")
        finally:
            await response.aclose()


async def _events(response: httpx.Response) -> AsyncGenerator[tuple[str | None, list[str]]]:
    """SSE events as (event name, their lines including the blank line that ends them)."""
    lines: list[str] = []
    async for line in response.aiter_lines():
        lines.append(line + "\n")
        if not line:
            names = [text[6:].strip() for text in lines if text.startswith("event:")]
            yield (names[-1] if names else None), lines
            lines = []


async def _read_request(connection: h11.Connection, stream: trio.SocketStream) -> _Request | None:
    received = await receive_request(connection, stream)
    if received is None:
        return None
    head, body = received
    headers = {name.decode().lower(): value.decode() for name, value in head.headers}
    return _Request(head.method.decode(), head.target.decode(), headers, body)


def _clamped(body: bytes) -> bytes:
    try:
        config = json.loads(body)
    except ValueError:
        return body
    ttl = config.get("lease_ttl_ms") if isinstance(config, dict) else None
    if not isinstance(ttl, int) or isinstance(ttl, bool) or LEASE_RANGE[0] <= ttl <= LEASE_RANGE[1]:
        return body
    return json.dumps({**config, "lease_ttl_ms": min(max(ttl, LEASE_RANGE[0]), LEASE_RANGE[1])}).encode()
