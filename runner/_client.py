"""The Durable Streams wire: streams, subscriptions, claims. Knows nothing of the lifecycle.

Every request carries a timeout, except reading the body of a live SSE stream,
which the caller watches (keep-alive watchdog, liveness heartbeat). The service
token goes on every request except ack and release, which carry the claim token.
Tokens never appear in reprs, logs or errors.
"""

from __future__ import annotations

import json
import ssl
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import httpx
from pydantic import SecretStr

from ._exceptions import (
    AlreadyClaimed,
    Fenced,
    InvalidOffset,
    NoPendingWork,
    ProtocolError,
    RequestError,
    ServerError,
    StreamConflict,
    StreamNotFound,
    SubscriptionConflict,
    SubscriptionNotFound,
    TokenInvalid,
    TransportError,
)

NEXT_OFFSET = "Stream-Next-Offset"
UP_TO_DATE = "Stream-Up-To-Date"
CLOSED = "Stream-Closed"
JSON = "application/json"

# Characters left alone in stream paths: the server keys streams by the raw path.
_PATH_SAFE = "/%:@!$&'()*+,;=-._~"

_CODES: Mapping[str, type[RequestError]] = {
    "SUBSCRIPTION_NOT_FOUND": SubscriptionNotFound,
    "SUBSCRIPTION_ALREADY_EXISTS": SubscriptionConflict,
    "NO_PENDING_WORK": NoPendingWork,
    "FENCED": Fenced,
    "INVALID_OFFSET": InvalidOffset,
    "TOKEN_INVALID": TokenInvalid,
    "TOKEN_EXPIRED": TokenInvalid,
}


@dataclass(frozen=True)
class ReadResult:
    """One response's worth of a stream: the messages and where to continue."""

    messages: list[Any]
    next_offset: str
    up_to_date: bool
    closed: bool
    content_type: str

    @property
    def is_json(self) -> bool:
        return self.content_type.split(";")[0].strip().lower() == JSON


@dataclass(frozen=True)
class ClaimedStream:
    path: str
    acked_offset: str
    tail_offset: str
    has_pending: bool


@dataclass(frozen=True)
class Claim:
    """A granted claim: who we are working for, and the token that proves it."""

    subscription: str
    wake_id: str
    generation: int
    streams: tuple[ClaimedStream, ...]
    lease_ttl_ms: int
    token: SecretStr = field(repr=False)


@dataclass(frozen=True)
class Ack:
    stream: str
    offset: str


def is_after(offset: str, other: str) -> bool:
    """Offsets are opaque but ordered lexicographically; `-1` comes before everything."""
    if other == "-1":
        return offset != "-1"
    return offset != "-1" and offset > other


def build_http(
    server_url: str,
    *,
    timeout: float,
    verify_tls: bool = True,
    ca_file: str | None = None,
    concurrency: int = 16,
) -> httpx.AsyncClient:
    """An HTTP client sized for `concurrency` claims plus the live stream, heartbeat and control.

    The pool is kept close to what is used: httpcore scans every pooled connection on
    each request, which showed up as a top cost under load with an oversized pool.
    """
    verify: ssl.SSLContext | bool = verify_tls
    if verify_tls and ca_file:
        verify = ssl.create_default_context(cafile=ca_file)
    return httpx.AsyncClient(
        base_url=server_url,
        timeout=httpx.Timeout(timeout),
        verify=verify,
        limits=httpx.Limits(max_connections=concurrency + 16, max_keepalive_connections=concurrency + 4),
        follow_redirects=False,
    )


