"""An in-memory Durable Streams server behind the `Wire` protocol, in trio time.

It models what the claim and dispatch rules depend on, and raises the errors
`StreamsClient` raises for the same answers:
- streams are lists of JSON messages; the offset after the n-th message is
  `f"{n:08d}"`, so offsets order like strings, and `-1` is the start
  (and the tail of an empty stream); a read
  returns at most `chunk` messages;
- subscriptions link streams with an acknowledged offset each; a claim gets a
  wake id, a generation and a token, and a lease counted in `trio.current_time()`;
  an ack renews it; a done ack or a release frees it; `next_wake` says work is
  pending;
- FENCED (someone else holds it now), TOKEN_INVALID / TOKEN_EXPIRED,
  ALREADY_CLAIMED, NO_PENDING_WORK, INVALID_OFFSET (regressing, beyond the tail,
  unknown stream, `-1`), SUBSCRIPTION_NOT_FOUND;
- scriptable faults per method: fail the next calls, hang, delay, or run a hook.

It is a test double for the pure-logic tests; the end-to-end behaviour is
tested against the real reference server.
"""

from __future__ import annotations

import fnmatch
import itertools
from collections import defaultdict, deque
from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import trio
import trio.testing
from pydantic import SecretStr

from runner._dispatch import Wake
from runner._wire.protocol import (
    ALREADY_APPENDED,
    JSON,
    Ack,
    AckAnswer,
    Claim,
    ClaimedStream,
    Frame,
    Links,
    LiveRead,
    Producer,
    ReadResult,
    ServerSubscription,
    is_after,
)
from runner.errors import (
    AlreadyClaimed,
    ClientError,
    Fenced,
    InvalidOffset,
    NoPendingWork,
    ProducerFenced,
    ProducerSequenceGap,
    RequestError,
    ServerError,
    SSERefused,
    StreamNotFound,
    SubscriptionNotFound,
    TokenInvalid,
    TransportError,
    Unreachable,
)

START = "-1"

Fault = Callable[[], Awaitable[None]]


def offset_of(count: int) -> str:
    """The offset after `count` messages (an empty stream's tail is its start)."""
    return f"{count:08d}" if count else START


def _index(offset: str) -> int:
    return 0 if offset == START else int(offset)


@dataclass(frozen=True)
class Call:
    """One call the runner made, when it was made, and what it carried."""

    method: str
    at: float
    args: tuple[Any, ...] = ()


@dataclass
class Holder:
    worker: str
    wake_id: str
    generation: int
    token: str
    expires_at: float


@dataclass
class Subscription:
    id: str
    lease_ttl_ms: int
    acked: dict[str, str] = field(default_factory=dict)
    generation: int = 0
    holder: Holder | None = None
    wakes: list[int] = field(default_factory=list)
    """Generations of the wakes the server wrote (on a hand-back with work still pending)."""


def _refusal(kind: type[RequestError], what: str, status: int, code: str, message: str) -> RequestError:
    return kind(f"{what}: {status} {code} {message}", status=status, code=code)


class ScriptedRead:
    """An open SSE read that plays a script, then ends cleanly: a `Frame` is delivered,
    a number is a pause of that many seconds, an exception is raised."""

    def __init__(self, *script: Frame | float | BaseException) -> None:
        self.script = script
        self.offset = ""
        self.closed = False

    async def aclose(self) -> None:
        self.closed = True

    async def frames(self) -> AsyncGenerator[Frame, None]:
        for step in self.script:
            if isinstance(step, BaseException):
                await trio.lowlevel.checkpoint()
                raise step
            if isinstance(step, Frame):
                await trio.lowlevel.checkpoint()
                yield step
            else:
                await trio.sleep(step)


class LiveStreamRead:
    """An open SSE read that follows a stream of the wire as it grows (`FakeWire.live_sse`)."""

    def __init__(self, wire: FakeWire, path: str, offset: str) -> None:
        self.wire = wire
        self.path = path
        self.offset = offset
        self.closed = False

    async def aclose(self) -> None:
        self.closed = True

    async def frames(self) -> AsyncGenerator[Frame, None]:
        at = _index(self.offset)
        while not self.closed:
            messages = self.wire.streams.get(self.path, [])
            if at < len(messages):
                new, at = list(messages[at:]), len(messages)
                await trio.lowlevel.checkpoint()
                yield Frame(new, None)
                yield Frame([], offset_of(at))
            else:
                await self.wire._appended.wait()


