"""Files in the state directory: replaced atomically, so a reader never sees half of one."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


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
