"""The runner's control stream: operators append `{"type": "abort", "subscription_id": ...}`."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import aclosing

import structlog
import trio

from .._wire.protocol import Wire
from .._wire.retrying import Backoff
from ..errors import ClientError, StreamConflict
from .reading import ITEMS_PER_STEP, Tally, paced_long_polls

log = structlog.get_logger("pullwake.control_stream")


async def follow_control_stream(
    wire: Wire,
    path: str,
    abort: Callable[[str], bool],
    *,
    hold: float,
    backoff: Backoff,
    tally: Tally,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Apply control events appended from now on, for as long as the run lasts.

    The stream is created if missing, and read from its tail: an abort meant for an
    earlier run of this runner is never applied to this one. Long-polls are paced (an
    empty answer at once waits out the floor) and failures back off.
    """
    offset: str | None = None
    ready = False
    while True:
        try:
            if offset is None:
                await wire.create_stream(path)
                offset = await wire.tail(path)
                log.info("control_stream.following", control_stream=path, offset=offset)
            if not ready:
                ready = True
                task_status.started()
            async with aclosing(paced_long_polls(wire, path, offset, hold=hold)) as results:
                async for result in results:
                    backoff.reset()
                    for index, message in enumerate(result.messages, 1):
                        apply(message, abort, tally)
                        if index % ITEMS_PER_STEP == 0:
                            await trio.lowlevel.checkpoint()
                    offset = result.next_offset
                    if result.closed:
                        log.warning("control_stream.closed", control_stream=path)
                        return
        except StreamConflict as exc:
            log.error("control_stream.unusable", control_stream=path, error=str(exc))
            return
        except ClientError as exc:
            delay = backoff.next_delay()
            log.warning("control_stream.error", control_stream=path, error=str(exc), retry_in=round(delay, 2))
            if not ready:
                ready = True
                task_status.started()
            await trio.sleep(delay)


def apply(message: object, abort: Callable[[str], bool], tally: Tally) -> None:
    if not isinstance(message, dict):
        tally.ignored("control event not an object", message)
        return
    if message.get("type") != "abort":
        tally.ignored("control event of another type", message.get("type"))
        return
    subscription = message.get("subscription_id")
    if not isinstance(subscription, str) or not subscription or len(subscription) > 256:
        tally.ignored("malformed abort", message)
        return
    found = abort(subscription)
    log.warning("control_stream.abort", subscription=subscription, in_flight=found)