class StreamsClient:
    """Typed calls to one Durable Streams server."""

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

    async def aclose(self) -> None:
        await self._http.aclose()

    # -- addresses -------------------------------------------------------------------------

    def stream_url(self, path: str) -> str:
        return f"{self._root}/{quote(path.strip('/'), safe=_PATH_SAFE)}"

    def subscription_url(self, subscription_id: str, action: str = "") -> str:
        base = f"{self._root}/__ds/subscriptions/{quote(subscription_id, safe='')}"
        return f"{base}/{action}" if action else base

    def _service_headers(self) -> dict[str, str]:
        if self._token is None:
            return {}
        return {"Authorization": f"Bearer {self._token.get_secret_value()}"}

    # -- plumbing --------------------------------------------------------------------------

    async def request(
        self,
        method: str,
        url: str,
        *,
        params: Mapping[str, str] | None = None,
        json_body: object = None,
        content: bytes | None = None,
        headers: Mapping[str, str] | None = None,
        claim_token: SecretStr | None = None,
        timeout: float | None = None,
    ) -> httpx.Response:
        all_headers = (
            {"Authorization": f"Bearer {claim_token.get_secret_value()}"}
            if claim_token is not None
            else self._service_headers()
        )
        if headers:
            all_headers.update(headers)
        if json_body is not None:
            content = json.dumps(json_body, separators=(",", ":")).encode()
            all_headers["Content-Type"] = JSON
        try:
            return await self._http.request(
                method,
                url,
                params=params,
                content=content,
                headers=all_headers,
                timeout=timeout if timeout is not None else self.timeout,
            )
        except httpx.TimeoutException as exc:
            raise TransportError(f"{method} {url}: timed out ({type(exc).__name__})") from exc
        except httpx.DecodingError as exc:
            raise ProtocolError(f"{method} {url}: undecodable body: {exc}") from exc
        except httpx.TransportError as exc:
            raise TransportError(f"{method} {url}: {type(exc).__name__}: {exc}") from exc

    @staticmethod
    def raise_for_status(response: httpx.Response, *, what: str) -> None:
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
        if code is not None and code in _CODES:
            raise _CODES[code](text, status=status, code=code)
        if status == 404:
            raise StreamNotFound(text, status=status, code=code)
        if status == 409:
            raise StreamConflict(text, status=status, code=code)
        raise RequestError(text, status=status, code=code)

    @staticmethod
    def json_of(response: httpx.Response, *, what: str) -> Any:
        try:
            return json.loads(response.content)
        except ValueError as exc:
            raise ProtocolError(f"{what}: the body is not JSON ({exc})") from exc

    @staticmethod
    def next_offset_of(response: httpx.Response, *, what: str) -> str:
        offset = response.headers.get(NEXT_OFFSET)
        if not offset:
            raise ProtocolError(f"{what}: the answer has no {NEXT_OFFSET} header")
        return str(offset)

    # -- streams ---------------------------------------------------------------------------

    async def create_stream(self, path: str, *, content_type: str = JSON) -> bool:
        """Create the stream if needed; True if it was created now."""
        what = f"create stream {path}"
        response = await self.request("PUT", self.stream_url(path), headers={"Content-Type": content_type})
        self.raise_for_status(response, what=what)
        return response.status_code == 201

    async def append(self, path: str, message: object) -> str:
        """Append one JSON message (a list appends each element); returns the new tail."""
        what = f"append to {path}"
        response = await self.request("POST", self.stream_url(path), json_body=message)
        self.raise_for_status(response, what=what)
        return self.next_offset_of(response, what=what)

    async def tail(self, path: str, *, timeout: float | None = None) -> str:
        """The stream's tail offset (HEAD)."""
        what = f"HEAD {path}"
        response = await self.request("HEAD", self.stream_url(path), timeout=timeout)
        self.raise_for_status(response, what=what)
        return self.next_offset_of(response, what=what)

    async def read(self, path: str, offset: str) -> ReadResult:
        """One catch-up read from `offset`; the server may return only part of what is there."""
        what = f"read {path} from {offset}"
        response = await self.request("GET", self.stream_url(path), params={"offset": offset})
        self.raise_for_status(response, what=what)
        return self._read_result(response, what=what)

    async def read_all(self, path: str, offset: str = "-1") -> list[Any]:
        """Catch up: read from `offset`, following Stream-Next-Offset until the server says up to date."""
        messages: list[Any] = []
        while True:
            result = await self.read(path, offset)
            messages.extend(result.messages)
            if result.up_to_date or result.closed or not result.messages or result.next_offset == offset:
                return messages
            offset = result.next_offset

    async def long_poll(self, path: str, offset: str, *, hold: float) -> ReadResult:
        """Wait up to `hold` (server side) for messages after `offset`."""
        what = f"long-poll {path} from {offset}"
        response = await self.request(
            "GET",
            self.stream_url(path),
            params={"offset": offset, "live": "long-poll"},
            timeout=hold + self.timeout,
        )
        self.raise_for_status(response, what=what)
        if response.status_code == 204:
            return ReadResult(
                [],
                self.next_offset_of(response, what=what),
                up_to_date=True,
                closed=response.headers.get(CLOSED) == "true",
                content_type=response.headers.get("content-type", JSON),
            )
        return self._read_result(response, what=what)

    def _read_result(self, response: httpx.Response, *, what: str) -> ReadResult:
        content_type = response.headers.get("content-type", "")
        result = ReadResult(
            [],
            self.next_offset_of(response, what=what),
            up_to_date=response.headers.get(UP_TO_DATE) == "true",
            closed=response.headers.get(CLOSED) == "true",
            content_type=content_type,
        )
        if not result.is_json:
            result.messages.extend([response.content] if response.content else [])
            return result
        body = self.json_of(response, what=what)
        if not isinstance(body, list):
            raise ProtocolError(f"{what}: a JSON stream read must be an array, got {type(body).__name__}")
        result.messages.extend(body)
        return result

    async def open_sse(self, path: str, offset: str) -> httpx.Response:
        """Start a live SSE read; returns once the answer's headers are in.

        The caller owns the response and must `aclose()` it. Reading its body has
        no timeout: the caller's watchdog bounds the silence.
        """
        what = f"SSE {path} from {offset}"
        request = self._http.build_request(
            "GET",
            self.stream_url(path),
            params={"offset": offset, "live": "sse"},
            headers={**self._service_headers(), "Accept": "text/event-stream"},
            timeout=httpx.Timeout(self.timeout, read=None),
        )
        try:
            response = await self._http.send(request, stream=True)
        except httpx.TimeoutException as exc:
            raise TransportError(f"{what}: timed out") from exc
        except httpx.TransportError as exc:
            raise TransportError(f"{what}: {type(exc).__name__}: {exc}") from exc
        if response.status_code >= 300:
            try:
                await response.aread()
            except httpx.HTTPError:
                pass
            finally:
                await response.aclose()
        self.raise_for_status(response, what=what)
        return response

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
    ) -> bool:
        """Create or confirm a pull-wake subscription; True if it was created now."""
        body: dict[str, Any] = {"type": "pull-wake", "wake_stream": wake_stream, "lease_ttl_ms": lease_ttl_ms}
        if pattern:
            body["pattern"] = pattern
        if streams:
            body["streams"] = list(streams)
        if description is not None:
            body["description"] = description
        response = await self.request("PUT", self.subscription_url(subscription_id), json_body=body)
        self.raise_for_status(response, what=f"ensure subscription {subscription_id}")
        return response.status_code == 201

    async def get_subscription(self, subscription_id: str) -> dict[str, Any]:
        what = f"get subscription {subscription_id}"
        response = await self.request("GET", self.subscription_url(subscription_id))
        self.raise_for_status(response, what=what)
        body = self.json_of(response, what=what)
        if not isinstance(body, dict):
            raise ProtocolError(f"{what}: expected a JSON object")
        return body

    async def delete_subscription(self, subscription_id: str) -> None:
        response = await self.request("DELETE", self.subscription_url(subscription_id))
        if response.status_code != 404:
            self.raise_for_status(response, what=f"delete subscription {subscription_id}")

    async def claim(self, subscription_id: str, worker: str) -> Claim:
        what = f"claim {subscription_id}"
        response = await self.request(
            "POST", self.subscription_url(subscription_id, "claim"), json_body={"worker": worker}
        )
        self.raise_for_status(response, what=what)
        body = self.json_of(response, what=what)
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
        """Apply acks; without `done` this also renews the lease. Returns `next_wake`."""
        what = f"ack {claim.subscription} (generation {claim.generation})"
        body: dict[str, Any] = {
            "wake_id": claim.wake_id,
            "generation": claim.generation,
            "acks": [{"stream": ack.stream, "offset": ack.offset} for ack in acks],
        }
        if done:
            body["done"] = True
        response = await self.request(
            "POST", self.subscription_url(claim.subscription, "ack"), json_body=body, claim_token=claim.token
        )
        self.raise_for_status(response, what=what)
        answer = self.json_of(response, what=what)
        return bool(answer.get("next_wake")) if isinstance(answer, dict) else False

    async def release(self, claim: Claim) -> None:
        response = await self.request(
            "POST",
            self.subscription_url(claim.subscription, "release"),
            json_body={"wake_id": claim.wake_id, "generation": claim.generation},
            claim_token=claim.token,
        )
        self.raise_for_status(response, what=f"release {claim.subscription} (generation {claim.generation})")
