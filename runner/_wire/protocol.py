"""The calls the runner makes to a Durable Streams server, as a protocol, and the values they carry.

`StreamsClient` (runner/_wire/client.py) is the real implementation over HTTP; the
tests have an in-memory one, so the claim and dispatch rules can be exercised
in virtual time. Nothing here knows about the lifecycle.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from pydantic import SecretStr

JSON = "application/json"


def is_after(offset: str, other: str) -> bool:
    """Offsets are opaque but ordered lexicographically; `-1` comes before everything."""
    if other == "-1":
        return offset != "-1"
    return offset != "-1" and offset > other


@dataclass(frozen=True)
class ReadResult:
    """One response's worth of a stream: the messages and where to continue."""

    messages: list[Any]
    next_offset: str
    up_to_date: bool
    closed: bool
    content_type: str = JSON

    @property
    def is_json(self) -> bool:
        return self.content_type.split(";")[0].strip().lower() == JSON


@dataclass(frozen=True)
class Frame:
    """What one step of a live read delivered: messages, the offset after them, and EOF."""

    messages: list[Any]
    offset: str | None
    closed: bool = False
    unusable: str | None = None
    """Why a data event was dropped (not JSON, over the size bound): counted, not fatal."""


@dataclass(frozen=True)
class Producer:
    """An idempotent producer's headers for one append (PROTOCOL.md §5.2.1).

    The server appends once per (stream, id, epoch, seq): a repeat answers 204 and appends
    nothing; a higher epoch starts again at seq 0; a lower epoch is refused (`ProducerFenced`).
    """

    id: str
    epoch: int
    seq: int

    def headers(self) -> dict[str, str]:
        return {"Producer-Id": self.id, "Producer-Epoch": str(self.epoch), "Producer-Seq": str(self.seq)}


ALREADY_APPENDED = ""
"""What `append` returns for a producer's repeat: the server has it already and names no offset."""


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


@dataclass(frozen=True)
class AckAnswer:
    """The server's answer to an ack."""

    next_wake: bool
    """Work is still pending (meaningful after a `done` ack)."""
    token: SecretStr | None = field(default=None, repr=False)
    """A refreshed claim token, if the server sent one (where claim tokens expire): the next
    ack or release must carry it."""


@dataclass(frozen=True)
class Links:
    """The answer to creating or confirming a subscription."""

    created: bool
    streams: dict[str, str]
    """Every linked stream and its acknowledged offset; right after a create, the offset at
    which the server linked it (its tail then)."""


@dataclass(frozen=True)
class ServerSubscription:
    """A subscription as the server keeps it (GET of the subscription)."""

    id: str
    wake_stream: str | None
    pattern: str | None
    explicit: tuple[str, ...]
    """The streams it names (`streams` when created), as opposed to those its pattern matched."""
    lease_ttl_ms: int | None
    description: str | None
    linked: dict[str, str]
    """Every linked stream and its acknowledged offset."""


class LiveRead(Protocol):
    """An open `live=sse` read of one stream. The owner must `aclose()` it."""

    offset: str
    """Where the read started."""

    def frames(self) -> AsyncGenerator[Frame, None]:
        """Frames as they arrive. Silence is the reader's to judge (the follower's keep-alive watchdog)."""
        ...

    async def aclose(self) -> None: ...


class Wire(Protocol):
    """Every call the runner makes to the server."""

    async def create_stream(self, path: str, *, content_type: str = JSON) -> bool:
        """Create the stream if needed; True if it was created now."""
        ...

    async def append(self, path: str, message: object, *, producer: Producer | None = None) -> str:
        """Append one JSON message; returns the new tail.

        With `producer`, exactly once per (producer id, epoch, seq): a repeat returns
        `ALREADY_APPENDED`; a stale epoch raises `ProducerFenced`.
        """
        ...

    async def tail(self, path: str, *, timeout: float | None = None) -> str:
        """The stream's tail offset."""
        ...

    async def read(self, path: str, offset: str) -> ReadResult:
        """One catch-up read from `offset`; the server may return only part of what is there."""
        ...

    async def long_poll(self, path: str, offset: str, *, hold: float) -> ReadResult:
        """Wait up to `hold` (server side) for messages after `offset`."""
        ...

    async def open_sse(self, path: str, offset: str, *, linger: float = 0.0) -> LiveRead:
        """Start a live SSE read; raises `SSERefused` if the server will not serve SSE here."""
        ...

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
        """Create or confirm a pull-wake subscription."""
        ...

    async def read_subscription(self, subscription_id: str) -> ServerSubscription:
        """The subscription as the server keeps it; `SubscriptionNotFound` if it has none."""
        ...

    async def delete_subscription(self, subscription_id: str) -> None:
        """Delete the subscription (a missing one is no error): its claim, if held, is void."""
        ...

    async def claim(self, subscription_id: str, worker: str) -> Claim: ...

    async def ack(self, claim: Claim, acks: Sequence[Ack], *, done: bool = False) -> AckAnswer:
        """Apply acks; without `done` this also renews the lease."""
        ...

    async def release(self, claim: Claim) -> None: ...
