"""The `reconnecting` state's activity: wait out the backoff (docs/design.md §4.2)."""

from __future__ import annotations

import trio

from machine import Event

from .._driver import Envelope, StateContext
from .._wire.retrying import Backoff, next_attempt


class BackoffActivity:
    """The `reconnecting` state's activity: sleep the next delay, then say so.

    CONNECTED resets it (the RESET_BACKOFF effect), so one good connection
    brings the next reconnect back to the initial delay. A server that could not be reached
    at all (a restart) is tried again within `PROBE_INTERVAL` instead (`next_attempt`).
    """

    def __init__(self, backoff: Backoff) -> None:
        self.backoff = backoff
        self.last_delay: float | None = None

    async def __call__(self, context: StateContext) -> None:
        # A server that said when to come back (Retry-After) is believed, up to the cap.
        self.last_delay = next_attempt(self.backoff, context.trigger.error)
        await trio.sleep(self.last_delay)
        await context.emit(Event.BACKOFF_ELAPSED)

    def reset(self, _envelope: Envelope | None = None) -> None:
        self.backoff.reset()
