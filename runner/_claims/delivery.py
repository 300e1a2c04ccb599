"""Handing one batch to a subscription's handler (docs/design.md §5.6): retries, then a dead letter or a failure.

Used by a held claim for the batches it reads, and by the replay of a gap the
server skipped; it knows nothing of leases or acks.
"""

from __future__ import annotations

from dataclasses import replace

import structlog
import trio

from .._config import Settings
from .._handlers.batch import SUSPEND, AsyncHandler, Batch
from .._tracing import OFF, Tracing
from .._wire.protocol import ReadResult, Wire
from .._wire.retrying import Backoff, retrying
from ..errors import ClientError, Fenced, PermanentFailure
from .outcome import HANDLER_FAILING, Outcome, Reports

log = structlog.get_logger("pullwake.claims")


class DeadLetters:
    """Appends exhausted batches to dead-letter streams, creating each stream once per run."""

    def __init__(self, wire: Wire) -> None:
        self._wire = wire
        self._created: set[str] = set()

    async def send(self, stream: str, letter: dict[str, object]) -> None:
        if stream not in self._created:
            await retrying(lambda: self._wire.create_stream(stream), what="create dead-letter stream")
            self._created.add(stream)
        await retrying(lambda: self._wire.append(stream, letter), what="dead-letter")


class Delivery:
    """One subscription's handler, with the retry and give-up rules around it."""

    def __init__(
        self,
        subscription: str,
        handler: AsyncHandler,
        settings: Settings,
        vitals: Reports,
        dead_letters: DeadLetters,
        tracing: Tracing = OFF,
    ) -> None:
        self.subscription = subscription
        self.handler = handler
        self.settings = settings
        self.vitals = vitals
        self.dead_letters = dead_letters
        self.tracing = tracing

    async def __call__(
        self, stream: str, start: str, read: ReadResult, *, wake_id: str, generation: int, replayed: bool = False
    ) -> Outcome:
        """Hand what `read` found in `stream` after `start` to the handler, as one batch.

        COMPLETED, SUSPENDED, DEAD_LETTERED (given up, and kept aside) or FAILED (given up).
        The one place a `Batch` is made: for a held claim's reads and for a replayed gap alike.
        """
        first = Batch(
            subscription=self.subscription,
            stream=stream,
            messages=read.messages,
            start_offset=start,
            next_offset=read.next_offset,
            wake_id=wake_id,
            generation=generation,
            attempt=1,
            replayed=replayed,
        )
        settings = self.settings
        backoff = Backoff(
            settings.handler_retry_initial, max(settings.handler_retry_max, settings.handler_retry_initial)
        )
        error: BaseException | None = None
        for attempt in range(1, settings.handler_max_attempts + 1):
            batch = first if attempt == 1 else replace(first, attempt=attempt)
            started = trio.current_time()
            try:
                with self.tracing.process(
                    self.subscription, stream, len(batch.messages), attempt=attempt, replayed=replayed
                ):
                    if settings.handler_timeout is None:
                        result = await self.handler(batch)
                    else:
                        with trio.fail_after(settings.handler_timeout):
                            result = await self.handler(batch)
            except Fenced:
                # The handler found the claim is someone else's (a durable run's journal refused
                # our producer epoch): no retry, no dead letter; the claim decides.
                self.vitals.handler_ran(trio.current_time() - started)
                raise
            except PermanentFailure as exc:
                self.vitals.handler_ran(trio.current_time() - started)
                error = exc
                self.vitals.error(f"handler of {self.subscription}: {exc}")
                log.warning("batch.failed", stream=batch.stream, attempt=attempt, error=str(exc), permanent=True)
                break
            except Exception as exc:
                self.vitals.handler_ran(trio.current_time() - started)
                error = exc
                described = f"{type(exc).__name__}: {exc}"
                self.vitals.error(f"handler of {self.subscription}: {described}")
                log.warning("batch.failed", stream=batch.stream, attempt=attempt, error=described)
                if attempt < settings.handler_max_attempts:
                    self.vitals.batch("retried")
                    await trio.sleep(backoff.next_delay())
            else:
                took = trio.current_time() - started
                self.vitals.handler_ran(took)
                self.vitals.events_handled(len(batch.messages))
                self.vitals.batch("suspended" if result is SUSPEND else "ok")
                self.vitals.resolved(HANDLER_FAILING, self.subscription)
                log.debug("batch.done", stream=batch.stream, size=len(batch.messages), took=round(took, 6))
                return Outcome.SUSPENDED if result is SUSPEND else Outcome.COMPLETED
        assert error is not None
        return await self._give_up(first, error)

    async def _give_up(self, batch: Batch, error: BaseException) -> Outcome:
        spec = self.settings.subscription(self.subscription)
        stream = (spec.dead_letter_stream if spec else None) or self.settings.dead_letter_stream
        if stream is None:
            self.vitals.batch("failed")
            # Blocked (as documented) until a batch succeeds: visible in health and metrics.
            self.vitals.problem(HANDLER_FAILING, self.subscription)
            return Outcome.FAILED
        letter: dict[str, object] = {
            "type": "dead_letter",
            "runner_id": self.settings.runner_id,
            "error": f"{type(error).__name__}: {error}",
            "batch": batch.to_json(),
        }
        try:
            await self.dead_letters.send(stream, letter)
        except ClientError as exc:
            log.error("batch.dead_letter_failed", dead_letter_stream=stream, error=str(exc))
            self.vitals.batch("failed")
            self.vitals.problem(HANDLER_FAILING, self.subscription)
            return Outcome.FAILED
        log.warning("batch.dead_lettered", stream=batch.stream, dead_letter_stream=stream, error=letter["error"])
        self.vitals.batch("dead_lettered")
        self.vitals.resolved(HANDLER_FAILING, self.subscription)
        return Outcome.DEAD_LETTERED
