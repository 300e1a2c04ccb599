"""LeanTransport against the real reference server and against small misbehaving servers on loopback.

The misbehaving servers are real trio TCP servers written here, one behaviour each; they count
connections so keep-alive reuse and closing are observed from the server's side.
"""

from __future__ import annotations

import shutil
import ssl
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing, asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import httpx
import pytest
import trio
from httpx_sse import EventSource

from runner._service.devserver import DevServer
from runner._wire.client import StreamsClient, build_http
from runner._wire.transport import (
    LIVE_BODY,
    TOTAL_TIMEOUT,
    BodyTooLarge,
    DeadlineExceeded,
    HeadersTooLarge,
    LeanTransport,
    ResponseTooLarge,
)
from runner.errors import TransportError, Unreachable

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
TIMEOUT = httpx.Timeout(5.0)


# -- a tiny HTTP server that misbehaves on purpose ------------------------------------------


class Requests:
    """Reads whole requests (head and Content-Length or chunked body) from one connection."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self._stream = stream
        self._buffer = b""

    async def next(self) -> bytes | None:
        """The next request's head and body, or None when the client closed the connection."""
        head = await self._until(b"\r\n\r\n")
        if head is None:
            return None
        lowered = head.lower()
        if b"transfer-encoding: chunked" in lowered:
            body = await self._until(b"0\r\n\r\n")
            return head + (body or b"")
        for line in lowered.split(b"\r\n"):
            if line.startswith(b"content-length:"):
                return head + await self._exactly(int(line.split(b":")[1]))
        return head

    async def closed_by_client(self) -> bool:
        """Wait for the client's next move: True when it closed the connection."""
        try:
            return await self._stream.receive_some(1024) == b""
        except trio.BrokenResourceError:
            return True

    async def _until(self, marker: bytes) -> bytes | None:
        while marker not in self._buffer:
            data = await self._receive()
            if not data:
                return None
            self._buffer += data
        end = self._buffer.index(marker) + len(marker)
        found, self._buffer = self._buffer[:end], self._buffer[end:]
        return found

    async def _exactly(self, size: int) -> bytes:
        while len(self._buffer) < size:
            data = await self._receive()
            if not data:
                break
            self._buffer += data
        found, self._buffer = self._buffer[:size], self._buffer[size:]
        return found

    async def _receive(self) -> bytes:
        try:
            return bytes(await self._stream.receive_some(65536))
        except trio.BrokenResourceError:
            return b""


Behaviour = Callable[[trio.abc.Stream, Requests, "Fake"], Awaitable[None]]


@dataclass
class Fake:
    """What the fake server saw."""

    port: int = 0
    scheme: str = "http"
    connections: int = 0
    open_now: int = 0
    open_peak: int = 0
    requests: list[bytes] = field(default_factory=list)
    client_closed: trio.Event = field(default_factory=trio.Event)
    proceed: trio.Event = field(default_factory=trio.Event)
    _changed: trio.Event = field(default_factory=trio.Event)

    def saw(self, request: bytes | None) -> None:
        self.requests.append(request or b"")
        self.changed()

    def changed(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def until(self, predicate: Callable[[], bool]) -> None:
        """Wait for the server to reach a state; woken by each change, never by a guessed delay."""
        with trio.fail_after(5):
            while not predicate():
                await self._changed.wait()

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}"


@asynccontextmanager
async def fake_server(
    behaviour: Behaviour, *, tls: ssl.SSLContext | None = None, scheme: str = "http"
) -> AsyncIterator[Fake]:
    fake = Fake(scheme=scheme)

    async def serve(stream: trio.SocketStream) -> None:
        fake.connections += 1
        fake.open_now += 1
        fake.open_peak = max(fake.open_peak, fake.open_now)
        wrapped: trio.abc.Stream = stream if tls is None else trio.SSLStream(stream, tls, server_side=True)
        try:
            await behaviour(wrapped, Requests(wrapped), fake)
        except trio.BrokenResourceError:
            pass  # the client went away mid-answer: that is what several tests do on purpose
        finally:
            fake.open_now -= 1
            await trio.aclose_forcefully(stream)
            fake.changed()

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, serve, 0, host="127.0.0.1"))
        fake.port = listeners[0].socket.getsockname()[1]
        yield fake
        nursery.cancel_scope.cancel()


async def answer_each(answer: bytes, stream: trio.abc.Stream, requests: Requests, fake: Fake) -> None:
    """A well-behaved keep-alive server: the same answer to every request."""
    while (request := await requests.next()) is not None:
        fake.saw(request)
        await stream.send_all(answer)


