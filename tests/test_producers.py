"""Idempotent producers (PROTOCOL.md §5.2.1) on the pinned reference server, and the wire's use of them.

Durable runs journal their steps with the claim's generation as the producer epoch: these
are the server rules that make a journal entry land once and fence a holder that lost its
lease. Plain httpx first (what the server does), then `StreamsClient.append(producer=...)`
and the in-memory `FakeWire`, which must follow the same rules.
"""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from runner._wire.protocol import ALREADY_APPENDED, Producer, Wire
from runner.errors import ProducerFenced, ProducerSequenceGap, RequestError
from tests.fake_wire import FakeWire
from tests.support import World


async def _post(
    http: httpx.AsyncClient, path: str, message: Any, epoch: int, seq: int, producer: str = "p"
) -> httpx.Response:
    headers = {
        "Content-Type": "application/json",
        "Producer-Id": producer,
        "Producer-Epoch": str(epoch),
        "Producer-Seq": str(seq),
    }
    return await http.post(f"/v1/stream/{path}", content=json.dumps(message), headers=headers)


async def test_the_reference_server_appends_once_per_producer_epoch_and_seq(world: World) -> None:
    path = world.stream("producer")
    await world.client.create_stream(path)
    http = world.http

    first = await _post(http, path, {"n": 0}, epoch=1, seq=0)
    assert first.status_code == 200
    assert first.headers["Stream-Next-Offset"]
    assert (first.headers["Producer-Epoch"], first.headers["Producer-Seq"]) == ("1", "0")

    repeat = await _post(http, path, {"n": 0}, epoch=1, seq=0)
    assert repeat.status_code == 204, "a repeat of the same seq is acknowledged"
    assert "Stream-Next-Offset" not in repeat.headers

    gap = await _post(http, path, {"n": 9}, epoch=1, seq=5)
    assert gap.status_code == 409
    assert gap.headers["Producer-Expected-Seq"] == "1"

    newer = await _post(http, path, {"n": 1}, epoch=2, seq=0)
    assert newer.status_code == 200, "a higher epoch starts its sequence again at 0"

    stale = await _post(http, path, {"zombie": True}, epoch=1, seq=1)
    assert stale.status_code == 403
    assert stale.headers["Producer-Epoch"] == "2", "the answer names the newest epoch"

    not_zero = await _post(http, path, {"n": 2}, epoch=3, seq=4)
    assert not_zero.status_code == 400, "a new epoch must start at seq 0"

    other = await _post(http, path, {"other": True}, epoch=0, seq=0, producer="q")
    assert other.status_code == 200, "producers are independent of each other"

    assert await world.read_all(path) == [{"n": 0}, {"n": 1}, {"other": True}]


async def _exercise(wire: Wire, path: str) -> list[str]:
    """The same sequence of appends, for the real client and the fake; returns what each answered."""
    answers = [
        await wire.append(path, {"n": 0}, producer=Producer("run", 1, 0)),
        await wire.append(path, {"n": 0}, producer=Producer("run", 1, 0)),
        await wire.append(path, {"n": 1}, producer=Producer("run", 2, 0)),
    ]
    with pytest.raises(ProducerFenced):
        await wire.append(path, {"zombie": True}, producer=Producer("run", 1, 1))
    with pytest.raises(ProducerSequenceGap):
        await wire.append(path, {"n": 9}, producer=Producer("run", 2, 3))
    with pytest.raises(RequestError):
        await wire.append(path, {"n": 9}, producer=Producer("run", 3, 1))
    return answers


async def test_the_client_appends_with_a_producer_and_maps_fencing(world: World) -> None:
    path = world.stream("client")
    await world.client.create_stream(path)
    first, repeat, newer = await _exercise(world.client, path)
    assert first
    assert newer != first
    assert repeat == ALREADY_APPENDED
    assert await world.read_all(path) == [{"n": 0}, {"n": 1}]


async def test_the_fake_wire_follows_the_same_producer_rules() -> None:
    wire = FakeWire()
    wire.add_stream("s")
    first, repeat, newer = await _exercise(wire, "s")
    assert repeat == ALREADY_APPENDED
    assert first
    assert newer
    assert wire.streams["s"] == [{"n": 0}, {"n": 1}]
