"""Answers mean what their status and route say, not what one server's codes say.

A second, independently written pull-wake server answers differently where the protocol
is silent (docs: README, Servers): `409 CONFIG_CONFLICT` for a subscription with another
configuration, `404 NOT_FOUND` for a missing one, `410 SUBSCRIPTION_GONE` after a delete,
no SSE keep-alive while idle, claim tokens refreshed in ack answers. Each test runs the
real client (and mostly a real runner) against the tests' own server (faults/hostile.py)
answering that way.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import trio
from pydantic import SecretStr

from faults.hostile import (
    OFFSETS,
    ROOT,
    STREAM,
    SUBSCRIPTION,
    WAKE,
    Answer,
    HostileServer,
    Request,
    claim_answer,
    head,
    reply,
    wake_event,
)
from runner import Runner, SubscriptionSpec
from runner._wire.client import StreamsClient, build_http
from runner._wire.protocol import Claim
from runner.errors import (
    RequestError,
    StreamConflict,
    StreamNotFound,
    SubscriptionConflict,
    SubscriptionNotFound,
)
from tests.support import captured_logs, eventually, running
from tests.test_hostile import Handled, acks, run_for, settings

OTHER = f"{ROOT}/__ds/subscriptions/t"


def error(status: int, code: str) -> Answer:
    return reply(status, {"error": {"code": code, "message": code.lower().replace("_", " ")}})


def in_turn(*answers: Answer) -> Answer:
    """These answers one after the other; the last one for every request after."""
    turns = itertools.chain(answers, itertools.repeat(answers[-1]))

    async def answer(request: Request, stream: trio.SocketStream) -> None:
        await next(turns)(request, stream)

    return answer


@pytest.fixture
async def server(request: pytest.FixtureRequest, nursery: trio.Nursery) -> HostileServer:
    hostile = HostileServer(answers=getattr(request, "param", {}))
    await nursery.start(hostile.run)
    return hostile


def managed(server: HostileServer, **overrides: Any) -> Any:
    """Settings for a runner that manages subscription `s` (and `t`, if asked)."""
    specs = [SubscriptionSpec(id="s", pattern="jobs/*")]
    if overrides.pop("with_t", False):
        specs.append(SubscriptionSpec(id="t", pattern="other/*"))
    return settings(server, subscriptions=tuple(specs), **overrides)


# -- the client: status and route decide ----------------------------------------------------------


A_CLAIM = Claim("s", "w_1", 1, (), 30_000, SecretStr("claim-token"))
CLAIM = SUBSCRIPTION + "/claim"

Call = Callable[[StreamsClient], Awaitable[object]]
CASES: list[tuple[str, str, Answer, Call, type[Exception]]] = [
    (
        "PUT",
        SUBSCRIPTION,
        error(409, "CONFIG_CONFLICT"),
        lambda wire: wire.ensure_subscription("s", wake_stream="wake/pool", pattern="jobs/*"),
        SubscriptionConflict,
    ),
    ("POST", CLAIM, error(404, "NOT_FOUND"), lambda wire: wire.claim("s", "me"), SubscriptionNotFound),
    (
        "POST",
        SUBSCRIPTION + "/ack",
        error(410, "SUBSCRIPTION_GONE"),
        lambda wire: wire.ack(A_CLAIM, []),
        SubscriptionNotFound,
    ),
    ("POST", SUBSCRIPTION + "/release", reply(404), lambda wire: wire.release(A_CLAIM), SubscriptionNotFound),
    ("POST", CLAIM, error(409, "BUSY_ELSEWHERE"), lambda wire: wire.claim("s", "me"), RequestError),
    ("GET", STREAM, error(404, "NOT_FOUND"), lambda wire: wire.read("jobs/a", "-1"), StreamNotFound),
    ("PUT", STREAM, error(409, "CONFIG_CONFLICT"), lambda wire: wire.create_stream("jobs/a"), StreamConflict),
]


@pytest.mark.parametrize(
    ("method", "path", "answer", "call", "expected"),
    CASES,
    ids=["create-409", "claim-404", "ack-410", "release-404", "claim-409-unknown", "read-404", "stream-create-409"],
)
async def test_an_error_answer_means_what_its_status_says_on_its_route(
    server: HostileServer, method: str, path: str, answer: Answer, call: Call, expected: type[Exception]
) -> None:
    server.answers[(method, path)] = answer
    async with build_http(server.url, timeout=2) as http:
        with pytest.raises(RequestError) as raised:
            await call(StreamsClient(http))
    assert type(raised.value) is expected


async def test_a_code_of_another_servers_own_is_said_once_not_at_every_answer(server: HostileServer) -> None:
    server.answers[("POST", SUBSCRIPTION + "/claim")] = error(404, "NOT_FOUND")
    with captured_logs() as logs:
        async with build_http(server.url, timeout=2) as http:
            wire = StreamsClient(http)
            for _ in range(3):
                with pytest.raises(SubscriptionNotFound):
                    await wire.claim("s", "me")
    said = [entry for entry in logs if entry["event"] == "answer.unknown_code"]
    assert [(entry["code"], entry["status"], entry["treated_as"]) for entry in said] == [
        ("NOT_FOUND", 404, "SubscriptionNotFound")
    ]


# -- the runner: what it does with them --------------------------------------------------------


@pytest.mark.parametrize(
    "server",
    [
        {
            ("PUT", WAKE): reply(200),
            ("PUT", SUBSCRIPTION): error(409, "CONFIG_CONFLICT"),
            ("PUT", OTHER): reply(201, {}),
            ("POST", OTHER + "/claim"): error(409, "NO_PENDING_WORK"),
        }
    ],
    indirect=True,
)
async def test_a_subscription_with_another_configuration_is_reported_and_everything_is_served(
    server: HostileServer,
) -> None:
    handler = Handled()
    runner = Runner(managed(server, with_t=True), handlers={"s": handler, "t": Handled()})
    with captured_logs() as logs:
        async with running(runner):  # it was never streaming: the connect failed for ever
            await eventually(lambda: len(handler.batches) == 1, timeout=5, what="the conflicting one served as it is")
            await eventually(lambda: server.count("POST", OTHER + "/claim") >= 1, timeout=5, what="t claimed")
    assert [entry["subscription"] for entry in logs if entry["event"] == "subscription.conflict"] == ["s"]


@pytest.mark.parametrize(
    "server",
    [
        {
            ("PUT", WAKE): reply(200),
            ("PUT", SUBSCRIPTION): reply(201, {}),
            ("POST", SUBSCRIPTION + "/claim"): in_turn(error(404, "NOT_FOUND"), reply(200, claim_answer())),
        }
    ],
    indirect=True,
)
async def test_a_subscription_missing_at_a_claim_is_put_back_at_once_and_served(server: HostileServer) -> None:
    handler = Handled()
    async with running(Runner(managed(server), handlers={"s": handler})):
        await eventually(lambda: len(handler.batches) == 1, timeout=5, what="the claim after putting it back")
    puts = [r.at for r in server.requests if r.method == "PUT" and r.path == SUBSCRIPTION]
    missing = next(r.at for r in server.requests if r.path == SUBSCRIPTION + "/claim")
    assert len(puts) == 2, "created at the connect, put back after the claim found it missing"
    assert puts[1] - missing < 0.5  # within one heartbeat (it was the next reconnect: 60 s there)


@pytest.mark.parametrize(
    "server",
    [
        {
            ("POST", SUBSCRIPTION + "/ack"): error(410, "SUBSCRIPTION_GONE"),
            # Claimed again at once to put it back; this runner does not manage it, so that is all.
            ("POST", SUBSCRIPTION + "/claim"): in_turn(reply(200, claim_answer()), error(404, "NOT_FOUND")),
        }
    ],
    indirect=True,
)
async def test_an_ack_after_the_subscription_was_deleted_ends_the_claim_as_gone(server: HostileServer) -> None:
    with captured_logs() as logs:
        async with running(Runner(settings(server), handlers={"s": Handled()})):
            await eventually(lambda: server.count("POST", SUBSCRIPTION + "/claim") == 2, timeout=5, what="a claim")
    assert [entry["event"] for entry in logs if "410" in str(entry.get("reason", ""))] == ["claim.subscription_gone"]
    assert not [entry for entry in logs if "could not renew" in str(entry)]


# -- silence while the server answers -----------------------------------------------------------


async def wake_then_silence(request: Request, stream: trio.SocketStream) -> None:
    """An SSE answer that delivers the wake and then nothing at all, not even a keep-alive."""
    await stream.send_all(head(200, {"content-type": "text/event-stream"}, length=None))
    for name, data in (("data", [wake_event()]), ("control", {"streamNextOffset": OFFSETS[1]})):
        await stream.send_all(f"event: {name}\ndata: {json.dumps(data)}\n\n".encode())
    await trio.sleep(3600)


KEEPALIVE = 1.5


@pytest.mark.parametrize("server", [{("GET", WAKE + "?live"): wake_then_silence}], indirect=True)
async def test_a_live_stream_without_keep_alives_is_trusted_while_probes_find_nothing_missed(
    server: HostileServer,
) -> None:
    handler = Handled()
    with captured_logs() as logs:
        await run_for(Runner(settings(server, keepalive_timeout=KEEPALIVE), handlers={"s": handler}), 3 * KEEPALIVE)
    assert server.count("GET", WAKE) == 1, "the silent stream was reconnected"
    assert len(handler.batches) == 1
    assert not [entry for entry in logs if entry["event"] == "wake.stream_error"]


@pytest.mark.parametrize(
    "server",
    [
        {
            ("GET", WAKE + "?live"): wake_then_silence,
            # The connect's HEAD is answered, the probes after it are not.
            ("HEAD", WAKE): in_turn(reply(200, headers={"stream-next-offset": OFFSETS[1]}), error(503, "DOWN")),
        }
    ],
    indirect=True,
)
async def test_a_silent_live_stream_is_dead_after_the_keepalive_timeout_when_no_probe_vouches(
    server: HostileServer,
) -> None:
    # Probe failures alone would not reset it here: only the keep-alive watchdog can.
    runner = Runner(
        settings(server, keepalive_timeout=KEEPALIVE, heartbeat_failure_threshold=1000), handlers={"s": Handled()}
    )
    with captured_logs() as logs:
        await run_for(runner, KEEPALIVE + 1.0)
    errors = [str(entry["error"]) for entry in logs if entry["event"] == "wake.stream_error"]
    assert len(errors) == 1
    assert "silent for 1.5 s" in errors[0]


# -- claim tokens that the server refreshes -------------------------------------------------------


@pytest.mark.parametrize(
    "server",
    [
        {
            ("POST", SUBSCRIPTION + "/claim"): reply(200, claim_answer(lease_ttl_ms=1500)),
            ("POST", SUBSCRIPTION + "/ack"): reply(200, {"ok": True, "next_wake": False, "token": "refreshed-token"}),
        }
    ],
    indirect=True,
)
async def test_the_ack_after_a_refreshed_token_carries_it(server: HostileServer) -> None:
    handler = Handled(delay=1.2)  # the lease keeper renews every 0.5 s meanwhile
    async with running(Runner(settings(server), handlers={"s": handler})):
        await eventually(lambda: any("done" in str(r.json()) for r in acks(server)), timeout=5, what="the done ack")
    tokens = [r.headers["authorization"] for r in acks(server)]
    assert len(tokens) >= 3
    assert tokens == ["Bearer claim-token"] + ["Bearer refreshed-token"] * (len(tokens) - 1)
