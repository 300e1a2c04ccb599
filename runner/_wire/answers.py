"""What the server's answers must look like: statuses, headers and bodies, checked with strict types.

A wrong type is a malformed answer, never a coercion: a dict is not a token and the
string "false" is not a boolean. A wake's `ts` only feeds a latency metric, so an
implausible one (a 400-digit number, say) is ignored rather than refused.
Stream paths from the server must name a stream under the stream root, and
offsets must be short printable strings, before anything is requested with them.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Annotated, Any, Literal

import httpx
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    StringConstraints,
    TypeAdapter,
    ValidationError,
    field_validator,
)

from ..errors import (
    AlreadyClaimed,
    Fenced,
    InvalidOffset,
    NoPendingWork,
    ProducerFenced,
    ProducerSequenceGap,
    ProtocolError,
    RequestError,
    ServerError,
    SSERefused,
    StreamConflict,
    StreamNotFound,
    SubscriptionConflict,
    SubscriptionNotFound,
    TokenInvalid,
    TokenRefused,
)
from .protocol import JSON, Frame, ReadResult, ServerSubscription

NEXT_OFFSET = "Stream-Next-Offset"
UP_TO_DATE = "Stream-Up-To-Date"
CLOSED = "Stream-Closed"
PRODUCER_EPOCH = "Producer-Epoch"
PRODUCER_EXPECTED_SEQ = "Producer-Expected-Seq"
# Statuses with which a server or proxy says "no SSE here": fall back to long-poll.
_SSE_REFUSED = {400, 405, 406, 415, 501}

Offset = Annotated[str, StringConstraints(min_length=1, max_length=256, pattern=r"^[\x21-\x7e]+$")]
Token = Annotated[str, StringConstraints(min_length=1, max_length=8192, pattern=r"^[\x21-\x7e]+$")]
# JavaScript's safe integers: what a JSON server can mean by a number.
SafeInt = Annotated[int, Field(ge=0, le=2**53)]

_STRICT = ConfigDict(strict=True, extra="ignore", frozen=True)


def check_stream_path(path: str) -> str:
    """A stream path from the server, refused unless it stays under the stream root."""
    if not path or len(path) > 1024 or path.startswith("/") or any(c in path for c in "?#\\\x7f"):
        raise ValueError(f"not a stream path: {path[:80]!r}")
    if any(ord(c) < 0x20 for c in path):
        raise ValueError("a stream path with control characters")
    from urllib.parse import unquote

    if any(unquote(segment) in ("", ".", "..") for segment in path.split("/")):
        raise ValueError(f"a stream path that leaves the stream root: {path[:80]!r}")
    return path


class ClaimedStreamAnswer(BaseModel):
    model_config = _STRICT

    path: str
    acked_offset: Offset
    tail_offset: Offset
    has_pending: bool

    @field_validator("path")
    @classmethod
    def _under_the_root(cls, value: str) -> str:
        return check_stream_path(value)


class ClaimAnswer(BaseModel):
    model_config = _STRICT

    wake_id: Annotated[str, StringConstraints(min_length=1, max_length=256)]
    generation: SafeInt
    streams: list[ClaimedStreamAnswer] = Field(max_length=100_000)
    lease_ttl_ms: SafeInt
    token: Token


class ControlEvent(BaseModel):
    """The offset event of an SSE wake stream."""

    model_config = _STRICT

    streamNextOffset: Offset | None = None
    streamClosed: bool = False


class WakeEvent(BaseModel):
    """One wake on the wake stream (other event types are not parsed with this)."""

    model_config = _STRICT

    subscription_id: Annotated[str, StringConstraints(min_length=1, max_length=256)]
    generation: SafeInt
    stream: str | None = None
    ts: Any = None

    @property
    def ts_ms(self) -> int | None:
        """The server's time of the wake, if it is a plausible one (it only feeds a latency metric)."""
        ts = self.ts
        return ts if type(ts) is int and 0 < ts < 2**53 else None


def parse(model: type[BaseModel], value: object, *, what: str) -> Any:
    """`value` as `model`, or a ProtocolError that says what was wrong (briefly)."""
    try:
        return model.model_validate(value)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "(answer)"
        raise ProtocolError(f"{what}: malformed answer: {where}: {first['msg']}") from None


# -- answers as our values and errors ---------------------------------------------------


_CODES: Mapping[str, type[RequestError]] = {
    "SUBSCRIPTION_NOT_FOUND": SubscriptionNotFound,
    "SUBSCRIPTION_ALREADY_EXISTS": SubscriptionConflict,
    "NO_PENDING_WORK": NoPendingWork,
    "FENCED": Fenced,
    "INVALID_OFFSET": InvalidOffset,
    "TOKEN_INVALID": TokenInvalid,
    "TOKEN_EXPIRED": TokenInvalid,
}
KNOWN_CODES = frozenset({*_CODES, "ALREADY_CLAIMED"})
"""The codes the reference server answers; other servers answer others (docs: README, Servers)."""

Route = Literal["stream", "subscription-create", "subscription"]
"""What a request addresses: a stream, a subscription being created or confirmed (PUT), or an
existing subscription (claim, ack, release, GET). The protocol fixes few error codes, and servers
choose their own: the status and the route say what an answer means."""


