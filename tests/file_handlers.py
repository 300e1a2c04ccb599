"""Handlers for runner processes started by tests (`handler = "tests.file_handlers:record"`).

They write one JSON line per message to the file named by PULLWAKE_TEST_RECORD, so a
test can see what a separate process handled, even after that process was killed.
A message with `"slow": true` makes the batch take a minute (after a "started" line);
PULLWAKE_TEST_ANNOUNCE=1 writes a "started" line before every batch.
"""

from __future__ import annotations

import json
import os

import trio

from runner import Batch


async def _write(lines: str) -> None:
    async with await trio.open_file(os.environ["PULLWAKE_TEST_RECORD"], "a") as out:
        await out.write(lines)


async def record(batch: Batch) -> None:
    delay = float(os.environ.get("PULLWAKE_TEST_DELAY", "0"))
    slow = any(isinstance(message, dict) and message.get("slow") for message in batch.messages)
    if slow or os.environ.get("PULLWAKE_TEST_ANNOUNCE"):
        await _write(json.dumps({"started": batch.next_offset, "pid": os.getpid()}) + "\n")
    if slow:
        delay = 60
    if delay:
        await trio.sleep(delay)
    await _write(
        "".join(
            json.dumps({"stream": batch.stream, "message": message, "pid": os.getpid()}) + "\n"
            for message in batch.messages
        )
    )
