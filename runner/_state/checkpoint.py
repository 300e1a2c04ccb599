"""Where the runner is in its wake stream, kept on disk across restarts."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import structlog
import trio

from .files import write_atomically
from .loading import Unusable, check_identity, exactly, read_document, set_aside

log = structlog.get_logger("pullwake.checkpoint")


class WakePosition:
    """The wake stream offset received so far; `saved` is what the disk holds."""

    def __init__(self, offset: str | None) -> None:
        self.offset = offset
        self.saved = offset
        self.changed = trio.Event()

    def advance(self, offset: str) -> None:
        if offset != self.offset:
            self.offset = offset
            self.changed.set()


class Checkpoint:
    """A small JSON file replaced atomically: the wake offset of one server and wake stream.

    A checkpoint written for another server, stream root or wake stream is set aside, so
    pointing a runner somewhere new never resumes from an offset that means nothing there.
    """

    def __init__(self, state_dir: Path, *, server_url: str, wake_stream: str, stream_root: str = "/v1/stream") -> None:
        self.path = state_dir / "wake-checkpoint.json"
        self._identity = {"server_url": server_url, "stream_root": stream_root, "wake_stream": wake_stream}

    def load(self) -> str | None:
        """The offset an earlier run reached, or None; a file that cannot be used is set aside."""
        try:
            document = read_document(self.path)
            return None if document is None else self._parse(document)
        except Unusable as exc:
            set_aside(self.path, str(exc), lost="the wake stream position (the runner starts at its tail and sweeps)")
            return None

    def _parse(self, document: dict[str, Any]) -> str:
        check_identity(document, self._identity)
        offset: str = exactly(document.get("offset"), str, "offset")
        if not offset:
            raise Unusable("an empty offset")
        return offset

    def save(self, offset: str) -> None:
        write_atomically(self.path, json.dumps({**self._identity, "offset": offset}).encode(), sync=True)


async def keep_checkpoint(
    checkpoint: Checkpoint,
    position: WakePosition,
    *,
    interval: float,
    on_write: Callable[[bool], None] = lambda ok: None,
) -> None:
    """Write the position at most once per `interval`, and once more when cancelled.

    `on_write` is told how each write ended (a failed one is a degraded runner).
    """
    try:
        while True:
            await position.changed.wait()
            position.changed = trio.Event()
            # The fsync takes milliseconds: a worker thread waits for it, not the event loop.
            if (ok := await trio.to_thread.run_sync(_save, checkpoint, position)) is not None:
                on_write(ok)
            await trio.sleep(interval)
    finally:
        _save(checkpoint, position)  # the last one, also when cancelled: quick enough to do here


def _save(checkpoint: Checkpoint, position: WakePosition) -> bool | None:
    """True or False: how the write ended; None: nothing to write."""
    offset = position.offset
    if offset is None or offset == position.saved:
        return None
    try:
        checkpoint.save(offset)
        position.saved = offset
    except OSError as exc:
        log.error("checkpoint.write_failed", path=str(checkpoint.path), error=str(exc))
        return False
    return True
