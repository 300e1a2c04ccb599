"""The Durable Streams wire over HTTP: the `Wire` protocol carried out with httpx.

Every request carries a timeout, except reading the body of a live SSE stream,
which the caller watches (keep-alive watchdog, liveness heartbeat). The service
token goes on every request except ack and release, which carry the claim token.
Tokens never appear in reprs, logs or errors. httpx's exceptions are mapped to
ours in one place, `_translated`.
"""

from __future__ import annotations

import functools
import json
import ssl
from collections.abc import AsyncGenerator, Iterator, Mapping, Sequence
from contextlib import aclosing, contextmanager, suppress
from typing import Any
from urllib.parse import quote, urlencode

import httpx
import structlog
import trio
from pydantic import SecretStr

from ..errors import ProtocolError, RequestError, SubscriptionNotFound, TransportError, Unreachable
from .answers import (
    KNOWN_CODES,
    ClaimAnswer,
    Route,
    check_sse_answer,
    control_frame,
    data_frame,
    json_of,
    linked_streams,
    next_offset_of,
    parse,
    raise_for_status,
    read_result,
    refreshed_token,
    server_subscription,
)
from .protocol import (
    ALREADY_APPENDED,
    JSON,
    Ack,
    AckAnswer,
    Claim,
    ClaimedStream,
    Frame,
    Links,
    Producer,
    ReadResult,
    ServerSubscription,
)
from .sse import OVERSIZE, sse_events
from .transport import LIVE_BODY, TOTAL_TIMEOUT, LeanTransport, NoAnswer

log = structlog.get_logger("pullwake.wire")

# Distinct unknown error codes reported, at most: a server inventing codes cannot flood the log.
_MAX_UNKNOWN_CODES = 64
LINGER_BELOW = 16 * 1024
"""A read of a live body smaller than this waits its `linger` before the next (a larger one is catching up)."""

# Characters left alone in stream paths: the server keys streams by the raw path.
_PATH_SAFE = "/%:@!$&'()*+,;=-._~"


def tls_context(*, https: bool, verify: bool, ca_file: str | None) -> ssl.SSLContext:
    """The TLS context of a runner, built once for its whole life.

    Loading the system's certificate store costs tens of milliseconds; a plain
    http:// server never needs it, so it then gets an empty context that is never used.
    """
    if not https:
        return ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    if not verify:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        return context
    return ssl.create_default_context(cafile=ca_file)


class WireHTTP(httpx.AsyncClient):
    """The runner's HTTP client: an `httpx.AsyncClient` with a short path for the wire's requests.

    Over the lean transport, `exchange` hands a request straight to it: no cookie jar,
    auth flow, redirect handling or event hooks, none of which the wire uses. That is
    ~0.3 ms less CPU per request than `request()` on a small machine, three times per
    claim. Over httpx's own transport (`http_transport = "httpx"`, the compatible
    choice) every request takes httpx's full path: proxies from the environment,
    credentials in the server URL, and the rest behave as httpx documents.
    """

    def __init__(self, server_url: str, *, lean: LeanTransport | None, timeout: float, **kwargs: Any) -> None:
        super().__init__(base_url=server_url, transport=lean, timeout=timeout, follow_redirects=False, **kwargs)
        # A server URL with credentials gets them from httpx's auth flow, on every path alike.
        self._direct = lean if lean is not None and not self.base_url.userinfo else None
        self._origin = str(self.base_url).rstrip("/")

    async def exchange(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, str] | None,
        headers: Mapping[str, str],
        content: bytes | None,
        timeout: float,
        extensions: dict[str, Any],
    ) -> httpx.Response:
        """One request to `path` under the server URL, its whole answer read."""
        if self._direct is None:
            return await self.request(
                method, path, params=params, headers=headers, content=content, timeout=timeout, extensions=extensions
            )
        url = f"{self._origin}{path}?{urlencode(params)}" if params else self._origin + path
        merged = self.headers.copy()
        merged.update(headers)
        request = httpx.Request(
            method, url, headers=merged, content=content, extensions={"timeout": _timeouts(timeout), **extensions}
        )
        response = await self._direct.handle_async_request(request)
        response.request = request
        try:
            await response.aread()
        finally:
            await response.aclose()
        return response


@functools.cache
def _timeouts(seconds: float) -> dict[str, float | None]:
    """The transport's timeout extension for one value, built once (transports only read it)."""
    return httpx.Timeout(seconds).as_dict()


