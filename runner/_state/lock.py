"""One owner per state directory: an flock on `state_dir/lock`, held for the whole run.

Two runners sharing a state dir would hand back each other's live claims and
handle batches twice. The lock is taken before anything in the directory is read;
the kernel releases it however the process ends (kill -9 included), so a stale
lock file never blocks a restart. The file holds the owner's pid, for the message
the second runner prints. The descriptor is close-on-exec: a command handler's
process does not inherit (and so cannot outlive the runner holding) the lock.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from ..errors import StateDirInUse

LOCK_NAME = "lock"


class StateDirLock:
    """`acquire()` or `StateDirInUse`; `release()` (idempotent) ends the ownership."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self.path = state_dir / LOCK_NAME
        self._descriptor: int | None = None

    def acquire(self) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        descriptor = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(descriptor)
            os.close(descriptor)
            raise StateDirInUse(
                f"state_dir {self.state_dir} is in use by another runner (pid {holder}); "
                "give each runner its own state_dir"
            ) from None
        except BaseException:
            os.close(descriptor)
            raise
        os.ftruncate(descriptor, 0)
        os.pwrite(descriptor, f"{os.getpid()}\n".encode(), 0)
        self._descriptor = descriptor

    def release(self) -> None:
        if self._descriptor is not None:
            os.close(self._descriptor)  # closing the last descriptor releases the flock
            self._descriptor = None


def _holder(descriptor: int) -> str:
    try:
        text = os.pread(descriptor, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        return "unknown"
    return text if text.isdigit() else "unknown"
