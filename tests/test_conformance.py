"""The conformance matrix (issue 23, item 4): the same runner scenarios against two servers.

Every test runs twice, with the same assertions:
- `reference`: the Node reference server (0.3.7) directly;
- `variant`: the reference server behind `faults.variant.VariantServer`, which answers like a
  second, Redis-backed pull-wake server. All its differences are on at once, as they are on such a
  server: CONFIG_CONFLICT, NOT_FOUND, 410 SUBSCRIPTION_GONE after a delete, claims with nothing
  pending granted, no SSE keep-alive while idle, claim tokens that expire and are refreshed in ack
  answers, leases clamped. Each scenario depends on one of them (named in its docstring) and would
  fail without the runner's handling of it; the others being on shows they do not get in the way.
  Where a scenario needs a setting of the variant (its SSE cycle, its token lifetime), the test
  says which and why.

Runners are real: in-process (`Runner`) mostly, `pullwake run` processes where a restart is the
point. Producers talk to the reference server directly; the runner talks to the server under test.
On the variant arm a few extra checks read the variant's record of exchanges, only to show that
the difference in question was really answered (the scenario's own assertions stay the same).
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pytest
import trio

from faults.variant import VariantServer
from runner import Batch, Runner
from runner._state.journal import Journal
from tests.support import Recorder, World, captured_logs, eventually, running
from tests.test_end_to_end import fully_acked, lines, start_runner_process, write_config

SERVERS = ["reference", "variant"]


@dataclass
class Server:
    """The server under test, for one test's world on the shared reference server."""

    kind: str
    world: World
    nursery: trio.Nursery
    variant: VariantServer | None = None
    """The variant proxy (the variant arm only)."""
    recorder: VariantServer | None = field(default=None, repr=False)
    """What records the requests: the variant, or on the reference arm with `record=True` a transparent one."""

    async def start(self, *, record: bool = False, sse_cycle: float = 60.0, token_ttl: float = 300.0) -> str:
        """Start it; the URL a runner talks to.

        `record=True` puts a transparent `VariantServer` (every difference off) in front of the
        reference server too, so requests can be counted on both arms alike. `sse_cycle` and
        `token_ttl` are the variant's (its defaults: a 60 s SSE cycle, as the Redis-backed server's).
        """
        if self.kind == "variant":
            self.variant = self.recorder = VariantServer(self.world.url, sse_cycle=sse_cycle, token_ttl=token_ttl)
        elif record:
            self.recorder = VariantServer.only(self.world.url)
        if self.recorder is None:
            return self.world.url
        await self.nursery.start(self.recorder.run)
        return self.recorder.url

    def answered(self, method: str, suffix: str, status: int) -> int:
        """How often the variant answered `method` on a path ending in `suffix` with `status`."""
        assert self.variant is not None
        return self.variant.count(method, suffix, status)


@pytest.fixture(params=SERVERS)
async def server(request: pytest.FixtureRequest, world: World, nursery: trio.Nursery) -> Server:
    return Server(request.param, world, nursery)


async def holds(predicate: Callable[[], bool], *, seconds: float, what: str) -> None:
    """`predicate` stays true for `seconds` (checked every 10 ms); fails the moment it does not."""
    deadline = trio.current_time() + seconds
    while trio.current_time() < deadline:
        assert predicate(), f"{what} stopped holding after {seconds - (deadline - trio.current_time()):.2f} s"
        await trio.sleep(0.01)


def numbers(batches: list[Batch]) -> list[int]:
    return [message["n"] for batch in batches for message in batch.messages]


def events(logs: list[Any], name: str) -> list[Any]:
    return [entry for entry in logs if entry["event"] == name]


# -- 1. the claim lifecycle --------------------------------------------------------------------