class FakeWire:
    """The `Wire` over a dictionary. Every call checkpoints, as a network call would."""

    def __init__(self, *, chunk: int = 2, grant_empty: bool = False, refresh_tokens: bool = False) -> None:
        self.chunk = chunk
        self.grant_empty = grant_empty
        """Grant a claim with nothing pending (as some servers do) instead of NO_PENDING_WORK."""
        self.refresh_tokens = refresh_tokens
        """Every renewal answers a new claim token, and the one before is refused from then on
        (as servers whose claim tokens expire do)."""
        self.streams: dict[str, list[Any]] = {}
        self.subscriptions: dict[str, Subscription] = {}
        self.calls: list[Call] = []
        self._faults: dict[str, deque[Fault]] = defaultdict(deque)
        self._tokens = itertools.count(1)
        self._appended = trio.Event()
        """Set (and replaced) at every append: a held long-poll answers as soon as data arrives."""
        self.producers: dict[tuple[str, str], tuple[int, int]] = {}
        """(stream, producer id) -> (newest epoch, last seq), as the reference server keeps them."""
        self.sse_reads: deque[ScriptedRead] = deque()
        """Answers to the next `open_sse` calls, in order; without one, SSE is refused (unless `live_sse`)."""
        self.live_sse = False
        """Without a scripted read, `open_sse` follows the stream live (`LiveStreamRead`)."""
        self.lingers: list[float] = []
        """The `linger` of every `open_sse` call."""
        self.closed: set[str] = set()
        """Streams their owner closed: a read that reaches their tail says so."""
        self.down = False
        """The server is down (restarting): every call is refused at once, `Unreachable`."""

    # -- setting the scene -----------------------------------------------------------------

    def add_stream(self, path: str, messages: Sequence[Any] = ()) -> None:
        self.streams.setdefault(path, []).extend(messages)

    def subscribe(self, subscription_id: str, streams: Sequence[str], *, lease_ttl_ms: int = 30_000) -> None:
        """A subscription linking `streams` from their start (created if missing)."""
        for path in streams:
            self.streams.setdefault(path, [])
        self.subscriptions[subscription_id] = Subscription(
            subscription_id, lease_ttl_ms, acked=dict.fromkeys(streams, START)
        )

    def forget_subscriptions(self) -> None:
        """What a restart of the reference server does: subscriptions are gone, streams stay."""
        self.subscriptions.clear()

    def wake(self, subscription_id: str) -> Wake:
        """The wake the server would write now: its generation is the one the next claim gets."""
        sub = self.subscriptions[subscription_id]
        return Wake(subscription_id, generation=sub.generation + 1)

    def take_over(self, subscription_id: str, worker: str = "someone-else") -> None:
        """Another runner claims the subscription (as if our lease had expired meanwhile)."""
        sub = self.subscriptions[subscription_id]
        sub.generation += 1
        sub.holder = Holder(worker, f"w{sub.generation}", sub.generation, "theirs", trio.current_time() + 3600)

    def revoke_token(self, subscription_id: str) -> None:
        """The server no longer knows the holder's token (e.g. its own restart of the claims)."""
        holder = self.subscriptions[subscription_id].holder
        assert holder is not None
        holder.token = "revoked"

    def acked(self, subscription_id: str) -> dict[str, str]:
        return dict(self.subscriptions[subscription_id].acked)

    def holder(self, subscription_id: str) -> str | None:
        sub = self.subscriptions[subscription_id]
        self._expire(sub)
        return sub.holder.worker if sub.holder else None

    def called(self, method: str) -> list[Call]:
        return [call for call in self.calls if call.method == method]

    # -- faults ----------------------------------------------------------------------------

    def script(self, method: str, *faults: Fault) -> None:
        """The next calls of `method` run these first, one each, in order."""
        self._faults[method].extend(faults)

    def answer(self, method: str, times: int = 1) -> None:
        """The next calls of `method` are answered as usual (to script a later one)."""
        self.script(method, *[trio.lowlevel.checkpoint] * times)

    def fail(self, method: str, error: ClientError | Exception, times: int = 1) -> None:
        async def raise_it() -> None:
            await trio.lowlevel.checkpoint()
            raise error

        self.script(method, *[raise_it] * times)

    def fail_transport(self, method: str, times: int = 1) -> None:
        self.fail(method, TransportError(f"{method}: ConnectError: refused"), times)

    def fail_server(self, method: str, times: int = 1) -> None:
        self.fail(method, ServerError(f"{method}: 503 unavailable", status=503), times)

    def hang(self, method: str) -> None:
        """The next call of `method` never answers (until cancelled)."""

        async def forever() -> None:
            await trio.sleep_forever()

        self.script(method, forever)

    def delay(self, method: str, seconds: float, times: int = 1) -> None:
        async def slow() -> None:
            await trio.sleep(seconds)

        self.script(method, *[slow] * times)

    def freeze(self, method: str, clock: trio.testing.MockClock, seconds: float) -> None:
        """The process is frozen for `seconds` right as the next call of `method` answers.

        Time moves on while no task runs: the caller resumes without a checkpoint in between.
        """

        async def frozen() -> None:
            await trio.lowlevel.checkpoint()
            clock.jump(seconds)

        self.script(method, frozen)

    async def _call(self, method: str, *args: Any) -> None:
        self.calls.append(Call(method, trio.current_time(), args))
        if self.down:
            await trio.lowlevel.checkpoint()
            raise Unreachable(f"{method}: ConnectError: [Errno 111] Connection refused")
        faults = self._faults[method]
        if faults:
            await faults.popleft()()
        else:
            await trio.lowlevel.checkpoint()

    # -- the rules -------------------------------------------------------------------------

    def _subscription(self, subscription_id: str, what: str) -> Subscription:
        sub = self.subscriptions.get(subscription_id)
        if sub is None:
            raise _refusal(SubscriptionNotFound, what, 404, "SUBSCRIPTION_NOT_FOUND", "no such subscription")
        self._expire(sub)
        return sub

    def _tail(self, path: str) -> str:
        return offset_of(len(self.streams[path]))

    def _pending(self, sub: Subscription) -> bool:
        return any(is_after(self._tail(path), acked) for path, acked in sub.acked.items())

    def _expire(self, sub: Subscription) -> None:
        """An expired lease frees the subscription; the server wakes again if work is pending."""
        if sub.holder is not None and trio.current_time() >= sub.holder.expires_at:
            sub.holder = None
            self._rewake(sub)

    def _rewake(self, sub: Subscription) -> None:
        if self._pending(sub):
            sub.wakes.append(sub.generation + 1)

    def _held_by(self, sub: Subscription, claim: Claim, what: str) -> Holder:
        """The holder the claim speaks for, or the refusal the server answers."""
        holder = sub.holder
        token = claim.token.get_secret_value()
        if holder is not None and (holder.wake_id, holder.generation) != (claim.wake_id, claim.generation):
            raise _refusal(Fenced, what, 409, "FENCED", "stale wake or generation")
        if holder is None:
            if sub.generation != claim.generation:
                raise _refusal(Fenced, what, 409, "FENCED", "stale wake or generation")
            raise _refusal(TokenInvalid, what, 401, "TOKEN_EXPIRED", "the claim token has expired")
        if holder.token != token:
            raise _refusal(TokenInvalid, what, 401, "TOKEN_INVALID", "unknown claim token")
        return holder

    # -- the Wire protocol -----------------------------------------------------------------

    async def create_stream(self, path: str, *, content_type: str = JSON) -> bool:
        await self._call("create_stream", path)
        if path in self.streams:
            return False
        self.streams[path] = []
        return True

    async def append(self, path: str, message: object, *, producer: Producer | None = None) -> str:
        await self._call("append", path, message)
        if path not in self.streams:
            raise StreamNotFound(f"append to {path}: 404 stream not found", status=404)
        if producer is not None and not self._producer_admits(path, producer):
            return ALREADY_APPENDED
        self.streams[path].append(message)
        self._appended.set()
        self._appended = trio.Event()
        return self._tail(path)

    def _producer_admits(self, path: str, producer: Producer) -> bool:
        """The reference server's rules (tests/test_producers.py checks them against it)."""
        what = f"append to {path}"
        epoch, last = self.producers.get((path, producer.id), (-1, -1))
        if producer.epoch < epoch:
            raise ProducerFenced(f"{what}: 403 Stale producer epoch", status=403)
        if producer.epoch > epoch:
            if producer.seq != 0:
                raise RequestError(f"{what}: 400 New epoch must start with sequence 0", status=400)
            last = -1
        if producer.seq <= last:
            return False
        if producer.seq != last + 1:
            raise ProducerSequenceGap(f"{what}: 409 Producer sequence gap", status=409)
        self.producers[(path, producer.id)] = (producer.epoch, producer.seq)
        return True

    async def tail(self, path: str, *, timeout: float | None = None) -> str:
        await self._call("tail", path, timeout)
        if path not in self.streams:
            raise StreamNotFound(f"HEAD {path}: 404 stream not found", status=404)
        return self._tail(path)

    async def read(self, path: str, offset: str) -> ReadResult:
        await self._call("read", path, offset)
        messages = self.streams.get(path)
        if messages is None:
            raise StreamNotFound(f"read {path} from {offset}: 404 stream not found", status=404)
        start = _index(offset)
        end = min(len(messages), start + self.chunk)
        at_tail = end >= len(messages)
        return ReadResult(
            list(messages[start:end]),
            offset_of(max(end, start)),
            up_to_date=at_tail,
            closed=at_tail and path in self.closed,
        )

    async def long_poll(self, path: str, offset: str, *, hold: float) -> ReadResult:
        with trio.move_on_after(hold):
            while _index(offset) >= len(self.streams.get(path, [])):
                await self._appended.wait()
        return await self.read(path, offset)

    async def open_sse(self, path: str, offset: str, *, linger: float = 0.0) -> LiveRead:
        await self._call("open_sse", path, offset)
        self.lingers.append(linger)
        if self.sse_reads:
            read = self.sse_reads.popleft()
            read.offset = offset
            return read
        if self.live_sse:
            return LiveStreamRead(self, path, offset)
        raise SSERefused(f"SSE {path} from {offset}: answered 501", status=501)

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
        await self._call("ensure_subscription", subscription_id)
        if subscription_id in self.subscriptions:
            return Links(False, dict(self.subscriptions[subscription_id].acked))
        # A (re-)created subscription links the streams that exist at their tail.
        linked = [path for path in self.streams if path in streams or (pattern and fnmatch.fnmatch(path, pattern))]
        self.subscriptions[subscription_id] = Subscription(
            subscription_id, lease_ttl_ms, acked={path: self._tail(path) for path in linked}
        )
        return Links(True, dict(self.subscriptions[subscription_id].acked))

    async def read_subscription(self, subscription_id: str) -> ServerSubscription:
        await self._call("read_subscription", subscription_id)
        sub = self._subscription(subscription_id, f"read subscription {subscription_id}")
        return ServerSubscription(subscription_id, None, None, (), sub.lease_ttl_ms, None, dict(sub.acked))

    async def delete_subscription(self, subscription_id: str) -> None:
        await self._call("delete_subscription", subscription_id)
        self.subscriptions.pop(subscription_id, None)

    async def claim(self, subscription_id: str, worker: str) -> Claim:
        what = f"claim {subscription_id}"
        await self._call("claim", subscription_id, worker)
        sub = self._subscription(subscription_id, what)
        if sub.holder is not None:
            raise AlreadyClaimed(
                f"{what}: 409 ALREADY_CLAIMED held by {sub.holder.worker}",
                status=409,
                code="ALREADY_CLAIMED",
                holder=sub.holder.worker,
                generation=sub.holder.generation,
            )
        if not self._pending(sub) and not self.grant_empty:
            raise _refusal(NoPendingWork, what, 409, "NO_PENDING_WORK", "nothing past the acked cursor")
        sub.generation += 1
        token = f"token-{next(self._tokens)}"
        now = trio.current_time()
        sub.holder = Holder(worker, f"w{sub.generation}", sub.generation, token, now + sub.lease_ttl_ms / 1000)
        return Claim(
            subscription=subscription_id,
            wake_id=sub.holder.wake_id,
            generation=sub.generation,
            streams=tuple(
                ClaimedStream(path, acked, self._tail(path), is_after(self._tail(path), acked))
                for path, acked in sub.acked.items()
            ),
            lease_ttl_ms=sub.lease_ttl_ms,
            token=SecretStr(token),
        )

    async def ack(self, claim: Claim, acks: Sequence[Ack], *, done: bool = False) -> AckAnswer:
        what = f"ack {claim.subscription} (generation {claim.generation})"
        await self._call("ack", tuple(acks), done)
        sub = self._subscription(claim.subscription, what)
        holder = self._held_by(sub, claim, what)
        for ack in acks:
            current = sub.acked.get(ack.stream)
            if (
                current is None
                or ack.offset == START
                or is_after(current, ack.offset)
                or is_after(ack.offset, self._tail(ack.stream))
            ):
                raise _refusal(InvalidOffset, what, 409, "INVALID_OFFSET", f"{ack.stream} at {ack.offset}")
        for ack in acks:
            sub.acked[ack.stream] = ack.offset
        if not done:
            holder.expires_at = trio.current_time() + sub.lease_ttl_ms / 1000
            if not self.refresh_tokens:
                return AckAnswer(False)
            holder.token = f"token-{next(self._tokens)}"
            return AckAnswer(False, SecretStr(holder.token))
        sub.holder = None
        return AckAnswer(self._pending(sub))

    async def release(self, claim: Claim) -> None:
        what = f"release {claim.subscription} (generation {claim.generation})"
        await self._call("release", claim.generation)
        sub = self._subscription(claim.subscription, what)
        self._held_by(sub, claim, what)
        sub.holder = None
        self._rewake(sub)
