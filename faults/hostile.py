"""A small, real HTTP server on loopback that answers like a Durable Streams server, until told not to.

It serves one wake stream (`wake/pool`, SSE or long-poll) that announces one wake for
subscription `s`, and that subscription's claim, read, ack and release, well enough for a
runner to follow it. A test replaces any answer with one of its own (`answers[...]`):
an answer is an async function that writes whatever bytes it likes to the connection,
at whatever pace, so a test can send endless lines, huge or drip-fed bodies, wrong types,
or answers at once that should have been held. Every request is recorded.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from urllib.parse import parse_qs, urlsplit

import h11
import trio

ROOT = "/v1/stream"
WAKE = f"{ROOT}/wake/pool"
SUBSCRIPTION = f"{ROOT}/__ds/subscriptions/s"
STREAM = f"{ROOT}/jobs/a"
OFFSETS = ("0000_0000", "0000_0001", "0000_0002")


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: bytes
    at: float

    def json(self) -> object:
        return json.loads(self.body) if self.body else None


Answer = Callable[[Request, trio.SocketStream], Awaitable[None]]


def head(status: int, headers: dict[str, str] | None = None, *, length: int | None = 0) -> bytes:
    lines = [f"HTTP/1.1 {status} Whatever"]
    for name, value in (headers or {}).items():
        lines.append(f"{name}: {value}")
    if length is not None:
        lines.append(f"content-length: {length}")
    lines.append("connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def reply(status: int, body: object = None, headers: dict[str, str] | None = None) -> Answer:
    """A complete answer with a JSON body (or none)."""
    payload = b"" if body is None else json.dumps(body).encode()
    all_headers = {"content-type": "application/json", **(headers or {})}

    async def answer(request: Request, stream: trio.SocketStream) -> None:
        await stream.send_all(head(status, all_headers, length=len(payload)) + payload)

    return answer


def wake_event(generation: int = 1, **fields: object) -> dict[str, object]:
    return {"type": "wake", "subscription_id": "s", "stream": "jobs/a", "generation": generation, **fields}


def sse(*events: tuple[str, object], then_idle: float = 3600.0) -> Answer:
    """An SSE answer: the events, then keep-alive comments every half second."""

    async def answer(request: Request, stream: trio.SocketStream) -> None:
        await stream.send_all(head(200, {"content-type": "text/event-stream"}, length=None))
        for name, data in events:
            await stream.send_all(f"event: {name}\ndata: {json.dumps(data)}\n\n".encode())
        with trio.move_on_after(then_idle):
            while True:
                await trio.sleep(0.5)
                await stream.send_all(b": keep-alive\n\n")

    return answer


def the_wake() -> Answer:
    return sse(("data", [wake_event()]), ("control", {"streamNextOffset": OFFSETS[1]}))


def claim_answer(**changes: object) -> dict[str, object]:
    answer: dict[str, object] = {
        "wake_id": "w_1",
        "generation": 1,
        "token": "claim-token",
        "lease_ttl_ms": 30_000,
        "streams": [{"path": "jobs/a", "acked_offset": OFFSETS[0], "tail_offset": OFFSETS[1], "has_pending": True}],
    }
    answer.update(changes)
    return answer


@dataclass
class HostileServer:
    answers: dict[tuple[str, str], Answer] = field(default_factory=dict)
    """(method, path) -> answer; a path with `?live` picks live reads of the wake stream."""
    requests: list[Request] = field(default_factory=list)
    port: int = 0

    def __post_init__(self) -> None:
        defaults: dict[tuple[str, str], Answer] = {
            ("HEAD", WAKE): reply(200, headers={"stream-next-offset": OFFSETS[1]}),
            ("GET", WAKE + "?live"): the_wake(),
            ("POST", SUBSCRIPTION + "/claim"): reply(200, claim_answer()),
            ("GET", STREAM): reply(200, [{"n": 1}], {"stream-next-offset": OFFSETS[1], "stream-up-to-date": "true"}),
            ("POST", SUBSCRIPTION + "/ack"): reply(200, {"ok": True, "next_wake": False}),
            ("POST", SUBSCRIPTION + "/release"): reply(204),
        }
        self.answers = {**defaults, **self.answers}

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def count(self, method: str, path: str) -> int:
        return sum(1 for request in self.requests if request.method == method and request.path == path)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        async with trio.open_nursery() as nursery:
            task_status.started()
            await trio.serve_listeners(self._serve, listeners, handler_nursery=nursery)

    async def _serve(self, stream: trio.SocketStream) -> None:
        async with stream:
            try:
                request = await self._read_request(stream)
                if request is None:
                    return
                self.requests.append(request)
                live = "?live" if "live" in request.query else ""
                answer = self.answers.get((request.method, request.path + live)) or self.answers.get(
                    (request.method, request.path)
                )
                await (answer or reply(404, {"error": {"code": "NOT_FOUND", "message": "no such thing"}}))(
                    request, stream
                )
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass

    async def _read_request(self, stream: trio.SocketStream) -> Request | None:
        received = await receive_request(h11.Connection(h11.SERVER), stream)
        if received is None:
            return None
        head_event, body = received
        target = urlsplit(head_event.target.decode())
        return Request(
            method=head_event.method.decode(),
            path=target.path,
            query={key: values[0] for key, values in parse_qs(target.query).items()},
            headers={name.decode().lower(): value.decode() for name, value in head_event.headers},
            body=body,
            at=trio.current_time(),
        )


async def receive_request(connection: h11.Connection, stream: trio.SocketStream) -> tuple[h11.Request, bytes] | None:
    """One request off `connection`: its head and its body; None if the peer left or sent something else."""
    head_event: h11.Request | None = None
    body = b""
    while True:
        event = connection.next_event()
        if event is h11.NEED_DATA:
            data = await stream.receive_some(65536)
            if not data:
                return None
            connection.receive_data(data)
        elif isinstance(event, h11.Request):
            head_event = event
        elif isinstance(event, h11.Data):
            body += event.data
        elif isinstance(event, h11.EndOfMessage) and head_event is not None:
            return head_event, body
        else:
            return None
