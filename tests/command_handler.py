"""An external command handler for tests: reads a batch on stdin, acts on `do` in each message.

do=ok        append the message to $PULLWAKE_TEST_RECORD, exit 0
do=tempfail  exit 75 (EX_TEMPFAIL) on the first attempt, succeed on the next
do=fail      exit 3
do=hang      sleep; on SIGTERM write "terminated" and exit
do=stubborn  sleep and ignore SIGTERM (only SIGKILL ends it)
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time


def note(text: str) -> None:
    with open(os.environ["PULLWAKE_TEST_RECORD"], "a") as out:
        out.write(text + "\n")


def terminated(*_: object) -> None:
    note("terminated")
    sys.exit(143)


def main() -> int:
    batch = json.load(sys.stdin)
    for message in batch["messages"]:
        action = message.get("do")
        if action == "tempfail" and batch["attempt"] == 1:
            note(f"tempfail attempt={batch['attempt']}")
            return 75
        if action == "fail":
            note(f"fail attempt={batch['attempt']}")
            print("this batch is hopeless", file=sys.stderr)
            return 3
        if action == "hang":
            signal.signal(signal.SIGTERM, terminated)
            note("hanging")
            time.sleep(600)  # real-time: a stuck external command
        if action == "stubborn":
            signal.signal(signal.SIGTERM, lambda *_: note("ignored SIGTERM"))
            note("stubborn")
            while True:
                time.sleep(1)  # real-time: a stuck external command
        note(json.dumps({"ok": message, "attempt": batch["attempt"], "stream": batch["stream"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
