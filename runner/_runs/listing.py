"""Runs read and driven from outside a runner: list them, start one, send one an event.

Everything here talks to the server alone, so it works with or without a runner up.

Which streams are runs: the reference server cannot list streams, but it can list the
streams a subscription links (GET of the subscription), which are exactly those its
pattern matched plus those it names. The listing takes those, and the configured
`streams`. A subscription the server has forgotten (a reference server after a restart)
lists nothing until a runner puts it back.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager, suppress
from typing import Any

from .._config import Settings
from .._wire.client import StreamsClient, build_http
from .._wire.protocol import Wire
from ..errors import ConfigError, StreamNotFound, SubscriptionNotFound
from .journal import JOURNAL_PREFIX, JournalState, glob_match, journal_path, read_all


@asynccontextmanager
async def open_wire(settings: Settings) -> AsyncIterator[StreamsClient]:
    async with build_http(settings.server_url, timeout=settings.request_timeout) as http:
        yield StreamsClient(
            http, stream_root=settings.stream_root, token=settings.service_token(), timeout=settings.request_timeout
        )


async def run_paths(wire: Wire, settings: Settings, subscription: str) -> list[str]:
    spec = settings.subscription(subscription)
    paths = set(spec.streams) if spec is not None else set()
    with suppress(SubscriptionNotFound):  # forgotten by the server: only the configured streams are known
        paths |= set((await wire.read_subscription(subscription)).linked)
    return sorted(path for path in paths if not path.startswith(JOURNAL_PREFIX))


async def list_runs(settings: Settings, subscriptions: Sequence[str]) -> list[dict[str, Any]]:
    """One document per run: `id` (the run stream's path), `subscription`, `status`, `waiting_for`, `steps`."""
    runs: list[dict[str, Any]] = []
    async with open_wire(settings) as wire:
        for subscription in subscriptions:
            for path in await run_paths(wire, settings, subscription):
                entries = await read_all(wire, journal_path(path))
                state = JournalState.of(entries or [])
                runs.append({**state.view(path, now=time.time()), "subscription": subscription})
    return runs


def workflow_subscriptions(settings: Settings) -> list[str]:
    return [spec.id for spec in settings.subscriptions if spec.workflow]


async def start_run(settings: Settings, subscription: str, run_path: str, run_input: Any) -> None:
    """Create the run stream with its input as the first message; refuses a run that exists."""
    spec = settings.subscription(subscription)
    if spec is None:
        raise ConfigError(f"no subscription {subscription!r} in the configuration")
    if not (run_path in spec.streams or (spec.pattern and glob_match(spec.pattern, run_path))):
        raise ConfigError(f"{run_path!r} is not a stream of subscription {subscription!r} (pattern {spec.pattern!r})")
    async with open_wire(settings) as wire:
        await wire.create_stream(run_path)
        if await read_all(wire, run_path):
            raise ConfigError(f"run {run_path!r} exists already")
        await wire.append(run_path, run_input)


async def cancel_run(settings: Settings, run_path: str, reason: str | None = None) -> None:
    """Append a cancel event: the runner that holds or next claims the run ends it `cancelled`."""
    await send_event(settings, run_path, {"type": "cancel", **({"reason": reason} if reason is not None else {})})


async def send_event(settings: Settings, run_path: str, event: dict[str, Any]) -> None:
    async with open_wire(settings) as wire:
        try:
            await wire.tail(run_path)
        except StreamNotFound:
            raise ConfigError(f"there is no run {run_path!r}") from None
        await wire.append(run_path, event)
