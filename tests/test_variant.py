"""The variant server (faults/variant.py): each difference, next to the reference server's own answer.

Every test talks to the shared reference server twice, directly (`ref`) and through a
`VariantServer` with just one difference switched on (`var`), with plain httpx.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any, Protocol

import httpx
import pytest
import trio

from faults.variant import DIFFERENCES, VariantServer

ROOT = "/v1/stream"
HOLD = 2.0
"""How long the shared server holds live reads, and how often it sends SSE keep-alives (tests/conftest.py)."""


class _Server(Protocol):
    url: str | None


@dataclass
class World:
    ref: httpx.AsyncClient
    uid: str

    @property
    def sub(self) -> str:
        return f"/__ds/subscriptions/sub-{self.uid}"

    @property
    def stream(self) -> str:
        return f"/jobs-{self.uid}/a"

    def config(self, **changes: object) -> dict[str, object]:
        config: dict[str, object] = {
            "type": "pull-wake",
            "pattern": f"jobs-{self.uid}/*",
            "wake_stream": f"wake-{self.uid}/pool",
            "lease_ttl_ms": 5_000,
        }
        return {**config, **changes}

    async def subscribe_with_work(self) -> None:
        """The stream, the wake stream and the subscription; then one event pending."""
        for path in (self.stream, f"/wake-{self.uid}/pool"):
            assert (await self.ref.put(path, headers={"content-type": "application/json"})).status_code == 201
        assert (await self.ref.put(self.sub, json=self.config())).status_code == 201
        await self.append({"n": 1})

    async def append(self, message: object) -> None:
        assert (await self.ref.post(self.stream, json=message)).status_code == 204


Start = Callable[..., Awaitable[tuple[VariantServer, httpx.AsyncClient]]]


@pytest.fixture
async def world(shared_server: _Server) -> AsyncIterator[World]:
    async with httpx.AsyncClient(base_url=f"{shared_server.url}{ROOT}", timeout=10) as ref:
        yield World(ref, uuid.uuid4().hex[:10])


@pytest.fixture
async def start(shared_server: _Server, nursery: trio.Nursery) -> AsyncIterator[Start]:
    """Starts a variant in front of the shared server; returns it and a client for it."""
    clients: list[httpx.AsyncClient] = []

    async def start(*differences: str, **settings: float) -> tuple[VariantServer, httpx.AsyncClient]:
        assert shared_server.url is not None
        variant = VariantServer.only(shared_server.url, *differences, **settings)
        await nursery.start(variant.run)
        clients.append(httpx.AsyncClient(base_url=f"{variant.url}{ROOT}", timeout=10))
        return variant, clients[-1]

    yield start
    for client in clients:
        await client.aclose()


def code(response: httpx.Response) -> str:
    return str(response.json()["error"]["code"])


def claim_body(claim: dict[str, Any], **fields: object) -> dict[str, object]:
    return {"wake_id": claim["wake_id"], "generation": claim["generation"], **fields}


def bearer(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


async def sse_events(response: httpx.Response) -> AsyncGenerator[tuple[str, Any]]:
    """(event name, parsed data) for each SSE event of `response`."""
    name, data = "message", ""
    async for line in response.aiter_lines():
        if line.startswith("event:"):
            name = line[6:].strip()
        elif line.startswith("data:"):
            data += line[5:]
        elif not line and data:
            yield name, json.loads(data)
            name, data = "message", ""


async def test_everything_else_is_forwarded_unchanged(world: World, start: Start) -> None:
    variant, var = await start(*DIFFERENCES)
    assert (await var.put(world.stream, headers={"content-type": "application/json"})).status_code == 201
    assert (await var.post(world.stream, json={"n": 1})).status_code == 204
    direct = await world.ref.get(world.stream, params={"offset": "-1"})
    through = await var.get(world.stream, params={"offset": "-1"})
    assert (through.status_code, through.json()) == (direct.status_code, direct.json()) == (200, [{"n": 1}])
    assert through.headers["stream-next-offset"] == direct.headers["stream-next-offset"]
    assert [(e.method, e.path, e.status) for e in variant.exchanges] == [
        ("PUT", ROOT + world.stream, 201),
        ("POST", ROOT + world.stream, 204),
        ("GET", ROOT + world.stream, 200),
    ]


async def test_another_configuration_is_a_config_conflict(world: World, start: Start) -> None:
    _, var = await start("config_conflict")
    await world.subscribe_with_work()
    other = world.config(lease_ttl_ms=6_000)
    direct = await world.ref.put(world.sub, json=other)
    assert (direct.status_code, code(direct)) == (409, "SUBSCRIPTION_ALREADY_EXISTS")
    through = await var.put(world.sub, json=other)
    assert (through.status_code, code(through)) == (409, "CONFIG_CONFLICT")
    assert (await var.put(world.sub, json=world.config())).status_code == 200


async def test_a_missing_subscription_is_not_found(world: World, start: Start) -> None:
    _, var = await start("not_found")
    for method, suffix, body in [("GET", "", None), ("POST", "/claim", {"worker": "w"})]:
        direct = await world.ref.request(method, world.sub + suffix, json=body)
        assert (direct.status_code, code(direct)) == (404, "SUBSCRIPTION_NOT_FOUND")
        through = await var.request(method, world.sub + suffix, json=body)
        assert (through.status_code, code(through)) == (404, "NOT_FOUND")


async def test_ack_or_release_after_delete_is_gone(world: World, start: Start) -> None:
    _, var = await start("gone")
    await world.subscribe_with_work()
    claim = (await var.post(world.sub + "/claim", json={"worker": "w"})).json()
    assert (await var.delete(world.sub)).status_code == 204
    ack = claim_body(claim, acks=[])
    for action, body in [("/ack", ack), ("/release", claim_body(claim))]:
        direct = await world.ref.post(world.sub + action, headers=bearer(claim["token"]), json=body)
        assert (direct.status_code, code(direct)) == (404, "SUBSCRIPTION_NOT_FOUND")
        through = await var.post(world.sub + action, headers=bearer(claim["token"]), json=body)
        assert (through.status_code, code(through)) == (410, "SUBSCRIPTION_GONE")


async def test_a_claim_with_nothing_pending_is_granted(world: World, start: Start) -> None:
    variant, var = await start("grant_idle_claims")
    await world.subscribe_with_work()
    # Work it off for real once, so the subscription has a generation and an acked offset.
    real = (await var.post(world.sub + "/claim", json={"worker": "w"})).json()
    [linked] = real["streams"]
    done = claim_body(real, acks=[{"stream": linked["path"], "offset": linked["tail_offset"]}], done=True)
    assert (await var.post(world.sub + "/ack", headers=bearer(real["token"]), json=done)).status_code == 200

    direct = await world.ref.post(world.sub + "/claim", json={"worker": "w"})
    assert (direct.status_code, code(direct)) == (409, "NO_PENDING_WORK")
    through = await var.post(world.sub + "/claim", json={"worker": "w"})
    assert through.status_code == 200
    grant = through.json()
    assert grant["wake_id"] != real["wake_id"]
    assert grant["token"] != real["token"]
    assert grant["generation"] == real["generation"]
    assert grant["lease_ttl_ms"] == 5_000
    assert grant["streams"] == [
        {**linked, "acked_offset": linked["tail_offset"], "tail_offset": linked["tail_offset"], "has_pending": False}
    ]

    heartbeat = await var.post(world.sub + "/ack", headers=bearer(grant["token"]), json=claim_body(grant, acks=[]))
    assert (heartbeat.status_code, heartbeat.json()) == (200, {"ok": True, "next_wake": False})
    released = await var.post(world.sub + "/release", headers=bearer(grant["token"]), json=claim_body(grant))
    assert released.status_code == 204
    # The grant never reached the real server: it is as idle as before.
    again = await world.ref.post(world.sub + "/claim", json={"worker": "w"})
    assert (again.status_code, code(again)) == (409, "NO_PENDING_WORK")
    assert (variant.count("POST", "/claim", 200), variant.count("POST", "/release", 204)) == (2, 1)


async def test_sse_has_no_idle_keepalives_and_ends_every_cycle(world: World, start: Start) -> None:
    cycle = HOLD + 1.0
    _, var = await start("quiet_sse", sse_cycle=cycle)
    await world.subscribe_with_work()
    params = {"offset": "-1", "live": "sse"}
    quiet = f"/quiet-{world.uid}"  # the reference reads a stream of its own, where nothing is appended
    assert (await world.ref.put(quiet, headers={"content-type": "application/json"})).status_code == 201
    assert (await world.ref.post(quiet, json={"n": 1})).status_code == 204

    async def reference() -> None:
        """The reference server: data, control, then a keep-alive control within HOLD."""
        with trio.fail_after(HOLD + 2):
            async with world.ref.stream("GET", quiet, params=params) as response:
                names = []
                async with aclosing(sse_events(response)) as events:
                    async for name, _ in events:
                        names.append(name)
                        if len(names) == 3:
                            break
        assert names == ["data", "control", "control"]

    async def variant() -> None:
        """The variant: data and its control, nothing while idle, data appended later, the end at the cycle."""
        started = trio.current_time()
        events: list[tuple[str, Any]] = []
        with trio.fail_after(cycle + 3):
            async with var.stream("GET", world.stream, params=params) as response:
                async for name, data in sse_events(response):
                    events.append((name, data))
                    if len(events) == 2:
                        await world.append({"n": 2})
        assert [name for name, _ in events] == ["data", "control", "data", "control"]
        assert [events[0][1], events[2][1]] == [[{"n": 1}], [{"n": 2}]]
        assert trio.current_time() - started >= cycle - 0.1

    async with trio.open_nursery() as nursery:
        nursery.start_soon(reference)
        nursery.start_soon(variant)


async def test_claim_tokens_expire_and_acks_refresh_them(world: World, start: Start) -> None:
    ttl = 2.0
    _, var = await start("expiring_tokens", token_ttl=ttl)
    await world.subscribe_with_work()
    # The reference server: its claim token is what the ack needs, and the ack answer has no token.
    real = (await world.ref.post(world.sub + "/claim", json={"worker": "w"})).json()
    direct = await world.ref.post(world.sub + "/ack", headers=bearer(real["token"]), json=claim_body(real, acks=[]))
    assert (direct.status_code, direct.json()) == (200, {"ok": True, "next_wake": False})
    assert (
        await world.ref.post(world.sub + "/release", headers=bearer(real["token"]), json=claim_body(real))
    ).status_code == 204

    started = trio.current_time()
    claim = (await var.post(world.sub + "/claim", json={"worker": "w"})).json()
    first = claim["token"]
    await trio.sleep_until(started + ttl / 2)
    heartbeat = await var.post(world.sub + "/ack", headers=bearer(first), json=claim_body(claim, acks=[]))
    assert heartbeat.status_code == 200
    assert set(heartbeat.json()) == {"ok", "next_wake", "token"}
    second = heartbeat.json()["token"]
    assert second not in (first, real["token"])

    await trio.sleep_until(started + ttl + 0.2)  # the first alias is past its ttl, the second is not
    expired = await var.post(world.sub + "/ack", headers=bearer(first), json=claim_body(claim, acks=[]))
    assert (expired.status_code, code(expired)) == (401, "TOKEN_EXPIRED")
    assert (await var.post(world.sub + "/release", headers=bearer(second), json=claim_body(claim))).status_code == 204


async def test_lease_ttl_out_of_range_is_clamped(world: World, start: Start) -> None:
    _, var = await start("clamp_lease")
    for asked, granted in [(500, 1_000), (700_000, 600_000)]:
        config = world.config(lease_ttl_ms=asked)
        direct = await world.ref.put(world.sub, json=config)
        assert (direct.status_code, code(direct)) == (400, "INVALID_REQUEST")
        through = await var.put(world.sub, json=config)
        assert (through.status_code, through.json()["lease_ttl_ms"]) == (201, granted)
        assert (await var.put(world.sub, json=config)).status_code == 200  # the same ask confirms it
        assert (await world.ref.delete(world.sub)).status_code == 204