async def test_appended_events_are_handled_once_in_order_and_acked_to_the_tail(server: Server) -> None:
    """Claim, read, handle, ack, done: the whole life of claims. On the variant every claim token
    is the proxy's own (mapped back upstream) and every ack answer carries a new one; its SSE
    carries no idle keep-alive."""
    world = server.world
    url = await server.start()
    await world.create("a", "b")
    recorder = Recorder()
    runner = Runner(world.settings(server_url=url), handlers={world.sub: recorder})
    async with running(runner):
        for n in range(40):
            await world.append("ab"[n % 2], {"n": n})
        await eventually(lambda: recorder.count >= 40, what="40 events handled")
        await eventually(lambda: fully_acked(world, "a", "b"), what="the acked offsets to reach the tails")
        await eventually(lambda: not runner.health().in_flight, what="the last claim to end")
    for index, name in enumerate("ab"):
        assert [m["n"] for m in recorder.messages(world.stream(name))] == list(range(index, 40, 2)), name
    assert recorder.count == 40, "every event exactly once"
    health = runner.health()
    assert (health.claims_failed, health.reconnect_count) == (0, 0)
    if server.variant is not None:
        assert server.answered("POST", "/ack", 200) >= 1
        assert server.answered("POST", "/ack", 401) == 0


# -- 2. a subscription with another configuration ----------------------------------------------


async def test_a_subscription_with_another_configuration_is_logged_once_and_the_others_are_served(
    server: Server,
) -> None:
    """Variant: 409 CONFIG_CONFLICT (reference: SUBSCRIPTION_ALREADY_EXISTS). Taken as a conflict of
    the wake stream, it failed every connect: no subscription was served at all."""
    world = server.world
    url = await server.start()
    await world.create("a/x", "b/x")
    conflicting = world.spec(f"{world.sub}-a", pattern=f"jobs-{world.uid}/a/*")
    other = world.spec(f"{world.sub}-b", pattern=f"jobs-{world.uid}/b/*")
    await world.client.create_stream(world.wake)
    await world.client.ensure_subscription(
        conflicting.id, wake_stream=world.wake, pattern=conflicting.pattern, lease_ttl_ms=7_000
    )
    recorders = {conflicting.id: Recorder("a"), other.id: Recorder("b")}
    runner = Runner(world.settings(server_url=url, subscriptions=(conflicting, other)), handlers=recorders)
    with captured_logs() as logs:
        async with running(runner):  # `running` waits for streaming: the connect went through
            await world.append("b/x", {"n": 1})
            await world.append("a/x", {"n": 2})
            await eventually(lambda: all(r.count == 1 for r in recorders.values()), what="both served")
    errors = [(entry["event"], entry.get("subscription")) for entry in logs if entry["log_level"] == "error"]
    assert errors == [("subscription.conflict", conflicting.id)]
    assert recorders[other.id].messages() == [{"n": 1}]
    assert recorders[conflicting.id].messages() == [{"n": 2}], "the conflicting one is served as it is"
    assert (await world.get_subscription(conflicting.id))["lease_ttl_ms"] == 7_000, "and left as it is"
    if server.variant is not None:
        assert server.answered("PUT", f"/subscriptions/{conflicting.id}", 409) >= 1


# -- 3. a subscription lost while the runner runs ----------------------------------------------

HEARTBEAT = 1.0


