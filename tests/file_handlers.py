"""Handlers for runner processes started by tests (`handler = "tests.file_handlers:record"`).

They write one JSON line per message to the file named by PULLWAKE_TEST_RECORD, so a
test can see what a separate process handled, even after that process was killed.
A message with `"slow": true` makes the batch take a minute (after a "started" line);
PULLWAKE_TEST_ANNOUNCE=1 writes a "started" line before every batch;
PULLWAKE_TEST_KILL_AT_START=1 has the process SIGKILL itself as its first batch starts.
"""

from __future__ import annotations

import json
import os
import signal

import trio

from runner import Batch


async def _write(lines: str) -> None:
    async with await trio.open_file(os.environ["PULLWAKE_TEST_RECORD"], "a") as out:
        await out.write(lines)


async def record(batch: Batch) -> None:
    if os.environ.get("PULLWAKE_TEST_KILL_AT_START"):
        os.kill(os.getpid(), signal.SIGKILL)
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
