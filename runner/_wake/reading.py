"""Reading a stream the runner follows (the wake stream, the control stream) so that the server cannot drive a loop."""

from __future__ import annotations

from collections.abc import AsyncGenerator

import structlog
import trio

from .._health import Vitals
from .._wire.protocol import ReadResult, Wire, is_after

log = structlog.get_logger("pullwake.wake")

# Long-polls that come back empty are spaced at least this far apart: a server that answers
# at once cannot drive a request loop.
LONG_POLL_FLOOR = 1.0
# How often a run of ignored wake-stream items is summarised in the log after the first.
SUMMARY_EVERY = 60.0
# Yield to other tasks every so many items of one huge frame.
ITEMS_PER_STEP = 1000


class Tally:
    """Counts items that had to be ignored: logged the first time, then summarised, never one line each."""

    def __init__(self, vitals: Vitals, what: str) -> None:
        self._vitals = vitals
        self._what = what
        self._since_logged = 0
        self._logged_at: float | None = None

    def ignored(self, reason: str, example: object, count: int = 1) -> None:
        self._vitals.ignored(reason, count)
        self._since_logged += count
        now = trio.current_time()
        if self._logged_at is None or now - self._logged_at >= SUMMARY_EVERY:
            log.warning(
                "wake.ignored",
                source=self._what,
                reason=reason,
                count=self._since_logged,
                example=repr(example)[:200],
                detail="counted in pullwake_wake_items_ignored_total; summarised at most once a minute",
            )
            self._vitals.error(f"{self._what}: ignored {self._since_logged} item(s): {reason}: {str(example)[:200]}")
            self._since_logged, self._logged_at = 0, now


async def paced_long_polls(wire: Wire, path: str, offset: str, *, hold: float) -> AsyncGenerator[ReadResult, None]:
    """Long-polls one after the other from `offset`; empty answers come at most every LONG_POLL_FLOOR s.

    An empty answer never moves the offset back (a file-backed server can answer a read
    from just past its tail with a smaller offset).
    """
    while True:
        started = trio.current_time()
        result = await wire.long_poll(path, offset, hold=hold)
        if result.messages or is_after(result.next_offset, offset):
            offset = result.next_offset
        else:
            result = ReadResult([], offset, result.up_to_date, result.closed, result.content_type)
        yield result
        if not result.messages:
            await trio.sleep_until(started + LONG_POLL_FLOOR)