async def test_a_subscription_deleted_while_the_runner_runs_is_back_within_a_heartbeat_and_the_gap_replayed(
    server: Server,
) -> None:
    """Variant: 404 NOT_FOUND (reference: SUBSCRIPTION_NOT_FOUND). Taken as a failed claim, the
    subscription came back only at the next connect (the variant's SSE cycle, 60 s by default,
    kept here so that a reconnect cannot put it back first).

    Nothing wakes a runner for a subscription that is gone (no wake is written for the events
    appended meanwhile), so the test delivers the wake such a server had queued before the delete:
    a wake record appended to the wake stream, as the server writes them. Its claim finds the
    subscription missing."""
    world = server.world
    url = await server.start()
    await world.create("a")
    recorder = Recorder()
    settings = world.settings(server_url=url, heartbeat_interval=HEARTBEAT, sweep_interval=3600.0)
    runner = Runner(settings, handlers={world.sub: recorder})
    with captured_logs() as logs:
        async with running(runner):
            await world.append("a", {"n": 0})
            await eventually(lambda: recorder.count == 1, what="the first event")
            await eventually(lambda: fully_acked(world, "a"), what="the first event's ack")
            await eventually(lambda: not runner.health().in_flight, what="the first claim to end")
            await world.delete_subscription(world.sub)
            await world.append("a", {"n": 1}, {"n": 2})  # the gap: no subscription, no wake
            wake = {
                "type": "wake",
                "subscription_id": world.sub,
                "stream": world.stream("a"),
                "generation": recorder.batches[0].generation + 1,
                "ts": int(time.time() * 1000),
            }
            await world.client.append(world.wake, wake)
            found = trio.current_time()

            async def back() -> bool:
                response = await world.http.get(world.client.subscription_url(world.sub))
                return response.status_code == 200

            await eventually(back, timeout=HEARTBEAT, what="the subscription to be put back")
            back_after = trio.current_time() - found
            await eventually(lambda: recorder.count == 3, what="the gap replayed")
            await world.append("a", {"n": 3})
            await eventually(lambda: recorder.count == 4, what="a new event on the subscription put back")
    assert numbers(recorder.batches) == [0, 1, 2, 3]
    gap = [batch for batch in recorder.batches if {m["n"] for m in batch.messages} <= {1, 2}]
    assert gap, "the gap's events came in batches of their own"
    assert all(batch.replayed for batch in gap)
    assert not recorder.batches[-1].replayed
    assert [entry["subscription"] for entry in events(logs, "subscription.was_missing")] == [world.sub]
    assert {entry["stream"] for entry in events(logs, "subscription.gap_replay")} == {world.stream("a")}
    assert runner.health().reconnect_count == 0, "put back by the claim, not by a reconnect"
    if server.variant is not None:
        assert server.answered("POST", "/claim", 404) == 1
    print(f"{server.kind}: the subscription was back {back_after:.2f} s after its wake")


# -- 4. a delete under a claim ----------------------------------------------------------------


async def test_a_subscription_deleted_under_a_claim_ends_it_as_gone_and_is_put_back(server: Server) -> None:
    """Variant: the renewal is answered 410 SUBSCRIPTION_GONE (reference: 404). It ended the claim
    as "could not renew the lease" (right outcome, wrong reason); now as gone, and it is put back."""
    world = server.world
    url = await server.start()
    await world.create("a")
    batches: list[Batch] = []
    deleted = trio.Event()

    async def hold_the_first(batch: Batch) -> None:
        batches.append(batch)
        if len(batches) == 1:
            await world.delete_subscription(world.sub)
            deleted.set()
            await trio.sleep_forever()  # until the lease keeper's renewal finds the subscription gone

    # A 3 s lease: the keeper renews after 1 s.
    settings = world.settings(server_url=url, subscriptions=(world.spec(lease_ttl_ms=3_000),), sweep_interval=3600.0)
    runner = Runner(settings, handlers={world.sub: hold_the_first})
    with captured_logs() as logs:
        async with running(runner):
            await world.append("a", {"n": 1})
            with trio.fail_after(15):
                await deleted.wait()
            await eventually(lambda: len(batches) == 2, timeout=10, what="the event handed over again")
    assert [entry["event"] for entry in logs if entry["event"].startswith("claim.") and "gone" in entry["event"]] == [
        "claim.subscription_gone"
    ]
    assert not events(logs, "claim.lease_lost")
    assert batches[1].messages == [{"n": 1}]
    assert batches[1].replayed, "the server put it back past the unacked event: the journal replays it"
    assert (await world.get_subscription(world.sub))["pattern"] == f"jobs-{world.uid}/*"
    if server.variant is not None:
        assert server.answered("POST", "/ack", 410) >= 1


# -- 5. a sweep finds nothing pending -----------------------------------------------------------


