"""The Durable Streams wire over HTTP: the `Wire` protocol carried out with httpx.

Every request carries a timeout, except reading the body of a live SSE stream,
which the caller watches (keep-alive watchdog, liveness heartbeat). The service
token goes on every request except ack and release, which carry the claim token.
Tokens never appear in reprs, logs or errors. httpx's exceptions are mapped to
ours in one place, `_translated`.
"""

from __future__ import annotations

import json
import ssl
from collections.abc import AsyncGenerator, Iterator, Mapping, Sequence
from contextlib import aclosing, contextmanager
from typing import Any
from urllib.parse import quote

import httpx
import trio
from httpx_sse import EventSource
from pydantic import SecretStr

from ._exceptions import (
    AlreadyClaimed,
    Fenced,
    InvalidOffset,
    NoPendingWork,
    ProtocolError,
    RequestError,
    ServerError,
    SSERefused,
    StreamConflict,
    StreamNotFound,
    StreamSilent,
    SubscriptionConflict,
    SubscriptionNotFound,
    TokenInvalid,
    TransportError,
)
from ._wire import JSON, Ack, Claim, ClaimedStream, Frame, Links, ReadResult

NEXT_OFFSET = "Stream-Next-Offset"
UP_TO_DATE = "Stream-Up-To-Date"
CLOSED = "Stream-Closed"

# Characters left alone in stream paths: the server keys streams by the raw path.
_PATH_SAFE = "/%:@!$&'()*+,;=-._~"
# Statuses with which a server or proxy says "no SSE here": fall back to long-poll.
_SSE_REFUSED = {400, 405, 406, 415, 501}

_CODES: Mapping[str, type[RequestError]] = {
    "SUBSCRIPTION_NOT_FOUND": SubscriptionNotFound,
    "SUBSCRIPTION_ALREADY_EXISTS": SubscriptionConflict,
    "NO_PENDING_WORK": NoPendingWork,
    "FENCED": Fenced,
    "INVALID_OFFSET": InvalidOffset,
    "TOKEN_INVALID": TokenInvalid,
    "TOKEN_EXPIRED": TokenInvalid,
}


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


def build_http(
    server_url: str,
    *,
    timeout: float,
    tls: ssl.SSLContext | None = None,
    concurrency: int = 16,
) -> httpx.AsyncClient:
    """An HTTP client sized for `concurrency` claims plus the live stream, heartbeat and control.

    The pool is kept close to what is used: httpcore scans every pooled connection on
    each request, which showed up as a top cost under load with an oversized pool.
    """
    if tls is None:
        tls = tls_context(https=server_url.startswith("https:"), verify=True, ca_file=None)
    return httpx.AsyncClient(
        base_url=server_url,
        timeout=httpx.Timeout(timeout),
        verify=tls,
        limits=httpx.Limits(max_connections=concurrency + 16, max_keepalive_connections=concurrency + 4),
        follow_redirects=False,
    )


@contextmanager
def _translated(what: str) -> Iterator[None]:
    """httpx's failures as ours: the only place that knows httpx's exception hierarchy."""
    try:
        yield
    except httpx.TimeoutException as exc:
        raise TransportError(f"{what}: timed out ({type(exc).__name__})") from exc
    except httpx.DecodingError as exc:
        raise ProtocolError(f"{what}: undecodable body: {exc}") from exc
    except httpx.TransportError as exc:
        raise TransportError(f"{what}: {type(exc).__name__}: {exc}") from exc


def raise_for_status(response: httpx.Response, *, what: str) -> None:
    """A protocol error answer as the matching exception of our hierarchy."""
    status = response.status_code
    if 200 <= status < 300:
        return
    code: str | None = None
    message, details = response.text[:200], {}
    try:
        payload = response.json()
    except ValueError:
        payload = None
    error = payload.get("error") if isinstance(payload, dict) else None
    if isinstance(error, dict):
        code = str(error["code"]) if error.get("code") else None
        message = str(error.get("message") or code or message)
        details = error
    text = f"{what}: {status} {code or ''} {message}".replace("  ", " ").strip()
    if status >= 500:
        raise ServerError(text, status=status)
    if code == "ALREADY_CLAIMED":
        generation = details.get("generation")
        raise AlreadyClaimed(
            text,
            status=status,
            code=code,
            holder=details.get("current_holder"),
            generation=generation if isinstance(generation, int) else None,
        )
    if code == "INVALID_OFFSET" and "beyond" in message:
        # A file-backed reference server lets a read see an append before its tail moves:
        # the offset we read becomes the tail milliseconds later, so this one is transient.
        lagging = InvalidOffset(text, status=status, code=code)
        lagging.retryable = True
        raise lagging
    if code is not None and code in _CODES:
        raise _CODES[code](text, status=status, code=code)
    if status == 404:
        raise StreamNotFound(text, status=status, code=code)
    if status == 409:
        raise StreamConflict(text, status=status, code=code)
    raise RequestError(text, status=status, code=code)


