"""The claim's first read, sent beside `POST /claim` (docs/design.md §5.5)."""

from __future__ import annotations

import structlog
import trio

from .._state.journal import Journal
from .._wire.protocol import Claim, ReadResult, Wire
from ..errors import ClientError

log = structlog.get_logger("pullwake.claims")


class EarlyRead:
    """The claim's first read, sent beside `POST /claim` from where the runner last acknowledged.

    It saves a round trip on the critical path. Only a subscription with one known stream
    gets one (with more, which of them has the new events is a guess). It is only ever
    used for the claim's first batch, after the claim is granted, and only if the claim
    says the stream's unread events start at the offset read from; a failed or empty one
    is read again the usual way.
    """

    def __init__(self, stream: str, offset: str) -> None:
        self.stream = stream
        self.offset = offset
        self.result: ReadResult | None = None
        self._scope = trio.CancelScope()
        self._done = trio.Event()

    @classmethod
    def predicted(cls, journal: Journal, subscription: str) -> EarlyRead | None:
        known = journal.sole_stream(subscription)
        return None if known is None else cls(*known)

    async def fetch(self, wire: Wire) -> None:
        try:
            with self._scope:
                self.result = await wire.read(self.stream, self.offset)
        except ClientError as exc:
            log.debug("claim.early_read_failed", stream=self.stream, error=str(exc))
        except Exception:
            # A bug here must not take the claim (or the runner) down: the usual read follows.
            log.exception("claim.early_read_crashed", stream=self.stream)
        finally:
            self._done.set()

    def cancel(self) -> None:
        self._scope.cancel()

    def matches(self, claim: Claim) -> bool:
        """Is this read worth waiting for: the claim has unread events right where it reads?"""
        return any(
            stream.path == self.stream and stream.has_pending and stream.acked_offset == self.offset
            for stream in claim.streams
        )

    async def take(self, stream: str, offset: str) -> ReadResult | None:
        """The result, once it is in, if it is the read the claim needs now and it found events."""
        if (stream, offset) != (self.stream, self.offset):
            self.cancel()
            return None
        await self._done.wait()
        result, self.result = self.result, None
        return result if result is not None and result.messages else None