async def test_a_sweep_that_finds_nothing_costs_one_claim_and_a_grant_one_release(server: Server) -> None:
    """Variant: a claim with nothing pending is granted (reference: 409 NO_PENDING_WORK); worked
    as a claim, it took a generation and a lease for nothing. Requests are counted on both arms: the
    reference arm goes through a transparent recorder (the variant with every difference off)."""
    world = server.world
    url = await server.start(record=True)
    recorder_proxy = server.recorder
    assert recorder_proxy is not None
    sub_path = f"/subscriptions/{world.sub}"

    def posts() -> list[tuple[str, int]]:
        return [
            (exchange.path.rsplit("/", 1)[1], exchange.status)
            for exchange in recorder_proxy.exchanges
            if exchange.method == "POST" and f"{sub_path}/" in exchange.path
        ]

    def reads() -> int:
        return sum(1 for e in recorder_proxy.exchanges if e.method == "GET" and f"/jobs-{world.uid}/" in e.path)

    await world.create("a")
    recorder = Recorder()
    # A cooldown after the sweep would hold the event below far longer than the test waits for it.
    runner = Runner(world.settings(server_url=url, cooldown=60.0), handlers={world.sub: recorder})
    async with running(runner):
        # Each new connection sweeps: every served subscription is claimed once.
        await eventually(lambda: runner.health().claims_skipped == 1, what="the connect's sweep to end")
        swept = posts()
        assert runner.health().cooldowns == {}
        assert recorder.started == []
        assert reads() == 0
        await world.append("a", {"n": 1})
        await eventually(lambda: recorder.count == 1, timeout=5, what="the event (no cooldown after the sweep)")
        await eventually(lambda: not runner.health().in_flight, what="the event's claim to end")
    granted = [status for action, status in swept if action == "claim"] == [200]
    assert swept == ([("claim", 200), ("release", 204)] if granted else [("claim", 409)])
    assert posts()[len(swept) :] == [("claim", 200), ("ack", 200)]
    assert granted == (server.kind == "variant")


# -- 6. an idle live stream without keep-alives ------------------------------------------------

KEEPALIVE = 1.5


async def test_an_idle_live_stream_without_keep_alives_is_not_reset_while_probes_answer(server: Server) -> None:
    """Variant: no SSE keep-alive while idle; the response ends cleanly every `sse_cycle` (10 s
    here, longer than the test watches). The reference server sends one every 2 s here, which is
    also more than `keepalive_timeout`: on both, only the probes (every 0.5 s) vouch for the
    stream. The runner reconnected every `keepalive_timeout` though every probe was answered."""
    world = server.world
    url = await server.start(sse_cycle=10.0)
    await world.create("a")
    recorder = Recorder()
    runner = Runner(world.settings(server_url=url, keepalive_timeout=KEEPALIVE), handlers={world.sub: recorder})
    with captured_logs() as logs:
        async with running(runner):
            await world.append("a", {"n": 0})
            await eventually(lambda: recorder.count == 1, what="an event on the live stream")
            await holds(
                lambda: runner.health().reconnect_count == 0, seconds=3 * KEEPALIVE, what="no reconnect while idle"
            )
            await world.append("a", {"n": 1})
            await eventually(lambda: recorder.count == 2, what="an event after the silence")
    assert runner.health().reconnect_count == 0
    assert not events(logs, "wake.stream_error")
    assert not events(logs, "heartbeat.reset")


# -- 7. claim tokens refreshed in ack answers ---------------------------------------------------

TOKEN_TTL = 1.5


async def test_a_refreshed_claim_token_is_used_by_the_next_ack(server: Server) -> None:
    """Variant: claim tokens expire `token_ttl` (1.5 s here) after they were issued; each ack
    answer carries a new one. A 3 s lease is renewed every second, and the handler takes 3.5 s:
    a renewal with the first token after 1.5 s is refused (401 TOKEN_EXPIRED), the lease lost."""
    world = server.world
    url = await server.start(token_ttl=TOKEN_TTL)
    await world.create("a")
    recorder = Recorder(delay=3.5)
    settings = world.settings(server_url=url, subscriptions=(world.spec(lease_ttl_ms=3_000),))
    runner = Runner(settings, handlers={world.sub: recorder})
    with captured_logs() as logs:
        async with running(runner):
            await world.append("a", {"n": 1})
            await eventually(lambda: recorder.count == 1, what="the slow batch")
            await eventually(lambda: fully_acked(world, "a"), what="its done ack")
            await eventually(lambda: not runner.health().in_flight, what="the claim to end")
    assert recorder.messages() == [{"n": 1}]
    assert recorder.cancelled == []
    assert not events(logs, "claim.lease_lost")
    assert runner.health().claims_failed == 0
    assert runner.health().claims.get("completed") == 1
    if server.variant is not None:
        assert server.answered("POST", "/ack", 401) == 0
        assert server.answered("POST", "/ack", 200) >= 3, "renewals past the first token's lifetime"