def _json_of(response: httpx.Response, *, what: str) -> Any:
    try:
        return json.loads(response.content)
    except ValueError as exc:
        raise ProtocolError(f"{what}: the body is not JSON ({exc})") from exc


def _next_offset_of(response: httpx.Response, *, what: str) -> str:
    offset = response.headers.get(NEXT_OFFSET)
    if not offset:
        raise ProtocolError(f"{what}: the answer has no {NEXT_OFFSET} header")
    return str(offset)


def _read_result(response: httpx.Response, *, what: str) -> ReadResult:
    content_type = response.headers.get("content-type", JSON if response.status_code == 204 else "")
    result = ReadResult(
        [],
        _next_offset_of(response, what=what),
        up_to_date=response.status_code == 204 or response.headers.get(UP_TO_DATE) == "true",
        closed=response.headers.get(CLOSED) == "true",
        content_type=content_type,
    )
    if response.status_code == 204:
        return result
    if not result.is_json:
        result.messages.extend([response.content] if response.content else [])
        return result
    body = _json_of(response, what=what)
    if not isinstance(body, list):
        raise ProtocolError(f"{what}: a JSON stream read must be an array, got {type(body).__name__}")
    result.messages.extend(body)
    return result


def _linked_streams(response: httpx.Response) -> dict[str, str]:
    """The linked streams a subscription answer lists; an answer without them lists none."""
    try:
        streams = response.json().get("streams")
    except (ValueError, AttributeError):
        return {}
    if not isinstance(streams, list):
        return {}
    return {
        stream["path"]: stream["acked_offset"]
        for stream in streams
        if isinstance(stream, dict)
        and isinstance(stream.get("path"), str)
        and isinstance(stream.get("acked_offset"), str)
    }


def _check_sse_answer(response: httpx.Response, *, what: str) -> None:
    """An error answer raises; an answer that is not an event stream means "no SSE here"."""
    if response.status_code in _SSE_REFUSED:
        raise SSERefused(f"{what}: answered {response.status_code}", status=response.status_code)
    raise_for_status(response, what=what)
    content_type = response.headers.get("content-type", "")
    if not content_type.startswith("text/event-stream"):
        raise SSERefused(f"{what}: answered {content_type or 'no content type'}", status=response.status_code)


def _parse_event(data: str, kind: type, name: str) -> Any:
    try:
        value = json.loads(data)
    except ValueError as exc:
        raise ProtocolError(f"wake stream: {name} event is not JSON ({exc})") from exc
    if not isinstance(value, kind):
        raise ProtocolError(f"wake stream: {name} event should be a JSON {kind.__name__}")
    return value


class SSERead:
    """An open `live=sse` read: `data` events carry messages, `control` events the offset."""

    def __init__(self, response: httpx.Response, offset: str, what: str) -> None:
        self._response = response
        self._what = what
        self.offset = offset

    async def aclose(self) -> None:
        await self._response.aclose()

    async def frames(self, keepalive: float) -> AsyncGenerator[Frame, None]:
        async with aclosing(EventSource(self._response).aiter_sse()) as events:
            while True:
                with trio.move_on_after(keepalive) as watchdog, _translated(self._what):
                    try:
                        sse = await anext(events)
                    except StopAsyncIteration:
                        return
                if watchdog.cancelled_caught:
                    raise StreamSilent(f"{self._what}: silent for {keepalive:g} s (no data, no keep-alive)")
                if sse.event == "data":
                    yield Frame(_parse_event(sse.data, list, "data"), None)
                elif sse.event == "control":
                    control = _parse_event(sse.data, dict, "control")
                    offset = control.get("streamNextOffset")
                    if offset is not None and not isinstance(offset, str):
                        raise ProtocolError(f"{self._what}: control event with a bad offset {offset!r}")
                    yield Frame([], offset, bool(control.get("streamClosed")))
                # Other event types belong to newer protocol versions: ignore them.


