"""Live subscription changes: a reload applies a new configuration's subscriptions to a running runner.

Added subscriptions are created (or confirmed) on the server, served, and swept. Removed
ones take no new wake; a claim in flight on one runs to its end (acked, handed back) and
only then is the subscription deleted on the server, if `delete_removed_subscriptions`
says so. One whose server-side configuration changed is kept as the server has it (the
conflict is reported with what differs) or, with `on_subscription_changed = "replace"`,
drained, deleted and created again: its streams are linked at their tail, and the events
between the acknowledged offsets and the tail come back as gaps the next claim replays.
A change of handler alone applies from the next claim. No claim is cut by a reload.

What waits for a claim in flight (a delete, a replace) goes on in the background; the
answer says which subscriptions are draining, and `Reloaded.settled` is set when all is done.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass, field
from typing import Any

import structlog
import trio

from .._claims.claim import ClaimContext
from .._config import Settings, SubscriptionSpec
from .._dispatch import Dispatcher
from ..errors import ClientError
from .subscriptions import SubscriptionKeeper

log = structlog.get_logger("pullwake.reload")


@dataclass(frozen=True)
class Reloaded:
    """What a reload changed."""

    added: list[str]
    removed: list[str]
    changed: dict[str, str]
    """Subscription -> what became of it: `replaced` (on the server), `kept` (the server's version
    stays: it differs from ours), `applied` (the server had ours already), `updated` (the handler
    or another local setting only)."""
    draining: list[str]
    """Removed or replaced subscriptions whose claim in flight must end before the server is touched."""
    kept_settings: list[str]
    """Settings that differ in the new configuration but cannot change while running."""
    problems: list[str]
    """What could not be done on the server now (it is logged, and put right by the claims' own path)."""
    settled: trio.Event = field(default_factory=trio.Event, compare=False, repr=False)
    """Set once every drain, delete and replace this reload started has ended."""

    def to_dict(self) -> dict[str, Any]:
        return {
            "added": self.added,
            "removed": self.removed,
            "changed": self.changed,
            "draining": self.draining,
            "kept_settings": self.kept_settings,
            "problems": self.problems,
        }


_ON_THE_SERVER = ("pattern", "streams", "lease_ttl_ms", "description")


def _changed_on_the_server(old: SubscriptionSpec | None, new: SubscriptionSpec | None) -> bool:
    if new is None or not new.manage:
        return False
    if old is None or not old.manage:
        return True  # managed only from now on: confirm it
    return any(getattr(old, key) != getattr(new, key) for key in _ON_THE_SERVER)


async def apply_reload(
    old: Settings,
    new: Settings,
    handlers: Collection[str],
    *,
    dispatcher: Dispatcher,
    keeper: SubscriptionKeeper,
    context_of: Callable[[str], ClaimContext],
    background: trio.Nursery,
    kept_settings: list[str],
) -> Reloaded:
    """Make `dispatcher` and the server serve `handlers` (every subscription `new` serves).

    `old` is the configuration in force; `context_of` builds a subscription's claim context
    under `new`; what must wait for a claim in flight runs in `background`.
    """
    served = set(dispatcher.served)
    added = sorted(set(handlers) - served)
    removed = sorted(served - set(handlers))
    common = sorted(served & set(handlers))
    on_server = [sub for sub in common if _changed_on_the_server(old.subscription(sub), new.subscription(sub))]
    updated = [sub for sub in common if sub not in on_server and old.subscription(sub) != new.subscription(sub)]
    keeper.update(new.subscriptions)
    problems: list[str] = []
    waits: list[Callable[[], Awaitable[None]]] = []
    draining: list[str] = []

    def later(subscription: str, ended: trio.Event, then: Callable[[], Awaitable[None]]) -> None:
        async def after_drain() -> None:
            await ended.wait()
            if dispatcher.serves(subscription) and subscription in removed:
                return  # a later reload added it back while it drained
            await then()

        draining.append(subscription)
        waits.append(after_drain)

    for subscription in removed:
        ended = dispatcher.retire(subscription)
        spec = old.subscription(subscription)
        step: Callable[[], Awaitable[None]] = _nothing
        if new.delete_removed_subscriptions and spec is not None and spec.manage:
            step = _deleting(keeper, subscription, problems)
        if ended.is_set():
            await step()
        else:
            later(subscription, ended, step)

    await _ensure(keeper, [sub for sub in added if _managed(new, sub)], problems)
    for subscription in added + updated:
        dispatcher.add(subscription, context_of(subscription))

    changed = dict.fromkeys(updated, "updated")
    for subscription in on_server:
        if new.on_subscription_changed == "replace" and await keeper.differences(_spec(new, subscription)) != []:
            changed[subscription] = "replaced"
            ended = dispatcher.retire(subscription)
            replace = _replacing(keeper, dispatcher, subscription, context_of, problems)
            if ended.is_set():
                await replace()
            else:
                later(subscription, ended, replace)
        else:
            dispatcher.add(subscription, context_of(subscription))
            try:
                confirmed = await keeper.ensure(subscription)
            except ClientError as exc:
                confirmed = False
                problems.append(f"{subscription}: not confirmed on the server: {exc}")
            changed[subscription] = "applied" if confirmed else "kept"

    reloaded = Reloaded(added, removed, changed, sorted(draining), kept_settings, problems)
    log.info("reload.applied", **reloaded.to_dict())
    if waits:
        background.start_soon(_settle, waits, reloaded.settled, name="reload")
    else:
        reloaded.settled.set()
    return reloaded


async def _nothing() -> None:
    pass


def _managed(settings: Settings, subscription: str) -> bool:
    spec = settings.subscription(subscription)
    return spec is not None and spec.manage


def _spec(settings: Settings, subscription: str) -> SubscriptionSpec:
    spec = settings.subscription(subscription)
    assert spec is not None
    return spec


async def _ensure(keeper: SubscriptionKeeper, subscriptions: list[str], problems: list[str]) -> None:
    """Create the added subscriptions (some at a time); one the server cannot take now is put back by its claim."""
    wanted = set(subscriptions)

    async def only_added(subscription: str) -> bool:
        return subscription in wanted

    try:
        await keeper.ensure_all(only_added)
    except ClientError as exc:
        log.warning("reload.create_failed", error=str(exc), detail="the first claim of each creates it")
        problems.append(f"not created on the server yet: {exc}")


def _deleting(keeper: SubscriptionKeeper, subscription: str, problems: list[str]) -> Callable[[], Awaitable[None]]:
    async def delete() -> None:
        try:
            await keeper.delete(subscription)
        except ClientError as exc:
            log.error("subscription.delete_failed", subscription=subscription, error=str(exc))
            problems.append(f"{subscription}: not deleted on the server: {exc}")
            return
        log.info("subscription.deleted", subscription=subscription, detail="removed from the configuration")

    return delete


def _replacing(
    keeper: SubscriptionKeeper,
    dispatcher: Dispatcher,
    subscription: str,
    context_of: Callable[[str], ClaimContext],
    problems: list[str],
) -> Callable[[], Awaitable[None]]:
    async def replace() -> None:
        try:
            if await keeper.replace(subscription):
                log.warning(
                    "subscription.replaced",
                    subscription=subscription,
                    detail="deleted and created again: its streams were linked at their tail; what lay "
                    "between the acknowledged offsets and the tail is replayed",
                )
        except ClientError as exc:
            log.error("subscription.replace_failed", subscription=subscription, error=str(exc))
            problems.append(f"{subscription}: not replaced on the server: {exc}")
        # Served again whatever the server said: a claim puts a missing subscription back.
        dispatcher.add(subscription, context_of(subscription))

    return replace


async def _settle(waits: list[Callable[[], Awaitable[None]]], settled: trio.Event) -> None:
    try:
        async with trio.open_nursery() as nursery:
            for wait in waits:
                nursery.start_soon(wait)
    finally:
        settled.set()
