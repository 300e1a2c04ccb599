"""Where the runner is in its wake stream, kept on disk across restarts."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import structlog
import trio

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

    A checkpoint written for another server or wake stream is ignored, so pointing a
    runner somewhere new never resumes from an offset that means nothing there.
    """

    def __init__(self, state_dir: Path, *, server_url: str, wake_stream: str) -> None:
        self.path = state_dir / "wake-checkpoint.json"
        self._identity = {"server_url": server_url, "wake_stream": wake_stream}

    def load(self) -> str | None:
        try:
            document = json.loads(self.path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            log.warning("checkpoint.unreadable", path=str(self.path), error=str(exc))
            return None
        if not isinstance(document, dict) or any(document.get(k) != v for k, v in self._identity.items()):
            log.warning("checkpoint.other_stream", path=str(self.path), found=document)
            return None
        offset = document.get("offset")
        return offset if isinstance(offset, str) and offset else None

    def save(self, offset: str) -> None:
        write_atomically(self.path, json.dumps({**self._identity, "offset": offset}).encode(), sync=True)


def write_atomically(path: Path, document: bytes, *, sync: bool) -> None:
    """Replace `path` with `document` so that a reader sees the old file or the new, never half of one.

    The file is created owner-only (0600). `sync` also survives a power loss; without
    it the file survives a crash of the process (kill -9), which is what the journal needs.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(descriptor, "wb") as file:
            file.write(document)
            if sync:
                file.flush()
                os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


async def keep_checkpoint(checkpoint: Checkpoint, position: WakePosition, *, interval: float) -> None:
    """Write the position at most once per `interval`, and once more when cancelled."""
    try:
        while True:
            await position.changed.wait()
            position.changed = trio.Event()
            # The fsync takes milliseconds: a worker thread waits for it, not the event loop.
            await trio.to_thread.run_sync(_save, checkpoint, position)
            await trio.sleep(interval)
    finally:
        _save(checkpoint, position)  # the last one, also when cancelled: quick enough to do here


def _save(checkpoint: Checkpoint, position: WakePosition) -> None:
    offset = position.offset
    if offset is None or offset == position.saved:
        return
    try:
        checkpoint.save(offset)
        position.saved = offset
    except OSError as exc:
        log.error("checkpoint.write_failed", path=str(checkpoint.path), error=str(exc))
