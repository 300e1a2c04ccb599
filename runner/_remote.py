"""The runner's control stream: operators append `{"type": "abort", "subscription_id": ...}`."""

from __future__ import annotations

from collections.abc import Callable

import structlog
import trio

from ._backoff import Backoff
from ._exceptions import ClientError, StreamConflict
from ._wire import Wire

log = structlog.get_logger("pullwake.control_stream")


async def follow_control_stream(
    wire: Wire,
    path: str,
    abort: Callable[[str], bool],
    *,
    hold: float,
    backoff: Backoff,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Apply control events appended from now on, for as long as the run lasts.

    The stream is created if missing, and read from its tail: an abort meant for an
    earlier run of this runner is never applied to this one.
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
            result = await wire.long_poll(path, offset, hold=hold)
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
            continue
        backoff.reset()
        for message in result.messages:
            apply(message, abort)
        offset = result.next_offset
        if result.closed:
            log.warning("control_stream.closed", control_stream=path)
            return


def apply(message: object, abort: Callable[[str], bool]) -> None:
    if not isinstance(message, dict):
        log.warning("control_stream.malformed", message=repr(message)[:200])
        return
    if message.get("type") != "abort":
        log.info("control_stream.ignored", type=message.get("type"))
        return
    subscription = message.get("subscription_id")
    if not isinstance(subscription, str) or not subscription:
        log.warning("control_stream.malformed", message=repr(message)[:200])
        return
    found = abort(subscription)
    log.warning("control_stream.abort", subscription=subscription, in_flight=found)