def build_http(
    server_url: str,
    *,
    timeout: float,
    tls: ssl.SSLContext | None = None,
    concurrency: int = 16,
    transport: str = "lean",
    deadline: float = 60.0,
    max_body_bytes: int = 16 * 1024 * 1024,
) -> WireHTTP:
    """An HTTP client sized for `concurrency` claims plus the live stream, heartbeat and control.

    Each claim may have two requests in flight (its first read goes out beside the claim).
    The lean transport (runner/_wire/transport.py) bounds every answer's size and every
    request's total time (`deadline`, `max_body_bytes`); bodies come uncompressed, so
    the bound is the size that reaches memory. httpx's own transport ("httpx") bounds
    neither. Either pool is kept close to what is used.
    """
    if tls is None:
        tls = tls_context(https=server_url.startswith("https:"), verify=True, ca_file=None)
    connections = 2 * concurrency + 16
    if transport == "lean":
        lean = LeanTransport(
            max_connections=connections, ssl_context=tls, max_body_bytes=max_body_bytes, total_timeout=deadline
        )
        return WireHTTP(server_url, lean=lean, timeout=timeout, headers={"Accept-Encoding": "identity"})
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=concurrency + 4)
    return WireHTTP(server_url, lean=None, timeout=timeout, verify=tls, limits=limits)


@contextmanager
def _translated(what: str) -> Iterator[None]:
    """httpx's failures as ours: the only place that knows httpx's exception hierarchy."""
    try:
        yield
    except httpx.TimeoutException as exc:
        raise TransportError(f"{what}: timed out ({type(exc).__name__}: {_reason(exc)})") from exc
    except httpx.DecodingError as exc:
        raise ProtocolError(f"{what}: undecodable body: {_reason(exc)}") from exc
    except (httpx.ConnectError, httpx.ReadError, httpx.WriteError, NoAnswer) as exc:
        raise Unreachable(f"{what}: {type(exc).__name__}: {_reason(exc)}") from exc
    except httpx.RemoteProtocolError as exc:
        if _NO_ANSWER in str(exc):  # httpx's own transport (http_transport = "httpx")
            raise Unreachable(f"{what}: {type(exc).__name__}: {_reason(exc)}") from exc
        raise TransportError(f"{what}: {type(exc).__name__}: {_reason(exc)}") from exc
    except httpx.TransportError as exc:
        raise TransportError(f"{what}: {type(exc).__name__}: {_reason(exc)}") from exc


_NO_ANSWER = "without sending a response"
"""How httpcore says that the server closed the connection before answering."""


def _reason(exc: BaseException) -> str:
    """What went wrong, even when the exception's own text is empty (a failed TLS check, say)."""
    text = str(exc)
    cause = exc.__cause__ or exc.__context__
    while not text and cause is not None:
        text = str(cause) or type(cause).__name__
        cause = cause.__cause__ or cause.__context__
    return text or "no reason given"


class SSERead:
    """An open `live=sse` read: `data` events carry messages, `control` events the offset."""

    def __init__(
        self, response: httpx.Response, offset: str, what: str, max_event_bytes: int, *, linger: float = 0.0
    ) -> None:
        self._response = response
        self._what = what
        self._max_event_bytes = max_event_bytes
        self._linger = linger
        self.offset = offset

    async def _chunks(self) -> AsyncGenerator[bytes, None]:
        """The body as it comes; with `linger`, each read waits that long after a small one.

        A reader that need not hear each event at once (the fleet stream) then takes what
        came meanwhile in one read: one wake-up and one pass of every layer for several
        events, not one per event. A read that was not small (catching up) is not delayed.
        """
        async for chunk in self._response.aiter_bytes():
            yield chunk
            if self._linger and len(chunk) < LINGER_BELOW:
                await trio.sleep(self._linger)

    async def aclose(self) -> None:
        await self._response.aclose()

    async def frames(self) -> AsyncGenerator[Frame, None]:
        # No watchdog here: whether silence means death is the follower's call (it asks the
        # liveness probes too), and a read cancelled mid-event could not be resumed.
        chunks = self._chunks()
        events = sse_events(chunks, max_event_bytes=self._max_event_bytes)
        async with aclosing(chunks), aclosing(events):
            while True:
                with _translated(self._what):
                    try:
                        sse = await anext(events)
                    except StopAsyncIteration:
                        return
                if sse.event == "data":
                    yield data_frame(sse.data, self._what)
                elif sse.event == "control":
                    yield control_frame(sse.data, self._what)
                elif sse.event == OVERSIZE:
                    yield Frame([], None, unusable=f"{self._what}: an event over {self._max_event_bytes} bytes")
                # Other event types belong to newer protocol versions: ignore them.