def client(fake: Fake | str, transport: LeanTransport, timeout: httpx.Timeout = TIMEOUT) -> httpx.AsyncClient:
    url = fake if isinstance(fake, str) else fake.url
    return httpx.AsyncClient(base_url=url, transport=transport, timeout=timeout)


# -- against the reference server -------------------------------------------------------------


@pytest.fixture
def stream_path(request: pytest.FixtureRequest) -> str:
    return f"/v1/stream/transport-{request.node.name}-{id(request)}"


JSON = {"content-type": "application/json"}


@pytest.mark.server
async def test_create_append_read_head_on_one_connection(shared_server: DevServer, stream_path: str) -> None:
    assert shared_server.url is not None
    transport = LeanTransport(max_connections=4)
    async with client(shared_server.url, transport) as http:
        assert (await http.put(stream_path, headers=JSON)).status_code == 201
        appended = await http.post(stream_path, json={"n": 1})
        assert appended.status_code == 204
        assert appended.content == b""
        read = await http.get(stream_path, params={"offset": "-1"})
        assert read.status_code == 200
        assert read.json() == [{"n": 1}]
        assert read.headers["stream-next-offset"] == appended.headers["stream-next-offset"]
        head = await http.head(stream_path)
        assert head.status_code == 200
        assert head.content == b""
        assert head.headers["stream-next-offset"] == appended.headers["stream-next-offset"]
        assert transport.open_connections == 1


@pytest.mark.server
async def test_long_poll_answers_when_data_arrives(shared_server: DevServer, stream_path: str) -> None:
    assert shared_server.url is not None
    async with client(shared_server.url, LeanTransport(max_connections=4)) as http:
        await http.put(stream_path, headers=JSON)
        tail = (await http.head(stream_path)).headers["stream-next-offset"]
        answers: list[httpx.Response] = []

        async def long_poll() -> None:
            answers.append(await http.get(stream_path, params={"offset": tail, "live": "long-poll"}))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(long_poll)
            # Append until the long-poll has taken something: no guess at when it is parked.
            with trio.fail_after(10):
                while not answers:
                    await http.post(stream_path, json={"late": True})
                    await trio.sleep(0.05)
        assert answers[0].status_code == 200
        assert {"late": True} in answers[0].json()


@pytest.mark.server
async def test_sse_streams_live_and_early_close_drops_the_connection(
    shared_server: DevServer, stream_path: str
) -> None:
    assert shared_server.url is not None
    transport = LeanTransport(max_connections=4, total_timeout=0.5)  # a live body ignores the deadline
    async with client(shared_server.url, transport, httpx.Timeout(5.0, read=None)) as http:
        await http.put(stream_path, headers=JSON)
        await http.post(stream_path, json={"n": 1})
        request = http.build_request(
            "GET", stream_path, params={"offset": "-1", "live": "sse"}, extensions={LIVE_BODY: True}
        )
        response = await http.send(request, stream=True)
        seen: list[object] = []
        # Read the way the runner does: httpx-sse over the streamed response.
        with trio.fail_after(10):
            async with aclosing(EventSource(response).aiter_sse()) as events:
                async for event in events:
                    if event.event != "data":
                        continue
                    seen.extend(event.json())
                    if seen == [{"n": 1}]:
                        await trio.sleep(0.6)  # past the transport's total deadline, on purpose
                        await http.post(stream_path, json={"n": 2})
                    if {"n": 2} in seen:
                        break
        assert seen == [{"n": 1}, {"n": 2}]
        open_before = transport.open_connections
        await response.aclose()
        assert transport.open_connections == open_before - 1
        assert (await http.get(stream_path, params={"offset": "-1"})).json() == [{"n": 1}, {"n": 2}]


# -- keep-alive and the pool ----------------------------------------------------------------------


async def test_sequential_requests_reuse_one_connection() -> None:
    async with fake_server(partial(answer_each, OK)) as fake, client(fake, LeanTransport()) as http:
        for _ in range(5):
            assert (await http.get("/")).text == "ok"
    assert fake.connections == 1
    assert len(fake.requests) == 5


