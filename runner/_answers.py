"""What the server's answers must look like, checked with strict types.

A wrong type is a malformed answer, never a coercion: a dict is not a token and the
string "false" is not a boolean. A wake's `ts` only feeds a latency metric, so an
implausible one (a 400-digit number, say) is ignored rather than refused.
Stream paths from the server must name a stream under the stream root, and
offsets must be short printable strings, before anything is requested with them.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError, field_validator

from ._exceptions import ProtocolError

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