class StreamsClient:
    """The `Wire` over HTTP, to one Durable Streams server."""

    def __init__(
        self,
        http: WireHTTP,
        *,
        stream_root: str = "/v1/stream",
        token: SecretStr | None = None,
        timeout: float = 10.0,
        deadline: float = 60.0,
        max_event_bytes: int = 1024 * 1024,
    ) -> None:
        self._http = http
        self._root = stream_root.rstrip("/")
        self._token = token
        self.timeout = timeout
        self._deadline = deadline
        self._max_event_bytes = max_event_bytes
        self._unknown_codes: set[tuple[str, int, str]] = set()

    def __repr__(self) -> str:
        return f"StreamsClient({str(self._http.base_url)!r}, stream_root={self._root!r})"

    # -- addresses -------------------------------------------------------------------------

    def stream_url(self, path: str) -> str:
        return f"{self._root}/{quote(path.strip('/'), safe=_PATH_SAFE)}"

    def subscription_url(self, subscription_id: str, action: str = "") -> str:
        base = f"{self._root}/__ds/subscriptions/{quote(subscription_id, safe='')}"
        return f"{base}/{action}" if action else base

    def _authorization(self, claim_token: SecretStr | None = None) -> dict[str, str]:
        token = claim_token if claim_token is not None else self._token
        return {} if token is None else {"Authorization": f"Bearer {token.get_secret_value()}"}

    # -- plumbing --------------------------------------------------------------------------

    async def _request(
        self,
        method: str,
        url: str,
        *,
        what: str,
        params: Mapping[str, str] | None = None,
        json_body: object = None,
        headers: Mapping[str, str] | None = None,
        claim_token: SecretStr | None = None,
        timeout: float | None = None,
        hold: float = 0.0,
        route: Route = "stream",
    ) -> httpx.Response:
        """Send one request and return its answer, which must be a 2xx.

        The whole request, body included, ends within the deadline (plus `hold`, the time
        the server may hold a long-poll on purpose).
        """
        all_headers = self._authorization(claim_token)
        if headers:
            all_headers.update(headers)
        content: bytes | None = None
        if json_body is not None:
            content = json.dumps(json_body, separators=(",", ":")).encode()
            all_headers["Content-Type"] = JSON
        with _translated(what):
            response = await self._http.exchange(
                method,
                url,
                params=params,
                content=content,
                headers=all_headers,
                timeout=timeout if timeout is not None else self.timeout,
                extensions={TOTAL_TIMEOUT: self._deadline + hold},
            )
        try:
            raise_for_status(response, what=what, route=route)
        except RequestError as exc:
            self._note_unknown_code(route, exc)
            raise
        return response

    def _note_unknown_code(self, route: Route, error: RequestError) -> None:
        """Say once per (route, status, code) that the server answered a code of its own, and what it counts as."""
        if error.code is None or error.code in KNOWN_CODES:
            return
        key = (route, error.status, error.code)
        if key in self._unknown_codes or len(self._unknown_codes) >= _MAX_UNKNOWN_CODES:
            return
        self._unknown_codes.add(key)
        log.warning(
            "answer.unknown_code",
            route=route,
            status=error.status,
            code=error.code[:80],
            treated_as=type(error).__name__,
            detail="a code the reference server does not answer: classified by its status and route "
            "(said once per code)",
        )

    # -- streams ---------------------------------------------------------------------------

    async def create_stream(self, path: str, *, content_type: str = JSON) -> bool:
        response = await self._request(
            "PUT", self.stream_url(path), what=f"create stream {path}", headers={"Content-Type": content_type}
        )
        return response.status_code == 201

    async def append(self, path: str, message: object, *, producer: Producer | None = None) -> str:
        what = f"append to {path}"
        headers = producer.headers() if producer is not None else None
        response = await self._request("POST", self.stream_url(path), what=what, json_body=message, headers=headers)
        if producer is not None and response.status_code == 204:
            return ALREADY_APPENDED  # a repeat: the reference server answers 204 without an offset
        return next_offset_of(response, what=what)

    async def tail(self, path: str, *, timeout: float | None = None) -> str:
        what = f"HEAD {path}"
        response = await self._request("HEAD", self.stream_url(path), what=what, timeout=timeout)
        return next_offset_of(response, what=what)

    async def read(self, path: str, offset: str) -> ReadResult:
        what = f"read {path} from {offset}"
        response = await self._request("GET", self.stream_url(path), what=what, params={"offset": offset})
        return read_result(response, what=what)

    async def long_poll(self, path: str, offset: str, *, hold: float) -> ReadResult:
        what = f"long-poll {path} from {offset}"
        response = await self._request(
            "GET",
            self.stream_url(path),
            what=what,
            params={"offset": offset, "live": "long-poll"},
            timeout=hold + self.timeout,
            hold=hold,
        )
        return read_result(response, what=what)

    async def open_sse(self, path: str, offset: str, *, linger: float = 0.0) -> SSERead:
        """Returns once the answer's headers are in; reading the body has no timeout.

        `linger`: seconds each small read of the body waits before the next (`SSERead`).
        """
        what = f"SSE {path} from {offset}"
        request = self._http.build_request(
            "GET",
            self.stream_url(path),
            params={"offset": offset, "live": "sse"},
            headers={**self._authorization(), "Accept": "text/event-stream"},
            timeout=httpx.Timeout(self.timeout, read=None),
            extensions={LIVE_BODY: True},
        )
        with _translated(what):
            response = await self._http.send(request, stream=True)
        try:
            if response.status_code >= 300:
                with _translated(what):
                    await response.aread()
            check_sse_answer(response, what=what)
        except BaseException:
            await response.aclose()
            raise
        return SSERead(response, offset, f"wake stream {path}", self._max_event_bytes, linger=linger)

    # -- subscriptions ---------------------------------------------------------------------

    async def ensure_subscription(
        self,
        subscription_id: str,
        *,
        wake_stream: str,
        pattern: str | None = None,
        streams: Sequence[str] = (),
        lease_ttl_ms: int = 30_000,
        description: str | None = None,
    ) -> Links:
        body: dict[str, Any] = {"type": "pull-wake", "wake_stream": wake_stream, "lease_ttl_ms": lease_ttl_ms}
        if pattern:
            body["pattern"] = pattern
        if streams:
            body["streams"] = list(streams)
        if description is not None:
            body["description"] = description
        response = await self._request(
            "PUT",
            self.subscription_url(subscription_id),
            what=f"ensure subscription {subscription_id}",
            json_body=body,
            route="subscription-create",
        )
        return Links(response.status_code == 201, linked_streams(response))

    async def read_subscription(self, subscription_id: str) -> ServerSubscription:
        what = f"read subscription {subscription_id}"
        response = await self._request("GET", self.subscription_url(subscription_id), what=what, route="subscription")
        return server_subscription(subscription_id, response, what=what)

    async def delete_subscription(self, subscription_id: str) -> None:
        with suppress(SubscriptionNotFound):  # gone already (a server that answers 404 or 410 for it)
            await self._request(
                "DELETE",
                self.subscription_url(subscription_id),
                what=f"delete subscription {subscription_id}",
                route="subscription",
            )

    async def claim(self, subscription_id: str, worker: str) -> Claim:
        what = f"claim {subscription_id}"
        response = await self._request(
            "POST",
            self.subscription_url(subscription_id, "claim"),
            what=what,
            json_body={"worker": worker},
            route="subscription",
        )
        answer: ClaimAnswer = parse(ClaimAnswer, json_of(response, what=what), what=what)
        return Claim(
            subscription=subscription_id,
            wake_id=answer.wake_id,
            generation=answer.generation,
            streams=tuple(
                ClaimedStream(stream.path, stream.acked_offset, stream.tail_offset, stream.has_pending)
                for stream in answer.streams
            ),
            lease_ttl_ms=answer.lease_ttl_ms,
            token=SecretStr(answer.token),
        )

    async def ack(self, claim: Claim, acks: Sequence[Ack], *, done: bool = False) -> AckAnswer:
        what = f"ack {claim.subscription} (generation {claim.generation})"
        body: dict[str, Any] = {
            "wake_id": claim.wake_id,
            "generation": claim.generation,
            "acks": [{"stream": ack.stream, "offset": ack.offset} for ack in acks],
        }
        if done:
            body["done"] = True
        response = await self._request(
            "POST",
            self.subscription_url(claim.subscription, "ack"),
            what=what,
            json_body=body,
            claim_token=claim.token,
            route="subscription",
        )
        answer = json_of(response, what=what)
        if not isinstance(answer, dict):
            return AckAnswer(False)
        return AckAnswer(bool(answer.get("next_wake")), refreshed_token(answer))

    async def release(self, claim: Claim) -> None:
        await self._request(
            "POST",
            self.subscription_url(claim.subscription, "release"),
            what=f"release {claim.subscription} (generation {claim.generation})",
            json_body={"wake_id": claim.wake_id, "generation": claim.generation},
            claim_token=claim.token,
            route="subscription",
        )