class StreamsClient:
    """The `Wire` over HTTP, to one Durable Streams server."""

    def __init__(
        self,
        http: httpx.AsyncClient,
        *,
        stream_root: str = "/v1/stream",
        token: SecretStr | None = None,
        timeout: float = 10.0,
    ) -> None:
        self._http = http
        self._root = stream_root.rstrip("/")
        self._token = token
        self.timeout = timeout

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
    ) -> httpx.Response:
        """Send one request and return its answer, which must be a 2xx."""
        all_headers = self._authorization(claim_token)
        if headers:
            all_headers.update(headers)
        content: bytes | None = None
        if json_body is not None:
            content = json.dumps(json_body, separators=(",", ":")).encode()
            all_headers["Content-Type"] = JSON
        with _translated(what):
            response = await self._http.request(
                method,
                url,
                params=params,
                content=content,
                headers=all_headers,
                timeout=timeout if timeout is not None else self.timeout,
            )
        raise_for_status(response, what=what)
        return response

    # -- streams ---------------------------------------------------------------------------

    async def create_stream(self, path: str, *, content_type: str = JSON) -> bool:
        response = await self._request(
            "PUT", self.stream_url(path), what=f"create stream {path}", headers={"Content-Type": content_type}
        )
        return response.status_code == 201

    async def append(self, path: str, message: object) -> str:
        what = f"append to {path}"
        response = await self._request("POST", self.stream_url(path), what=what, json_body=message)
        return _next_offset_of(response, what=what)

    async def tail(self, path: str, *, timeout: float | None = None) -> str:
        what = f"HEAD {path}"
        response = await self._request("HEAD", self.stream_url(path), what=what, timeout=timeout)
        return _next_offset_of(response, what=what)

    async def read(self, path: str, offset: str) -> ReadResult:
        what = f"read {path} from {offset}"
        response = await self._request("GET", self.stream_url(path), what=what, params={"offset": offset})
        return _read_result(response, what=what)

    async def long_poll(self, path: str, offset: str, *, hold: float) -> ReadResult:
        what = f"long-poll {path} from {offset}"
        response = await self._request(
            "GET",
            self.stream_url(path),
            what=what,
            params={"offset": offset, "live": "long-poll"},
            timeout=hold + self.timeout,
        )
        return _read_result(response, what=what)

    async def open_sse(self, path: str, offset: str) -> SSERead:
        """Returns once the answer's headers are in; reading the body has no timeout."""
        what = f"SSE {path} from {offset}"
        request = self._http.build_request(
            "GET",
            self.stream_url(path),
            params={"offset": offset, "live": "sse"},
            headers={**self._authorization(), "Accept": "text/event-stream"},
            timeout=httpx.Timeout(self.timeout, read=None),
        )
        with _translated(what):
            response = await self._http.send(request, stream=True)
        try:
            if response.status_code >= 300:
                with _translated(what):
                    await response.aread()
            _check_sse_answer(response, what=what)
        except BaseException:
            await response.aclose()
            raise
        return SSERead(response, offset, f"wake stream {path}")

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
        )
        return Links(response.status_code == 201, _linked_streams(response))

    async def claim(self, subscription_id: str, worker: str) -> Claim:
        what = f"claim {subscription_id}"
        response = await self._request(
            "POST", self.subscription_url(subscription_id, "claim"), what=what, json_body={"worker": worker}
        )
        body = _json_of(response, what=what)
        try:
            return Claim(
                subscription=subscription_id,
                wake_id=str(body["wake_id"]),
                generation=int(body["generation"]),
                streams=tuple(
                    ClaimedStream(
                        path=str(stream["path"]),
                        acked_offset=str(stream["acked_offset"]),
                        tail_offset=str(stream["tail_offset"]),
                        has_pending=bool(stream["has_pending"]),
                    )
                    for stream in body["streams"]
                ),
                lease_ttl_ms=int(body["lease_ttl_ms"]),
                token=SecretStr(str(body["token"])),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ProtocolError(f"{what}: malformed claim answer ({type(exc).__name__}: {exc})") from exc

    async def ack(self, claim: Claim, acks: Sequence[Ack], *, done: bool = False) -> bool:
        what = f"ack {claim.subscription} (generation {claim.generation})"
        body: dict[str, Any] = {
            "wake_id": claim.wake_id,
            "generation": claim.generation,
            "acks": [{"stream": ack.stream, "offset": ack.offset} for ack in acks],
        }
        if done:
            body["done"] = True
        response = await self._request(
            "POST", self.subscription_url(claim.subscription, "ack"), what=what, json_body=body, claim_token=claim.token
        )
        answer = _json_of(response, what=what)
        return bool(answer.get("next_wake")) if isinstance(answer, dict) else False

    async def release(self, claim: Claim) -> None:
        await self._request(
            "POST",
            self.subscription_url(claim.subscription, "release"),
            what=f"release {claim.subscription} (generation {claim.generation})",
            json_body={"wake_id": claim.wake_id, "generation": claim.generation},
            claim_token=claim.token,
        )
