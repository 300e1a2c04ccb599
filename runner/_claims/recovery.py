"""Recovering from the runner's own restarts and the server's (docs/design.md §6.4-6.5).

- Claims an earlier run of this runner still held (it was killed) are handed back at
  start with their stored tokens, so the work goes on now instead of when the lease ends.
- What a re-created subscription skipped (the journal's gaps) is handed to the handler
  before the subscription is claimed again. A replay never stalls the subscription: a gap
  the server refuses for good (a 4xx other than not-found, e.g. an offset it cannot parse)
  is dropped with a warning and counted; one that fails for now (5xx, no answer, a refused
  token) waits for a backoff while the subscription is claimed and served as usual.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Protocol

import structlog
import trio

from .._secrets import Redactor
from .._state.journal import Gap, Journal
from .._wire.protocol import Wire, is_after
from .._wire.retrying import Backoff, retrying
from ..errors import (
    ClientError,
    Fenced,
    RequestError,
    StreamNotFound,
    SubscriptionNotFound,
    TokenInvalid,
    TokenRefused,
)
from .delivery import Delivery
from .outcome import GAP_REPLAY_FAILED, Outcome, Reports

log = structlog.get_logger("pullwake.claims")


class ReplayPacing:
    """When a replay that failed for now may be tried again (one per subscription)."""

    def __init__(self, backoff: Backoff | None = None) -> None:
        self._backoff = backoff or Backoff(1.0, 60.0)
        self._due = -math.inf

    def due(self) -> bool:
        return trio.current_time() >= self._due

    def failed(self) -> float:
        delay = self._backoff.next_delay()
        self._due = trio.current_time() + delay
        return delay

    def succeeded(self) -> None:
        self._backoff.reset()
        self._due = -math.inf


class ReplayContext(Protocol):
    """What a replay needs of the runner (a `ClaimContext` has it)."""

    @property
    def wire(self) -> Wire: ...
    @property
    def journal(self) -> Journal: ...
    @property
    def vitals(self) -> Reports: ...
    @property
    def deliver(self) -> Delivery: ...
    @property
    def replays(self) -> ReplayPacing: ...


class ReplayRun(Protocol):
    """The claim attempt a replay runs in (`runner._claims.claim.ClaimRun`): it shows what the replay is doing."""

    subscription: str
    stream: str | None
    batches_done: int
    replayed_to: dict[str, str]
    """Stream -> where a replay's last batch ended, when that is past its gap (a read returns what is
    there): the claim that follows starts there rather than hand those events over twice."""

    @property
    def context(self) -> ReplayContext: ...


async def replay_gaps(run: ReplayRun) -> Outcome | None:
    """Hand the handler what the server skipped when it re-created the subscription.

    Returns None when the claim may go on: every gap was replayed or dropped, or a replay
    failed for now and waits for its backoff (the gap stays in the journal). Else how the
    replay ended: the handler failed a replayed batch (tried again after the cooldown).
    """
    context = run.context
    if not context.replays.due():
        return None
    for gap in context.journal.gaps(run.subscription):
        log.warning(
            "subscription.gap_replay",
            subscription=run.subscription,
            stream=gap.stream,
            start=gap.start,
            end=gap.end,
            detail="the server re-created the subscription past these events: handing them over again",
        )
        run.stream = gap.stream
        try:
            ended = await _replay_gap(run, gap)
        except ClientError as exc:
            # For now only (5xx, no answer, a refused token): new events are not held up by it.
            delay = context.replays.failed()
            context.vitals.error(exc)
            context.vitals.problem(GAP_REPLAY_FAILED, run.subscription)
            context.vitals.gap("replay_failed")
            log.warning(
                "subscription.gap_replay_failed",
                subscription=run.subscription,
                stream=gap.stream,
                error=str(exc),
                retry_in=round(delay, 1),
            )
            run.stream = None
            return None
        if ended is not None:
            return ended
        context.vitals.gap("replayed")
    context.replays.succeeded()
    context.vitals.resolved(GAP_REPLAY_FAILED, run.subscription)
    run.stream = None
    return None


async def _replay_gap(run: ReplayRun, gap: Gap) -> Outcome | None:
    context, subscription = run.context, run.subscription
    remaining: Gap | None = gap
    while remaining is not None:
        start = remaining.start
        try:
            result = await retrying(
                partial(context.wire.read, gap.stream, start),
                what=f"replay {gap.stream}",
                report=context.vitals.error,
            )
        except StreamNotFound:
            log.warning("subscription.gap_gone", subscription=subscription, stream=gap.stream)
            context.journal.replayed(subscription, remaining, remaining.end)
            return None
        except TokenRefused:
            raise  # not this gap's fault: tried again after the backoff
        except RequestError as exc:
            # Refused for good (e.g. 400 "Invalid offset format"): retrying would never end.
            context.vitals.error(exc)
            context.vitals.gap("dropped")
            log.warning(
                "subscription.gap_dropped",
                subscription=subscription,
                stream=gap.stream,
                start=start,
                end=remaining.end,
                error=str(exc),
                detail="the server refuses to read this range; these events are not replayed",
            )
            context.journal.replayed(subscription, remaining, remaining.end)
            return None
        if not result.messages or not is_after(result.next_offset, start):
            context.journal.replayed(subscription, remaining, remaining.end)
            return None
        if (
            await context.deliver(gap.stream, start, result, wake_id="replay", generation=0, replayed=True)
            is Outcome.FAILED
        ):
            return Outcome.FAILED
        run.batches_done += 1
        if is_after(result.next_offset, gap.end):
            run.replayed_to[gap.stream] = result.next_offset
        remaining = context.journal.replayed(subscription, remaining, result.next_offset)
    return None


async def return_held_claims(wire: Wire, journal: Journal, redactor: Redactor) -> list[str]:
    """Hand back the claims an earlier run of this runner still held (it was killed, say).

    The stored claim token still proves the claim, so the next claim, by this runner
    or another, starts at once instead of when the lease runs out. Returns the
    subscriptions handed back.
    """
    returned: list[str] = []
    for held in journal.held_claims():
        try:
            with redactor.holding(held.token):
                await wire.release(held.as_claim())
        except (Fenced, TokenInvalid, SubscriptionNotFound, StreamNotFound) as exc:
            log.info("claim.already_gone", subscription=held.subscription, reason=str(exc))
        except ClientError as exc:
            log.warning("claim.return_failed", subscription=held.subscription, error=str(exc))
            continue
        else:
            log.warning(
                "claim.returned",
                subscription=held.subscription,
                generation=held.generation,
                detail="an earlier run held this claim; handed back so the work continues now",
            )
            returned.append(held.subscription)
        journal.ended(held.subscription, held.wake_id)
    return returned
