"""The baseline: the pull-wake protocol with bare httpx and nothing else.

Follow the wake stream (SSE), claim, read, ack done; one worker per subscription at a
time. No lifecycle, no heartbeat, no lease keeper, no retries, no per-batch acks, no
checkpoint: the least work the protocol allows, to compare the runner against.

As a program (for CPU measurements in its own process):

    python -m bench.baseline SERVER_URL WAKE_STREAM SUB[,SUB...]

prints {"handled": N} lines as it goes. With $BENCH_RECORD set, it also writes when each
message was handled to that file, as the runner's `bench.handlers:record` does.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any
from urllib.parse import quote

import httpx
import trio
from httpx_sse import EventSource

OnBatch = Callable[[str, list[Any]], Awaitable[None]]
OnDone = Callable[[list[str]], None]
ROOT = "/v1/stream"


async def follow(
    server_url: str,
    wake_stream: str,
    subscriptions: set[str],
    on_batch: OnBatch,
    *,
    worker: str = "baseline",
    concurrency: int = 16,
    on_done: OnDone | None = None,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    limiter = trio.CapacityLimiter(concurrency)
    busy: set[str] = set()
    again: set[str] = set()
    async with httpx.AsyncClient(base_url=server_url, timeout=httpx.Timeout(30, read=None)) as http:

        async def work(subscription: str) -> None:
            base = f"{ROOT}/__ds/subscriptions/{quote(subscription, safe='')}"
            try:
                while True:
                    again.discard(subscription)
                    async with limiter:
                        answer = await http.post(f"{base}/claim", json={"worker": worker})
                        if answer.status_code != 200:
                            if subscription in again:
                                continue
                            return
                        claim = answer.json()
                        headers = {"Authorization": f"Bearer {claim['token']}"}
                        acks = []
                        for stream in claim["streams"]:
                            if not stream["has_pending"]:
                                continue
                            offset = stream["acked_offset"]
                            while offset == "-1" or offset < stream["tail_offset"]:
                                read = await http.get(f"{ROOT}/{stream['path']}", params={"offset": offset})
                                messages = read.json()
                                if not messages:
                                    break
                                await on_batch(stream["path"], messages)
                                offset = read.headers["Stream-Next-Offset"]
                            acks.append({"stream": stream["path"], "offset": offset})
                        done = await http.post(
                            f"{base}/ack",
                            headers=headers,
                            json={
                                "wake_id": claim["wake_id"],
                                "generation": claim["generation"],
                                "acks": acks,
                                "done": True,
                            },
                        )
                        next_wake = done.json().get("next_wake", False)
                        if on_done is not None:
                            on_done([ack["offset"] for ack in acks])
                    if not (next_wake or subscription in again):
                        return
            finally:
                busy.discard(subscription)

        offset = (await http.head(f"{ROOT}/{wake_stream}")).headers["Stream-Next-Offset"]
        async with trio.open_nursery() as nursery:
            request = http.build_request("GET", f"{ROOT}/{wake_stream}", params={"offset": offset, "live": "sse"})
            response = await http.send(request, stream=True)
            task_status.started()
            try:
                async for sse in EventSource(response).aiter_sse():
                    if sse.event != "data":
                        continue
                    for wake in json.loads(sse.data):
                        subscription = wake.get("subscription_id")
                        if subscription not in subscriptions:
                            continue
                        if subscription in busy:
                            again.add(subscription)
                            continue
                        busy.add(subscription)
                        nursery.start_soon(work, subscription)
            finally:
                await response.aclose()


async def _main(server_url: str, wake_stream: str, subscriptions: set[str]) -> None:
    from bench.handlers import write_times

    handled = 0
    record = os.environ.get("BENCH_RECORD")

    async def count(stream: str, messages: list[Any]) -> None:
        nonlocal handled
        handled += len(messages)
        if record:
            write_times(record, messages)

    async def report() -> None:
        while True:
            print(json.dumps({"handled": handled}), flush=True)
            await trio.sleep(0.1)

    async with trio.open_nursery() as nursery:
        await nursery.start(partial(follow, server_url, wake_stream, subscriptions, count))
        nursery.start_soon(report)


if __name__ == "__main__":
    trio.run(_main, sys.argv[1], sys.argv[2], set(sys.argv[3].split(",")))
