"""Stands in for serve.mjs in tests/test_devserver.py: prints what a server prints, in chosen writes.

    announce  one write: a log line, the {"url": ...} line, and the start of another log line;
              on SIGTERM the rest of that line and a goodbye, then exit 0
    die       print a log line and exit 3 before announcing anything
The options JSON (DevServer's last argument) is echoed in the first log line.
"""

from __future__ import annotations

import os
import signal
import sys
from types import FrameType


def goodbye(_signum: int, _frame: FrameType | None) -> None:
    os.write(1, b"continued at stop\nserver stopped\n")
    sys.exit(0)


def main(mode: str, options: str) -> int:
    if mode == "die":
        os.write(1, f"starting with {options}\ncannot listen: address in use\n".encode())
        return 3
    signal.signal(signal.SIGTERM, goodbye)
    # One write, so the reader gets all of it in one read: the race of issue 12.
    os.write(1, f'starting with {options}\n{{"url": "http://127.0.0.1:4999"}}\nlog line '.encode())
    while True:
        signal.pause()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
