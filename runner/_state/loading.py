"""Reading a state file back: bounded, and anything unusable is moved aside, never fatal.

A start must not depend on what a disk holds: a journal or checkpoint that is too
large, unreadable, not JSON, of the wrong shape, or written for another server,
stream root or wake stream is renamed to `<name>.unusable-<timestamp>` (kept for a
post-mortem), one warning says what its loss costs, and the runner starts clean.
"""

from __future__ import annotations

import json
import os
import stat
import time
from pathlib import Path
from typing import Any

import structlog

log = structlog.get_logger("pullwake.state")

MAX_STATE_FILE_BYTES = 64 * 1024 * 1024
"""A state file is a few KiB to a few MiB (10 000 streams per subscription at most); a larger
one was not written by this runner, and reading it whole could exhaust the unit's memory."""


class Unusable(Exception):
    """The state file exists but cannot be used; the message says why."""


def read_document(path: Path) -> dict[str, Any] | None:
    """The JSON object `path` holds, or None if there is no such file. Raises `Unusable`."""
    data = read_bounded(path)
    if data is None:
        return None
    try:
        document = json.loads(data)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise Unusable(f"not JSON: {type(exc).__name__}: {str(exc)[:200]}") from None
    if not isinstance(document, dict):
        raise Unusable(f"not a JSON object but {type(document).__name__}")
    return document


def read_bounded(path: Path) -> bytes | None:
    """The bytes of the regular file `path`, or None if there is no such file. Raises `Unusable`."""
    try:
        # O_NONBLOCK: a FIFO put in the file's place must not block the start.
        descriptor = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise Unusable(f"cannot be opened: {exc.strerror or exc}") from None
    try:
        with os.fdopen(descriptor, "rb") as file:
            if not stat.S_ISREG(os.fstat(file.fileno()).st_mode):
                raise Unusable("not a regular file")
            data = file.read(MAX_STATE_FILE_BYTES + 1)
    except OSError as exc:
        raise Unusable(f"cannot be read: {exc.strerror or exc}") from None
    if len(data) > MAX_STATE_FILE_BYTES:
        raise Unusable(f"larger than {MAX_STATE_FILE_BYTES // (1024 * 1024)} MiB")
    return data


def set_aside(path: Path, reason: str, *, lost: str) -> None:
    """Move the unusable `path` out of the way (best effort) and say what is lost, once."""
    aside = path.with_name(f"{path.name}.unusable-{time.strftime('%Y%m%dT%H%M%S')}-{time.time_ns() % 10**9:09d}")
    try:
        os.replace(path, aside)
        moved_to: str | None = str(aside)
    except OSError:
        # Not even that: the next write replaces it, which is all a clean start needs.
        moved_to = None
    log.warning("state.unusable", path=str(path), reason=reason, lost=lost, moved_to=moved_to)


def check_identity(document: dict[str, Any], identity: dict[str, str]) -> None:
    """`Unusable` unless the file was written for this server, stream root (and wake stream)."""
    for key, ours in identity.items():
        if document.get(key) != ours:
            found = str(document.get(key))[:200]
            raise Unusable(f"written for another {key} ({found!r}, this runner: {ours!r})")


def exactly(value: Any, kind: type | tuple[type, ...], what: str) -> Any:
    """`value` if it is of `kind` (a bool is no number here), else `Unusable` naming `what`."""
    if isinstance(value, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,)):
        raise Unusable(f"{what}: {type(value).__name__} where {_names(kind)} belongs")
    if not isinstance(value, kind):
        raise Unusable(f"{what}: {type(value).__name__} where {_names(kind)} belongs")
    return value


def _names(kind: type | tuple[type, ...]) -> str:
    return " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
