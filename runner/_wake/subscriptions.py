"""Managed subscriptions: the server keeps them in memory, so we keep putting them back."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import structlog
import trio

from .._config import Settings, SubscriptionSpec
from .._dispatch import CONFIRMING_AT_ONCE
from .._health import Vitals
from .._runs.listing import open_wire
from .._state.journal import Journal
from .._wire.protocol import ServerSubscription, Wire
from ..errors import ClientError, StreamConflict, SubscriptionConflict, SubscriptionNotFound

log = structlog.get_logger("pullwake.subscriptions")


class SubscriptionKeeper:
    """Ensures the wake stream and every managed subscription exist (idempotent PUTs).

    The wake stream is ensured at every connect, before it is opened; the subscriptions at
    the first connect of a run (concurrently, and with a fleet only this runner's share),
    and then whenever a claim finds one gone (after a server restart, the sweep of the new
    connection finds them all). A subscription that exists with another configuration is
    reported, with what differs, and left alone: the operator decides which one is right
    (a reload may replace it, `replace`). When one
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
        self._specs: dict[str, SubscriptionSpec] = {}
        self._wake_stream = wake_stream
        self.conflicts: set[str] = set()
        self._confirmed: set[str] = set()
        """Created or confirmed in this run (a conflict counts: it was asked)."""
        self.update(specs)

    def update(self, specs: Sequence[SubscriptionSpec]) -> None:
        """Manage these from now on (a reload); a changed one's conflict is reported again."""
        managed = {spec.id: spec for spec in specs if spec.manage}
        self.conflicts -= {sub for sub in self.conflicts if managed.get(sub) != self._specs.get(sub)}
        self._specs = managed

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
            async with limiter:
                # Asked as its turn comes, not up front: with a fleet, a member heard meanwhile
                # (or what it vouched for) narrows this runner's share.
                if share is not None and not await share(subscription):
                    return
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

    async def confirm(self, subscription_id: str) -> None:
        """Create or confirm one managed subscription, unless that was done in this run already, by
        this runner or by a peer (it said so on the fleet stream: `Journal.vouched`).

        What a peer linked exists; if the server forgot it since, the claim puts it back with its
        gap from the offsets learned (nothing lost). Only a conflict (the same id with another
        configuration) is then reported by the peer that confirmed it, not here.
        """
        if subscription_id not in self._confirmed and subscription_id not in self._journal.vouched:
            await self.ensure(subscription_id)

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
            self._confirmed.add(spec.id)
            if spec.id not in self.conflicts:
                self.conflicts.add(spec.id)
                log.error(
                    "subscription.conflict",
                    subscription=spec.id,
                    differs=await self.differences(spec),
                    detail="a subscription with this id exists with a different configuration; serving it as "
                    "it is. To apply ours: reload with on_subscription_changed = 'replace', or delete it "
                    "(pullwake subscriptions delete) and restart, or change the id.",
                )
            return False
        self.conflicts.discard(spec.id)
        self._confirmed.add(spec.id)
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

    async def differences(self, spec: SubscriptionSpec) -> list[str] | None:
        """What the server's version of `spec` has otherwise (`key: server ... configured ...`); None if unreadable."""
        try:
            return differences(spec, self._wake_stream, await self._wire.read_subscription(spec.id))
        except ClientError:
            return None

    async def replace(self, subscription_id: str) -> bool:
        """Delete the server's version and create ours; True if ours is there now.

        The server links the streams of a new subscription at their tail: what lay between the
        acknowledged offsets and the tail comes back as gaps the next claim replays (`ensure`).
        """
        await self._wire.delete_subscription(subscription_id)
        self.conflicts.discard(subscription_id)
        return await self.ensure(subscription_id)

    async def delete(self, subscription_id: str) -> None:
        await self._wire.delete_subscription(subscription_id)


def differences(spec: SubscriptionSpec, wake_stream: str, found: ServerSubscription) -> list[str]:
    """Where the server's version of a subscription differs from `spec`, one `key: server ..., configured ...` each."""
    ours = {
        "wake_stream": wake_stream,
        "pattern": spec.pattern or None,
        "streams": tuple(sorted(spec.streams)),
        "lease_ttl_ms": spec.lease_ttl_ms,
        "description": spec.description,
    }
    theirs = {
        "wake_stream": found.wake_stream,
        "pattern": found.pattern or None,
        "streams": found.explicit,
        "lease_ttl_ms": found.lease_ttl_ms,
        "description": found.description,
    }
    return [
        f"{key}: server {theirs[key]!r}, configured {value!r}" for key, value in ours.items() if theirs[key] != value
    ]


async def list_subscriptions(settings: Settings, extra: Sequence[str] = ()) -> list[dict[str, Any]]:
    """The configured subscriptions (and `extra` ids) as the server has them, read from the server alone.

    The protocol cannot list a server's subscriptions: only those named can be read.
    """
    listed: list[dict[str, Any]] = []
    async with open_wire(settings) as wire:
        for subscription in dict.fromkeys([*(spec.id for spec in settings.subscriptions), *extra]):
            spec = settings.subscription(subscription)
            entry: dict[str, Any] = {"id": subscription, "configured": spec is not None, "on_server": False}
            try:
                found = await wire.read_subscription(subscription)
            except SubscriptionNotFound:
                listed.append(entry)
                continue
            entry.update(
                on_server=True,
                differs=differences(spec, settings.wake_stream, found) if spec is not None else None,
                wake_stream=found.wake_stream,
                pattern=found.pattern,
                streams=list(found.explicit),
                lease_ttl_ms=found.lease_ttl_ms,
                description=found.description,
                linked=found.linked,
            )
            listed.append(entry)
    return listed


async def delete_subscription(settings: Settings, subscription: str) -> None:
    async with open_wire(settings) as wire:
        await wire.delete_subscription(subscription)