async def ended(process: subprocess.Popen[bytes], signum: int) -> None:
    """Signal a runner process and wait for it off the event loop: the variant runs on this loop,
    and a runner that drains needs it to answer."""
    process.send_signal(signum)
    try:
        await trio.to_thread.run_sync(process.wait, 15)
    except subprocess.TimeoutExpired:
        process.kill()
        await trio.to_thread.run_sync(process.wait, 15)
        raise


def held_claim(journal: Path, subscription: str, server_url: str) -> dict[str, Any] | None:
    """What the runner's journal on disk (snapshot and log) says it holds, read as a restart would."""
    for held in Journal(journal, server_url=server_url).held_claims():
        if held.subscription == subscription:
            return asdict(held)
    return None


async def test_a_refreshed_claim_token_survives_a_kill_and_hands_the_claim_back(
    server: Server, record_file: Path, tmp_path: Path
) -> None:
    """kill -9 mid-claim, then restart: the journal's newest claim token hands the claim back.
    Variant: tokens live 2 s, renewals come every 1.5 s (a 4.5 s lease); after the first renewal
    the variant's tokens live 60 s, so the newest is still good when the restarted runner uses it,
    while the one the claim was granted with has expired (a release with it: 401)."""
    world = server.world
    url = await server.start(token_ttl=2.0)
    await world.create("a")
    state_dir = tmp_path / "state"
    config = write_config(tmp_path / "runner.toml", world, state_dir)
    config.write_text(
        config.read_text()
        .replace(f'server_url = "{world.url}"', f'server_url = "{url}"')
        .replace("lease_ttl_ms = 2000", "lease_ttl_ms = 4500")
    )
    journal = state_dir / "journal.json"
    log = tmp_path / "runner.log"
    first = start_runner_process(config, log, PULLWAKE_TEST_DELAY="60", PULLWAKE_TEST_ANNOUNCE="1")
    try:
        await eventually(lambda: '"target": "streaming"' in log.read_text(), what="the first runner to stream")
        await world.append("a", {"n": 1})
        await eventually(lambda: '"started"' in record_file.read_text(), what="the batch to start")
        started = trio.current_time()
        granted = held_claim(journal, world.sub, url)
        assert granted is not None

        def renewed(since: dict[str, Any]) -> Callable[[], bool]:
            def check() -> bool:
                now = held_claim(journal, world.sub, url)
                return now is not None and now["renewed_at"] > since["renewed_at"]

            return check

        await eventually(renewed(granted), timeout=5, what="a renewal")
        if server.variant is not None:
            server.variant.token_ttl = 60.0
        once = held_claim(journal, world.sub, url)
        assert once is not None
        await eventually(renewed(once), timeout=5, what="a second renewal")
        newest = held_claim(journal, world.sub, url)
        assert newest is not None
        if server.variant is not None:
            assert newest["token"] != granted["token"]
            assert trio.current_time() - started > 2.0, "the token the claim was granted with has expired"
    finally:
        await ended(first, signal.SIGKILL)
    assert not [line for line in lines(record_file) if '"message"' in line], "the killed runner finished nothing"
    second = start_runner_process(config, log)
    try:
        await eventually(
            lambda: '"message": {"n": 1}' in record_file.read_text(), timeout=15, what="the restarted runner's batch"
        )
    finally:
        await ended(second, signal.SIGTERM)
    text = log.read_text()
    assert '"claim.returned"' in text, "the restarted runner handed the claim back"
    assert '"claim.already_gone"' not in text
    assert '"claim.return_failed"' not in text
    if server.variant is not None:
        assert server.answered("POST", "/release", 401) == 0
        assert server.answered("POST", "/release", 204) >= 1
    assert [json.loads(line)["message"] for line in lines(record_file) if '"message"' in line] == [{"n": 1}]
