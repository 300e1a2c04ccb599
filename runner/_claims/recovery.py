"""Recovering from the runner's own restarts and the server's (docs/design.md §6.4-6.5).

- Claims an earlier run of this runner still held (it was killed) are handed back at
  start with their stored tokens, so the work goes on now instead of when the lease ends.
- What a re-created subscription skipped (the journal's gaps) is handed to the handler
  before the subscription is claimed again.
"""

from __future__ import annotations

from functools import partial
from typing import Protocol

import structlog

from .._secrets import Redactor
from .._state.journal import Gap, Journal
from .._wire.protocol import Wire, is_after
from .._wire.retrying import retrying
from ..errors import ClientError, Fenced, StreamNotFound, SubscriptionNotFound, TokenInvalid
from .delivery import Delivery
from .outcome import Outcome, Reports

log = structlog.get_logger("pullwake.claims")


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


class ReplayRun(Protocol):
    """The claim attempt a replay runs in (`runner._claims.claim.ClaimRun`): it shows what the replay is doing."""

    subscription: str
    stream: str | None
    batches_done: int

    @property
    def context(self) -> ReplayContext: ...


async def replay_gaps(run: ReplayRun) -> Outcome | None:
    """Hand the handler what the server skipped when it re-created the subscription.

    Returns None when every gap was replayed, else how the replay ended (the gap
    stays in the journal and is tried again after the cooldown).
    """
    for gap in run.context.journal.gaps(run.subscription):
        log.warning(
            "subscription.gap_replay",
            subscription=run.subscription,
            stream=gap.stream,
            start=gap.start,
            end=gap.end,
            detail="the server re-created the subscription past these events: handing them over again",
        )
        run.stream = gap.stream
        ended = await _replay_gap(run, gap)
        if ended is not None:
            return ended
        run.context.vitals.gap("replayed")
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
        except ClientError as exc:
            context.vitals.error(exc)
            log.warning("subscription.gap_replay_failed", subscription=subscription, error=str(exc))
            return Outcome.ERROR
        if not result.messages or not is_after(result.next_offset, start):
            context.journal.replayed(subscription, remaining, remaining.end)
            return None
        if (
            await context.deliver(gap.stream, start, result, wake_id="replay", generation=0, replayed=True)
            is Outcome.FAILED
        ):
            return Outcome.FAILED
        run.batches_done += 1
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