async def test_concurrent_requests_never_open_more_than_the_limit() -> None:
    async def held(stream: trio.abc.Stream, requests: Requests, fake: Fake) -> None:
        while (request := await requests.next()) is not None:
            fake.saw(request)
            await fake.proceed.wait()
            await stream.send_all(OK)

    transport = LeanTransport(max_connections=2)
    async with fake_server(held) as fake, client(fake, transport) as http:
        async with trio.open_nursery() as nursery:
            for _ in range(6):
                nursery.start_soon(http.get, "/")
            await fake.until(lambda: len(fake.requests) == 2)
            fake.proceed.set()
        assert len(fake.requests) == 6
        assert transport.idle_connections == 2
    assert fake.open_peak == 2
    assert fake.connections == 2


async def test_waiting_for_a_connection_is_bounded_by_the_pool_timeout() -> None:
    async def endless(stream: trio.abc.Stream, requests: Requests, fake: Fake) -> None:
        await requests.next()
        await stream.send_all(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1\r\nx\r\n")
        await requests.closed_by_client()

    transport = LeanTransport(max_connections=1)
    async with (
        fake_server(endless) as fake,
        client(fake, transport, httpx.Timeout(5.0, pool=0.2)) as http,
        http.stream("GET", "/", extensions={LIVE_BODY: True}),
    ):
        with trio.fail_after(3), pytest.raises(httpx.PoolTimeout):
            await http.get("/")
    assert fake.connections == 1


async def test_connections_idle_past_the_expiry_are_not_reused() -> None:
    async with fake_server(partial(answer_each, OK)) as fake, client(fake, LeanTransport(keepalive_expiry=0)) as http:
        for _ in range(3):
            assert (await http.get("/")).text == "ok"
    assert fake.connections == 3


async def test_a_cancelled_request_closes_its_connection_and_frees_its_slot() -> None:
    async def slow_then_answer(stream: trio.abc.Stream, requests: Requests, fake: Fake) -> None:
        first = fake.connections == 1
        fake.saw(await requests.next())
        if first:  # never answered: the client cancels it
            await requests.closed_by_client()
            return
        await stream.send_all(OK)

    transport = LeanTransport(max_connections=1)
    async with fake_server(slow_then_answer) as fake, client(fake, transport) as http:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(http.get, "/")
            await fake.until(lambda: len(fake.requests) == 1)
            nursery.cancel_scope.cancel()
        assert transport.open_connections == 0
        await fake.until(lambda: fake.open_now == 0)
        with trio.fail_after(5):
            assert (await http.get("/")).text == "ok"  # the slot came back
    assert fake.connections == 2


async def test_idle_connection_closed_by_the_server_is_replaced() -> None:
    async def answer_once(stream: trio.abc.Stream, requests: Requests, fake: Fake) -> None:
        fake.saw(await requests.next())
        await stream.send_all(OK)  # keep-alive as far as the client knows; then the idle timeout hits

    transport = LeanTransport()
    async with fake_server(answer_once) as fake, client(fake, transport) as http:
        for _ in range(3):
            assert (await http.get("/")).text == "ok"
            await fake.until(lambda: fake.open_now == 0)  # the server closed it before the next request
    assert fake.connections == 3


async def test_post_on_a_reused_connection_closed_before_answering_is_sent_again() -> None:
    async def close_after_one(stream: trio.abc.Stream, requests: Requests, fake: Fake) -> None:
        fake.saw(await requests.next())
        await stream.send_all(OK)
        await requests.next()  # the next request races the idle close: read, never answered

    transport = LeanTransport()
    async with fake_server(close_after_one) as fake, client(fake, transport) as http:
        assert (await http.get("/")).text == "ok"
        assert (await http.post("/append", content=b"x")).text == "ok"
    assert fake.connections == 2
    assert [request.split(b" ")[0] for request in fake.requests] == [b"GET", b"POST"]


async def test_a_fresh_connection_is_retried_once_for_get_and_never_for_post() -> None:
    async def never_answer(stream: trio.abc.Stream, requests: Requests, fake: Fake) -> None:
        fake.saw(await requests.next())

    async with fake_server(never_answer) as fake, client(fake, LeanTransport()) as http:
        with pytest.raises(httpx.RemoteProtocolError, match="without answering"):
            await http.post("/append", content=b"x")
        assert fake.connections == 1
        with pytest.raises(httpx.RemoteProtocolError, match="without answering"):
            await http.get("/")
        assert fake.connections == 3


async def test_connection_close_is_honoured() -> None:
    answer = b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok"
    transport = LeanTransport()
    async with fake_server(partial(answer_each, answer)) as fake, client(fake, transport) as http:
        for _ in range(3):
            assert (await http.get("/")).text == "ok"
            assert transport.open_connections == 0
    assert fake.connections == 3


async def test_framing_chunked_length_and_bodiless_answers_share_one_connection() -> None:
    answers = [
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n",
        b"HTTP/1.1 204 No Content\r\n\r\n",
        b"HTTP/1.1 304 Not Modified\r\nContent-Length: 10\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n",  # the answer to HEAD: no body follows
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nfghij",
    ]

    async def in_turn(stream: trio.abc.Stream, requests: Requests, fake: Fake) -> None:
        for answer in answers:
            fake.saw(await requests.next())
            await stream.send_all(answer)
        await requests.closed_by_client()

    async with fake_server(in_turn) as fake, client(fake, LeanTransport()) as http:
        assert (await http.get("/")).content == b"abcde"
        assert (await http.post("/")).status_code == 204
        not_modified = await http.get("/")
        assert (not_modified.status_code, not_modified.content) == (304, b"")
        head = await http.head("/")
        assert (head.headers["content-length"], head.content) == ("100", b"")
        assert (await http.get("/")).content == b"fghij"
    assert fake.connections == 1


async def test_streamed_request_body_is_sent_chunked() -> None:
    async def parts() -> AsyncIterator[bytes]:
        yield b"hello "
        yield b"world"

    async with fake_server(partial(answer_each, OK)) as fake, client(fake, LeanTransport()) as http:
        assert (await http.post("/", content=parts())).text == "ok"
    assert fake.requests[0].endswith(b"6\r\nhello \r\n5\r\nworld\r\n0\r\n\r\n")


async def test_aclose_closes_pooled_connections() -> None:
    async def then_wait(stream: trio.abc.Stream, requests: Requests, fake: Fake) -> None:
        await requests.next()
        await stream.send_all(OK)
        if await requests.closed_by_client():
            fake.client_closed.set()

    transport = LeanTransport()
    async with fake_server(then_wait) as fake:
        async with client(fake, transport) as http:
            await http.get("/")
            assert transport.idle_connections == 1
        assert transport.open_connections == 0
        with trio.fail_after(5):
            await fake.client_closed.wait()


# -- bounds and timeouts ----------------------------------------------------------------------------


async def test_body_over_the_cap_is_an_error_naming_the_cap() -> None:
    answer = b"HTTP/1.1 200 OK\r\nContent-Length: 5000\r\n\r\n" + b"x" * 5000
    transport = LeanTransport(max_body_bytes=1000)
    async with fake_server(partial(answer_each, answer)) as fake, client(fake, transport) as http:
        with pytest.raises(BodyTooLarge, match="max_body_bytes cap of 1000 bytes") as caught:
            await http.get("/")
        assert isinstance(caught.value, httpx.RemoteProtocolError)
        assert transport.open_connections == 0
        # A live body is the caller's to bound: it streams past the cap.
        async with http.stream("GET", "/", extensions={LIVE_BODY: True}) as live:
            assert len(b"".join([part async for part in live.aiter_bytes()])) == 5000


async def test_endless_chunked_body_stops_at_the_cap() -> None:
    async def endless(stream: trio.abc.Stream, requests: Requests, fake: Fake) -> None:
        await requests.next()
        await stream.send_all(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        while True:
            await stream.send_all(b"400\r\n" + b"y" * 1024 + b"\r\n")

    async with fake_server(endless) as fake, client(fake, LeanTransport(max_body_bytes=100_000)) as http:
        with trio.fail_after(5), pytest.raises(BodyTooLarge):
            await http.get("/")


async def test_oversized_response_head_is_an_error_naming_the_cap() -> None:
    answer = b"HTTP/1.1 200 OK\r\nX-Big: " + b"z" * 100_000 + b"\r\nContent-Length: 0\r\n\r\n"
    async with (
        fake_server(partial(answer_each, answer)) as fake,
        client(fake, LeanTransport(max_header_bytes=16_384)) as http,
    ):
        with pytest.raises(HeadersTooLarge, match="max_header_bytes cap of 16384 bytes") as caught:
            await http.get("/")
    assert isinstance(caught.value, ResponseTooLarge)
    assert fake.connections == 1  # an answer came back: not retried


@pytest.mark.parametrize("per_request", [False, True], ids=["transport-default", "request-extension"])
async def test_drip_fed_body_ends_at_the_total_deadline(per_request: bool) -> None:
    async def drip(stream: trio.abc.Stream, requests: Requests, fake: Fake) -> None:
        await requests.next()
        await stream.send_all(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        while True:
            await stream.send_all(b"1\r\nx\r\n")
            await trio.sleep(0.05)  # the server's pace, not synchronisation

    transport = LeanTransport(total_timeout=60.0 if per_request else 0.5)
    extensions = {TOTAL_TIMEOUT: 0.5} if per_request else {}
    async with fake_server(drip) as fake, client(fake, transport, httpx.Timeout(5.0)) as http:
        started = trio.current_time()
        with pytest.raises(DeadlineExceeded, match=r"total deadline of 0\.5 s"):
            await http.get("/", extensions=extensions)
        assert 0.4 < trio.current_time() - started < 3.0
        assert transport.open_connections == 0


async def test_silent_server_hits_the_read_timeout() -> None:
    async def silent(stream: trio.abc.Stream, requests: Requests, fake: Fake) -> None:
        await requests.next()
        await requests.closed_by_client()

    async with fake_server(silent) as fake, client(fake, LeanTransport(), httpx.Timeout(5.0, read=0.3)) as http:
        started = trio.current_time()
        with pytest.raises(httpx.ReadTimeout) as caught:
            await http.get("/")
        assert not isinstance(caught.value, DeadlineExceeded)
        assert 0.25 < trio.current_time() - started < 3.0
    assert fake.connections == 1  # a timeout is not retried


async def test_a_server_that_stops_reading_hits_the_write_timeout() -> None:
    async def deaf(stream: trio.abc.Stream, requests: Requests, fake: Fake) -> None:
        await trio.sleep_forever()  # never reads: the client's send buffer fills up

    timeout = httpx.Timeout(5.0, write=0.3)
    async with fake_server(deaf) as fake, client(fake, LeanTransport(), timeout) as http:
        with trio.fail_after(5), pytest.raises(httpx.WriteTimeout):
            await http.post("/", content=b"w" * 64_000_000)
    assert fake.connections == 1


async def test_closing_a_streamed_response_early_closes_its_connection() -> None:
    async def streaming(stream: trio.abc.Stream, requests: Requests, fake: Fake) -> None:
        await requests.next()
        await stream.send_all(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nfirst\r\n")
        if await requests.closed_by_client():
            fake.client_closed.set()

    transport = LeanTransport()
    async with fake_server(streaming) as fake, client(fake, transport) as http:
        async with http.stream("GET", "/", extensions={LIVE_BODY: True}) as response:
            async for part in response.aiter_bytes():
                assert part == b"first"
                break
        assert transport.open_connections == 0
        with trio.fail_after(5):
            await fake.client_closed.wait()


async def test_chunks_of_a_live_body_that_came_together_are_handed_on_as_one_piece() -> None:
    """A live read's server writes each line of an SSE event as a chunk of its own: what one
    socket read brought goes up in one piece, not one pass of every layer per chunk."""
    sent = trio.Event()

    async def streaming(stream: trio.abc.Stream, requests: Requests, fake: Fake) -> None:
        await requests.next()
        await stream.send_all(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nc\r\nevent: data\n\r\n8\r\ndata: 1\n\r\n1\r\n\n\r\n"
        )
        await sent.wait()
        await stream.send_all(b"2\r\nab\r\n0\r\n\r\n")
        await requests.closed_by_client()

    async with (
        fake_server(streaming) as fake,
        client(fake, LeanTransport()) as http,
        http.stream("GET", "/", extensions={LIVE_BODY: True}) as response,
    ):
        parts = response.aiter_bytes()
        with trio.fail_after(5):
            # Head and body went in one write: the socket read that brought the head brought it all.
            assert await anext(parts) == b"event: data\ndata: 1\n\n"
        sent.set()
        assert [part async for part in parts] == [b"ab"]
        assert response.is_stream_consumed


async def test_refused_connection_is_a_connect_error() -> None:
    with trio.socket.socket() as probe:
        await probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    async with client(f"http://127.0.0.1:{port}", LeanTransport()) as http:
        with pytest.raises(httpx.ConnectError, match="Connection refused"):
            await http.get("/")


async def _hang_up(stream: trio.abc.Stream, requests: Requests, fake: Fake) -> None:
    await requests.next()  # and close without a word: a server going down


async def _garble(stream: trio.abc.Stream, requests: Requests, fake: Fake) -> None:
    await requests.next()
    await stream.send_all(b"NOT HTTP AT ALL\r\n\r\n")


async def test_a_server_that_gives_no_answer_is_unreachable_one_that_answers_badly_is_not() -> None:
    """What the reconnect backoff tells apart (runner/_wire/retrying.py `next_attempt`): refused or hung
    up on before any answer is `Unreachable` (asked again soon); a garbled answer is an answer."""
    with trio.socket.socket() as probe:
        await probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    async with build_http(f"http://127.0.0.1:{port}", timeout=5) as http:
        with pytest.raises(Unreachable, match="refused"):
            await StreamsClient(http).tail("jobs")
    async with fake_server(_hang_up) as fake, build_http(fake.url, timeout=5) as http:
        with pytest.raises(Unreachable, match="without answering"):
            await StreamsClient(http).tail("jobs")
    async with fake_server(_garble) as fake, build_http(fake.url, timeout=5) as http:
        with pytest.raises(TransportError) as caught:
            await StreamsClient(http).tail("jobs")
        assert not isinstance(caught.value, Unreachable)


# -- TLS ----------------------------------------------------------------------------------------------


async def test_plain_http_never_builds_a_tls_context() -> None:
    transport = LeanTransport()
    async with fake_server(partial(answer_each, OK)) as fake, client(fake, transport) as http:
        await http.get("/")
    assert transport._ssl_context is None


@pytest.fixture
def certificate(tmp_path: Path) -> tuple[Path, Path]:
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [
            *("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1"),
            *("-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)),
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    return cert, key


async def test_https_with_the_callers_context_and_a_named_verification_failure(
    certificate: tuple[Path, Path],
) -> None:
    cert, key = certificate
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.load_cert_chain(cert, key)
    async with fake_server(partial(answer_each, OK), tls=server_context, scheme="https") as fake:
        trusting = LeanTransport(ssl_context=ssl.create_default_context(cafile=str(cert)))
        async with client(fake, trusting) as http:
            for _ in range(2):
                assert (await http.get("/")).text == "ok"
        assert fake.connections == 1
        async with client(fake, LeanTransport()) as http:
            with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
                await http.get("/")


# -- the runner's client over either transport ------------------------------------------------


async def test_httpx_own_transport_keeps_httpx_behaviour_proxies_from_the_environment_included(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`http_transport = "httpx"` is the compatible choice: HTTP_PROXY is honoured as httpx documents."""
    async with fake_server(partial(answer_each, OK)) as proxy:
        for name in ("NO_PROXY", "no_proxy", "ALL_PROXY", "all_proxy"):
            monkeypatch.delenv(name, raising=False)
        monkeypatch.setenv("HTTP_PROXY", proxy.url)
        async with build_http("http://127.0.0.1:9", timeout=5, transport="httpx") as http:
            response = await http.exchange(
                "GET", "/v1/stream/a", params={"offset": "-1"}, headers={}, content=None, timeout=5, extensions={}
            )
    assert response.status_code == 200
    assert proxy.requests[0].startswith(b"GET http://127.0.0.1:9/v1/stream/a?offset=-1 HTTP/1.1")


@pytest.mark.parametrize("transport", ["lean", "httpx"])
async def test_credentials_in_the_server_url_go_with_every_request(transport: str) -> None:
    async with fake_server(partial(answer_each, OK)) as fake:
        url = fake.url.replace("http://", "http://user:secret@")
        async with build_http(url, timeout=5, transport=transport) as http:
            await http.exchange("POST", "/x", params=None, headers={}, content=b"{}", timeout=5, extensions={})
    assert b"authorization: basic dxnlcjpzzwnyzxq=" in fake.requests[0].lower()


async def test_the_lean_short_path_sends_what_the_client_would() -> None:
    """Default headers, the caller's headers and the query string, as `AsyncClient.request` would send them."""
    async with fake_server(partial(answer_each, OK)) as fake, build_http(fake.url, timeout=5) as http:
        await http.exchange(
            "POST",
            "/v1/stream/a%20b",
            params={"offset": "0000000000000000_0000000000000013", "live": "long-poll"},
            headers={"Authorization": "Bearer t", "Content-Type": "application/json"},
            content=b"{}",
            timeout=5,
            extensions={},
        )
        await http.request(
            "POST",
            "/v1/stream/a%20b",
            params={"offset": "0000000000000000_0000000000000013", "live": "long-poll"},
            headers={"Authorization": "Bearer t", "Content-Type": "application/json"},
            content=b"{}",
        )
    short, full = fake.requests
    assert short == full