def raise_for_status(response: httpx.Response, *, what: str, route: Route = "stream") -> None:
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
        raise ServerError(text, status=status, retry_after=retry_after(response))
    # Idempotent producers (PROTOCOL.md §5.2.1) answer with producer headers: a stale epoch is
    # fencing, not a refused token, and a sequence gap is no stream conflict.
    if status == 403 and PRODUCER_EPOCH in response.headers:
        raise ProducerFenced(f"{text} (a newer producer epoch has written)", status=status, code=code)
    if status == 409 and PRODUCER_EXPECTED_SEQ in response.headers:
        raise ProducerSequenceGap(
            f"{text} (expected seq {response.headers[PRODUCER_EXPECTED_SEQ]})", status=status, code=code
        )
    # By meaning, whatever the code: a create that conflicts is another configuration under this
    # id (reference: SUBSCRIPTION_ALREADY_EXISTS, others: CONFIG_CONFLICT), and a subscription's
    # own URL that is not found or gone means the subscription is (reference:
    # SUBSCRIPTION_NOT_FOUND, others: NOT_FOUND, or 410 SUBSCRIPTION_GONE after a delete).
    if route == "subscription-create" and status == 409:
        raise SubscriptionConflict(text, status=status, code=code)
    if route == "subscription" and status in (404, 410):
        raise SubscriptionNotFound(text, status=status, code=code)
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
    if route != "subscription" and status == 404:
        raise StreamNotFound(text, status=status, code=code)
    if route != "subscription" and status == 409:
        raise StreamConflict(text, status=status, code=code)
    raise RequestError(text, status=status, code=code)


_TOKEN: TypeAdapter[str] = TypeAdapter(Token)


def refreshed_token(answer: object) -> SecretStr | None:
    """The new claim token an ack answer may carry (servers whose tokens expire refresh them so).

    One that is not a token is ignored rather than refused: the ack itself was applied,
    and the token held so far stays good until the server says otherwise.
    """
    token = answer.get("token") if isinstance(answer, dict) else None
    if token is None:
        return None
    try:
        return SecretStr(_TOKEN.validate_python(token, strict=True))
    except ValidationError:
        return None


def retry_after(response: httpx.Response) -> float | None:
    """Retry-After in seconds, if the answer says so (an HTTP date is not honoured)."""
    value = response.headers.get("retry-after", "")
    return float(value) if value.isdigit() else None


def json_of(response: httpx.Response, *, what: str) -> Any:
    try:
        return json.loads(response.content)
    except ValueError as exc:
        raise ProtocolError(f"{what}: the body is not JSON ({exc})") from exc


def next_offset_of(response: httpx.Response, *, what: str) -> str:
    offset = response.headers.get(NEXT_OFFSET)
    if not offset:
        raise ProtocolError(f"{what}: the answer has no {NEXT_OFFSET} header")
    if len(offset) > 256 or not offset.isprintable() or " " in offset:
        raise ProtocolError(f"{what}: {NEXT_OFFSET} is not an offset: {offset[:40]!r}")
    return str(offset)


def read_result(response: httpx.Response, *, what: str) -> ReadResult:
    content_type = response.headers.get("content-type", JSON if response.status_code == 204 else "")
    result = ReadResult(
        [],
        next_offset_of(response, what=what),
        up_to_date=response.status_code == 204 or response.headers.get(UP_TO_DATE) == "true",
        closed=response.headers.get(CLOSED) == "true",
        content_type=content_type,
    )
    if response.status_code == 204:
        return result
    if not result.is_json:
        result.messages.extend([response.content] if response.content else [])
        return result
    body = json_of(response, what=what)
    if not isinstance(body, list):
        raise ProtocolError(f"{what}: a JSON stream read must be an array, got {type(body).__name__}")
    result.messages.extend(body)
    return result


def linked_streams(response: httpx.Response) -> dict[str, str]:
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


def server_subscription(subscription_id: str, response: httpx.Response, *, what: str) -> ServerSubscription:
    """A subscription's document; fields of the wrong type read as absent (it is shown, never acted on)."""
    document = json_of(response, what=what)
    if not isinstance(document, dict):
        raise ProtocolError(f"{what}: a subscription must be a JSON object, got {type(document).__name__}")
    links = document.get("streams")
    links = links if isinstance(links, list) else []

    def text(key: str) -> str | None:
        value = document.get(key)
        return value if isinstance(value, str) else None

    ttl = document.get("lease_ttl_ms")
    return ServerSubscription(
        id=subscription_id,
        wake_stream=text("wake_stream"),
        pattern=text("pattern"),
        explicit=tuple(
            sorted(
                link["path"]
                for link in links
                if isinstance(link, dict) and isinstance(link.get("path"), str) and link.get("link_type") == "explicit"
            )
        ),
        lease_ttl_ms=ttl if type(ttl) is int else None,
        description=text("description"),
        linked=linked_streams(response),
    )


def check_sse_answer(response: httpx.Response, *, what: str) -> None:
    """An error answer raises; an answer that is not an event stream means "no SSE here"."""
    if response.status_code in _SSE_REFUSED:
        raise SSERefused(f"{what}: answered {response.status_code}", status=response.status_code)
    raise_for_status(response, what=what)
    content_type = response.headers.get("content-type", "")
    if not content_type.startswith("text/event-stream"):
        raise SSERefused(f"{what}: answered {content_type or 'no content type'}", status=response.status_code)


def data_frame(data: str, what: str) -> Frame:
    """A data event's messages; one that is not a JSON array is dropped and said so, not fatal."""
    try:
        messages = json.loads(data)
    except ValueError as exc:
        return Frame([], None, unusable=f"{what}: a data event is not JSON ({exc})")
    if not isinstance(messages, list):
        return Frame([], None, unusable=f"{what}: a data event is not a JSON array")
    return Frame(messages, None)


def control_frame(data: str, what: str) -> Frame:
    """The offset after the data: without a trustworthy one the stream cannot go on."""
    try:
        value = json.loads(data)
    except ValueError as exc:
        raise ProtocolError(f"{what}: a control event is not JSON ({exc})") from exc
    control: ControlEvent = parse(ControlEvent, value, what=f"{what} control event")
    return Frame([], control.streamNextOffset, control.streamClosed)
