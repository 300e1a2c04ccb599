"""Never alive-but-idle (docs/design.md §4.3): probe the server, and reset a connection that is not really alive.

The heartbeat lives for the whole run. Every `interval` it HEADs the wake
stream with its own timeout. After `threshold` consecutive failures it sends
STREAM_RESET, which in `connecting` cancels a connect attempt that hangs and
in `streaming` drops a stream that stopped carrying anything; it keeps sending
one per failed probe while the failures last. While streaming, a tail that is
ahead of what the runner received, on two probes in a row with nothing arriving
in between, is a stalled stream: STREAM_RESET as well. A probe that gets an answer after one that did not says so
(PROBE_OK): while reconnecting, that ends the backoff at once, so recovery follows
the end of a fault rather than a timer.

While streaming, a probe that finds the tail where the stream left us says so
(`answered`): the keep-alive watchdog then trusts a silent stream, since some
servers send no keep-alive while idle.

A probe whose service token was refused (401/403) counts as not answered: a token
accepted again ends the fault like a server back up.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import structlog
import trio

from machine import Event, State

from .._driver import Driver
from .._health import Vitals
from .._state.checkpoint import WakePosition
from .._wire.protocol import is_after
from ..errors import ClientError, RequestError, TokenRefused

log = structlog.get_logger("pullwake.liveness")

Probe = Callable[[], Awaitable[str]]


@dataclass
class _Observation:
    epoch: int
    received: str | None
    items: int
    """Wake-stream items worked through so far: a huge frame in progress is not a stall."""
    behind: bool


class Liveness:
    """The heartbeat task and its counters; one per run, so counters start at zero."""

    def __init__(
        self,
        probe: Probe,
        driver: Driver,
        position: WakePosition,
        vitals: Vitals,
        *,
        interval: float,
        timeout: float,
        threshold: int,
        answered: Callable[[], None] | None = None,
    ) -> None:
        self._probe = probe
        self._driver = driver
        self._position = position
        self._vitals = vitals
        self.interval = interval
        self.timeout = timeout
        self.threshold = threshold
        self.failures = 0
        self.resets = 0
        self.started_at = trio.current_time()
        self.last_beat_at: float | None = None
        self._answered = True
        self._last: _Observation | None = None
        self._vouch = answered
        """Told after each probe that, while streaming, found nothing missed on the wake stream."""

    async def run(self) -> None:
        # Fixed ticks: a slow probe does not push the next one back, so a dead server is
        # noticed within `threshold` intervals of the first failed probe.
        next_beat = trio.current_time() + self.interval
        while True:
            await trio.sleep_until(next_beat)
            await self.beat()
            next_beat = max(next_beat + self.interval, trio.current_time())

    def silent_for(self) -> float:
        """Time since the last completed beat (or since the start, before the first)."""
        return trio.current_time() - (self.last_beat_at if self.last_beat_at is not None else self.started_at)

    async def beat(self) -> None:
        """One probe and what follows from it."""
        tail, error = await self._tail()
        self.last_beat_at = trio.current_time()
        self.failures = 0 if tail is not None else self.failures + 1
        self._vitals.heartbeat(tail is not None, self.failures, error)
        if error is not None:
            log.warning("heartbeat.failed", error=str(error))
        state, epoch = self._driver.state, self._driver.epoch
        # A refusal of the request is an answer (the server is up), but a refused service token
        # is a fault like an outage: the first good probe after it must end the wait as well.
        answered = tail is not None or (isinstance(error, RequestError) and not isinstance(error, TokenRefused))
        if answered and not self._answered:
            # The server answers again after it did not: the fault is over, so is any wait for it.
            # (Only then: a server that answers all along gets the backoff's pace.)
            await self._driver.send(Event.PROBE_OK, epoch=epoch)
        self._answered = answered
        if self.failures >= self.threshold:
            if state in (State.CONNECTING, State.STREAMING):
                await self._reset(f"{self.failures} liveness probes failed in a row", epoch)
            return
        if tail is None or state is not State.STREAMING:
            self._last = None
            return
        received, items = self._position.offset, self._vitals.events_received
        behind = received is not None and is_after(tail, received)
        last, self._last = self._last, _Observation(epoch, received, items, behind)
        if not behind and self._vouch is not None:
            self._vouch()
        if (
            behind
            and last is not None
            and last.behind
            and (last.epoch, last.received, last.items) == (epoch, received, items)
        ):
            self._last = None
            await self._reset(f"the wake stream is stalled: tail {tail} is ahead of {received}", epoch)

    async def _tail(self) -> tuple[str | None, ClientError | str | None]:
        """The wake stream's tail, or why the probe failed."""
        with trio.move_on_after(self.timeout):
            try:
                return await self._probe(), None
            except ClientError as exc:
                return None, exc
        return None, f"liveness probe: no answer within {self.timeout:g} s"

    async def _reset(self, reason: str, epoch: int) -> None:
        self.resets += 1
        self._vitals.liveness_reset(reason)
        log.warning("heartbeat.reset", reason=reason, state=self._driver.state.value)
        await self._driver.send(Event.STREAM_RESET, epoch=epoch)
