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
from pydantic import SecretStr

from ._answers import ClaimAnswer, ControlEvent, parse
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
    TokenRefused,
    TransportError,
)
from ._sse import OVERSIZE, sse_events
from ._transport import LIVE_BODY, TOTAL_TIMEOUT, LeanTransport
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
    transport: str = "lean",
    deadline: float = 60.0,
    max_body_bytes: int = 16 * 1024 * 1024,
) -> httpx.AsyncClient:
    """An HTTP client sized for `concurrency` claims plus the live stream, heartbeat and control.

    The lean transport (runner/_transport.py) bounds every answer's size and every
    request's total time (`deadline`, `max_body_bytes`); bodies come uncompressed, so
    the bound is the size that reaches memory. httpx's own transport ("httpx") bounds
    neither. Either pool is kept close to what is used.
    """
    if tls is None:
        tls = tls_context(https=server_url.startswith("https:"), verify=True, ca_file=None)
    connections = concurrency + 16
    if transport == "lean":
        lean = LeanTransport(
            max_connections=connections, ssl_context=tls, max_body_bytes=max_body_bytes, total_timeout=deadline
        )
        return httpx.AsyncClient(
            base_url=server_url,
            timeout=httpx.Timeout(timeout),
            transport=lean,
            headers={"Accept-Encoding": "identity"},
            follow_redirects=False,
        )
    return httpx.AsyncClient(
        base_url=server_url,
        timeout=httpx.Timeout(timeout),
        verify=tls,
        limits=httpx.Limits(max_connections=connections, max_keepalive_connections=concurrency + 4),
        follow_redirects=False,
    )


@contextmanager
def _translated(what: str) -> Iterator[None]:
    """httpx's failures as ours: the only place that knows httpx's exception hierarchy."""
    try:
        yield
    except httpx.TimeoutException as exc:
        raise TransportError(f"{what}: timed out ({type(exc).__name__}: {_reason(exc)})") from exc
    except httpx.DecodingError as exc:
        raise ProtocolError(f"{what}: undecodable body: {_reason(exc)}") from exc
    except httpx.TransportError as exc:
        raise TransportError(f"{what}: {type(exc).__name__}: {_reason(exc)}") from exc


def _reason(exc: BaseException) -> str:
    """What went wrong, even when the exception's own text is empty (a failed TLS check, say)."""
    text = str(exc)
    cause = exc.__cause__ or exc.__context__
    while not text and cause is not None:
        text = str(cause) or type(cause).__name__
        cause = cause.__cause__ or cause.__context__
    return text or "no reason given"


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
        raise ServerError(text, status=status, retry_after=_retry_after(response))
    if status in (401, 403) and code not in _CODES:
        raise TokenRefused(f"{text} (the server refused the service token: check token / token_file)", status=status)
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


def _retry_after(response: httpx.Response) -> float | None:
    """Retry-After in seconds, if the answer says so (an HTTP date is not honoured)."""
    value = response.headers.get("retry-after", "")
    return float(value) if value.isdigit() else None


def _json_of(response: httpx.Response, *, what: str) -> Any:
    try:
        return json.loads(response.content)
    except ValueError as exc:
        raise ProtocolError(f"{what}: the body is not JSON ({exc})") from exc


def _next_offset_of(response: httpx.Response, *, what: str) -> str:
    offset = response.headers.get(NEXT_OFFSET)
    if not offset:
        raise ProtocolError(f"{what}: the answer has no {NEXT_OFFSET} header")
    if len(offset) > 256 or not offset.isprintable() or " " in offset:
        raise ProtocolError(f"{what}: {NEXT_OFFSET} is not an offset: {offset[:40]!r}")
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


def _data_frame(data: str, what: str) -> Frame:
    """A data event's messages; one that is not a JSON array is dropped and said so, not fatal."""
    try:
        messages = json.loads(data)
    except ValueError as exc:
        return Frame([], None, unusable=f"{what}: a data event is not JSON ({exc})")
    if not isinstance(messages, list):
        return Frame([], None, unusable=f"{what}: a data event is not a JSON array")
    return Frame(messages, None)


def _control_frame(data: str, what: str) -> Frame:
    """The offset after the data: without a trustworthy one the stream cannot go on."""
    try:
        value = json.loads(data)
    except ValueError as exc:
        raise ProtocolError(f"{what}: a control event is not JSON ({exc})") from exc
    control: ControlEvent = parse(ControlEvent, value, what=f"{what} control event")
    return Frame([], control.streamNextOffset, control.streamClosed)


class SSERead:
    """An open `live=sse` read: `data` events carry messages, `control` events the offset."""

    def __init__(self, response: httpx.Response, offset: str, what: str, max_event_bytes: int) -> None:
        self._response = response
        self._what = what
        self._max_event_bytes = max_event_bytes
        self.offset = offset

    async def aclose(self) -> None:
        await self._response.aclose()

    async def frames(self, keepalive: float) -> AsyncGenerator[Frame, None]:
        events = sse_events(self._response.aiter_bytes(), max_event_bytes=self._max_event_bytes)
        async with aclosing(events):
            while True:
                with trio.move_on_after(keepalive) as watchdog, _translated(self._what):
                    try:
                        sse = await anext(events)
                    except StopAsyncIteration:
                        return
                if watchdog.cancelled_caught:
                    raise StreamSilent(f"{self._what}: silent for {keepalive:g} s (no complete event, no keep-alive)")
                if sse.event == "data":
                    yield _data_frame(sse.data, self._what)
                elif sse.event == "control":
                    yield _control_frame(sse.data, self._what)
                elif sse.event == OVERSIZE:
                    yield Frame([], None, unusable=f"{self._what}: an event over {self._max_event_bytes} bytes")
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
        deadline: float = 60.0,
        max_event_bytes: int = 1024 * 1024,
    ) -> None:
        self._http = http
        self._root = stream_root.rstrip("/")
        self._token = token
        self.timeout = timeout
        self._deadline = deadline
        self._max_event_bytes = max_event_bytes

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
            response = await self._http.request(
                method,
                url,
                params=params,
                content=content,
                headers=all_headers,
                timeout=timeout if timeout is not None else self.timeout,
                extensions={TOTAL_TIMEOUT: self._deadline + hold},
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
            hold=hold,
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
            extensions={LIVE_BODY: True},
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
        return SSERead(response, offset, f"wake stream {path}", self._max_event_bytes)

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
        answer: ClaimAnswer = parse(ClaimAnswer, _json_of(response, what=what), what=what)
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
