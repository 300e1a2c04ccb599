"""Pacing retries: exponential backoff with jitter, so a fleet does not retry in lockstep."""

from __future__ import annotations

import random
from collections.abc import Awaitable, Callable
from typing import TypeVar

import structlog
import trio

from ..errors import ClientError, Unreachable

log = structlog.get_logger("pullwake.retry")

T = TypeVar("T")

# One generator for every backoff: seeding a new one per backoff costs more than the draw.
_RANDOM = random.Random()

# Transient request failures are retried this many times, backing off
# from REQUEST_RETRY_INITIAL up to REQUEST_RETRY_MAX seconds.
REQUEST_ATTEMPTS = 5
REQUEST_RETRY_INITIAL = 0.2
REQUEST_RETRY_MAX = 2.0


class Backoff:
    """Delays that double from `initial` up to `maximum`, each shaved by up to `jitter`.

    The n-th delay (counting from 0) is drawn from
    ``[base * (1 - jitter), base]`` with ``base = min(maximum, initial * multiplier**n)``,
    so no delay ever exceeds what the operator configured.
    """

    def __init__(
        self,
        initial: float,
        maximum: float,
        *,
        multiplier: float = 2.0,
        jitter: float = 0.2,
        rng: random.Random | None = None,
    ) -> None:
        if initial <= 0 or maximum < initial:
            raise ValueError(f"backoff needs 0 < initial <= maximum, got {initial=} {maximum=}")
        if not 0 <= jitter < 1:
            raise ValueError(f"backoff jitter must be in [0, 1), got {jitter}")
        if multiplier < 1:
            raise ValueError(f"backoff multiplier must be >= 1, got {multiplier}")
        self.initial = initial
        self.maximum = maximum
        self.multiplier = multiplier
        self.jitter = jitter
        self._rng = rng or _RANDOM
        self._attempt = 0

    @property
    def attempt(self) -> int:
        """How many delays have been handed out since the last reset."""
        return self._attempt

    def base(self, attempt: int) -> float:
        # Cap the exponent so a long outage cannot overflow the float.
        return min(self.maximum, self.initial * self.multiplier ** min(attempt, 64))

    def next_delay(self) -> float:
        base = self.base(self._attempt)
        self._attempt += 1
        return base * (1 - self.jitter * self._rng.random())

    def reset(self) -> None:
        self._attempt = 0

    def probe_delay(self, interval: float) -> float:
        """A short delay (at most `interval`, and at most `initial`), jittered the same way, that
        does not move the doubling on: for a server that cannot be reached at all, where asking
        again is cheap and only an answer should pace the next attempt."""
        return min(interval, self.initial) * (1 - self.jitter * self._rng.random())


def retry_after(error: BaseException | None) -> float:
    return getattr(error, "retry_after", None) or 0.0


PROBE_INTERVAL = 0.5
"""While a server cannot be reached at all (connection refused, reset or closed before any answer:
a restart), it is asked again at most this many seconds apart, instead of the doubling backoff."""


def next_attempt(backoff: Backoff, error: BaseException | None) -> float:
    """How long to wait before trying again after `error`.

    A server that could not be reached (`Unreachable`) is asked again soon (`PROBE_INTERVAL`, with
    jitter) and the doubling does not move on: on loopback or a LAN a refused connection costs
    next to nothing, and a restarted server is found within half a second rather than at the next
    step of a backoff that has grown to seconds. Anything that is an answer (a 5xx, a 429, a
    stream that closes at once, a protocol error) or a timeout doubles the delay as before; a
    `Retry-After` is believed, up to the backoff's cap.
    """
    asked = min(retry_after(error), backoff.maximum)
    if isinstance(error, Unreachable) and not asked:
        return backoff.probe_delay(PROBE_INTERVAL)
    return max(backoff.next_delay(), asked)


async def retrying(
    call: Callable[[], Awaitable[T]],
    *,
    what: str,
    deadline: float | None = None,
    report: Callable[[BaseException], None] | None = None,
) -> T:
    """Retry transient client errors with backoff, up to REQUEST_ATTEMPTS or until `deadline`."""
    backoff = Backoff(REQUEST_RETRY_INITIAL, REQUEST_RETRY_MAX)
    attempt = 1
    while True:
        try:
            return await call()
        except ClientError as exc:
            if report is not None and exc.retryable:
                report(exc)
            if not exc.retryable or (deadline is None and attempt >= REQUEST_ATTEMPTS):
                raise
            # A request with no deadline (a claim, a read) that could not reach the server is asked
            # again soon, as the wake stream is: a server restarting is found within REQUEST_RETRY_INITIAL,
            # not at the end of a delay that doubled to seconds (a claim holds its slot meanwhile).
            # The attempts stay bounded (REQUEST_ATTEMPTS); one with a deadline (an ack) keeps doubling.
            if deadline is None:
                delay = next_attempt(backoff, exc)
            else:
                delay = max(backoff.next_delay(), min(retry_after(exc), REQUEST_RETRY_MAX))
            if deadline is not None and trio.current_time() + delay >= deadline:
                raise
            log.info("request.retry", what=what, attempt=attempt, error=str(exc), delay=round(delay, 3))
            attempt += 1
            await trio.sleep(delay)
