"""Managed subscriptions: the server keeps them in memory, so we keep putting them back."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence

import structlog
import trio

from .._config import SubscriptionSpec
from .._health import Vitals
from .._state.journal import Journal
from .._wire.protocol import Wire
from ..errors import ClientError, StreamConflict, SubscriptionConflict

log = structlog.get_logger("pullwake.subscriptions")

# Subscriptions created or confirmed at the same time: a start costs M requests, not M round trips.
CONFIRMING_AT_ONCE = 16


class SubscriptionKeeper:
    """Ensures the wake stream and every managed subscription exist (idempotent PUTs).

    The wake stream is ensured at every connect, before it is opened; the subscriptions at
    the first connect of a run (concurrently, and with a fleet only this runner's share),
    and then whenever a claim finds one gone (after a server restart, the sweep of the new
    connection finds them all). A subscription that exists with another configuration is
    reported and left alone: the operator decides which one is right. When one
    the journal knew had to be created again, the server forgot it and linked its
    streams past events nobody handled: those ranges go to the journal as gaps
    to replay (or are only reported, with `on_subscription_lost = "skip"`).
    """

    def __init__(
        self,
        wire: Wire,
        specs: Sequence[SubscriptionSpec],
        *,
        wake_stream: str,
        journal: Journal,
        vitals: Vitals,
        replay: bool = True,
    ) -> None:
        self._wire = wire
        self._journal = journal
        self._vitals = vitals
        self._replay = replay
        self._specs = {spec.id: spec for spec in specs if spec.manage}
        self._wake_stream = wake_stream
        self.conflicts: set[str] = set()

    @property
    def managed(self) -> bool:
        return bool(self._specs)

    async def ensure_wake_stream(self) -> None:
        """Create the wake stream if the runner manages subscriptions (they need it to write to)."""
        if not self._specs:
            return
        try:
            await self._wire.create_stream(self._wake_stream)
        except StreamConflict as exc:
            log.error("wake_stream.conflict", wake_stream=self._wake_stream, error=str(exc))

    async def ensure_all(self, share: Callable[[str], Awaitable[bool]] | None = None) -> None:
        """Create or confirm every managed subscription `share` says is this runner's, some at a time.

        Raises the first `ClientError` (the rest are cancelled): the caller tries the pass again.
        """
        limiter = trio.CapacityLimiter(CONFIRMING_AT_ONCE)
        failure: ClientError | None = None

        async def one(subscription: str, scope: trio.CancelScope) -> None:
            nonlocal failure
            if share is not None and not await share(subscription):
                return
            async with limiter:
                try:
                    await self.ensure(subscription)
                except ClientError as exc:
                    failure = failure or exc
                    scope.cancel()

        async with trio.open_nursery() as nursery:
            for subscription in self._specs:
                nursery.start_soon(one, subscription, nursery.cancel_scope)
        if failure is not None:
            raise failure

    async def ensure(self, subscription_id: str) -> bool:
        """Create or confirm one managed subscription; True if it is there now as configured.

        False for a subscription this runner does not manage, or one that exists with
        another configuration.
        """
        spec = self._specs.get(subscription_id)
        if spec is None:
            return False
        try:
            links = await self._wire.ensure_subscription(
                spec.id,
                wake_stream=self._wake_stream,
                pattern=spec.pattern,
                streams=spec.streams,
                lease_ttl_ms=spec.lease_ttl_ms,
                description=spec.description,
            )
        except SubscriptionConflict:
            if spec.id not in self.conflicts:
                log.error(
                    "subscription.conflict",
                    subscription=spec.id,
                    detail="a subscription with this id exists with a different configuration; "
                    "serving it as it is. Delete it on the server or change the id to apply ours.",
                )
            self.conflicts.add(spec.id)
            return False
        self.conflicts.discard(spec.id)
        if links.created:
            log.info("subscription.created", subscription=spec.id, pattern=spec.pattern, streams=list(spec.streams))
        for gap in self._journal.linked(spec.id, links.streams, created=links.created, keep_gaps=self._replay):
            log.warning(
                "subscription.lost",
                subscription=spec.id,
                stream=gap.stream,
                start=gap.start,
                end=gap.end,
                action="replay" if self._replay else "skip",
                detail="the server forgot the subscription and re-created it past events nobody handled",
            )
            if not self._replay:
                self._vitals.gap("skipped")
        return True
