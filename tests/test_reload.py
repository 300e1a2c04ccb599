"""Live subscription changes (`Runner.reload`) against the real reference server."""

from __future__ import annotations

from typing import Any

import pytest
import trio

from runner import ConfigError, Runner, Settings, SubscriptionSpec
from tests import reload_handlers
from tests.reload_handlers import GATES, HANDLED, HELD
from tests.support import World, captured_logs, eventually, running

HANDLER = "tests.reload_handlers:record"


def spec(world: World, name: str, **fields: Any) -> SubscriptionSpec:
    """Subscription `name` of this test: its streams are jobs-<uid>/<name>/*."""
    fields.setdefault("pattern", f"jobs-{world.uid}/{name}/*")
    fields.setdefault("handler", HANDLER)
    return world.spec(f"{world.sub}-{name}", **fields)


def with_subscriptions(settings: Settings, *specs: SubscriptionSpec, **changes: Any) -> Settings:
    return settings.model_copy(update={"subscriptions": specs, **changes})


async def subscription_exists(world: World, subscription: str) -> bool:
    response = await world.http.get(world.client.subscription_url(subscription))
    assert response.status_code in (200, 404), response.text
    return response.status_code == 200


@pytest.fixture(autouse=True)
def fresh_records() -> None:
    HANDLED.clear()
    GATES.clear()
    HELD.clear()


async def test_a_subscription_added_by_reload_is_created_and_served(world: World) -> None:
    a, b = spec(world, "a"), spec(world, "b")
    await world.create("a/1", "b/1")
    settings = world.settings(subscriptions=(a,))
    runner = Runner(settings)
    async with running(runner):
        assert not await subscription_exists(world, b.id)
        reloaded = await runner.reload(with_subscriptions(settings, a, b))
        assert (reloaded.added, reloaded.removed, reloaded.changed) == ([b.id], [], {})
        assert reloaded.settled.is_set()
        assert await subscription_exists(world, b.id), "created on the server"
        await world.append("b/1", {"n": 1}, {"n": 2})
        await world.append("a/1", {"n": 3})
        await eventually(lambda: len(HANDLED[b.id]) == 2 and len(HANDLED[a.id]) == 1, what="both served")
    assert HANDLED[b.id] == [{"n": 1}, {"n": 2}]
    assert [spec.id for spec in runner.settings.subscriptions] == [a.id, b.id], "the runner's settings say so"


@pytest.mark.parametrize("delete", [True, False], ids=["deleted", "left"])
async def test_a_removed_subscription_finishes_its_claim_in_flight_then_is_deleted_if_asked(
    world: World, delete: bool
) -> None:
    a, b = spec(world, "a"), spec(world, "b")
    await world.create("a/1", "b/1")
    settings = world.settings(subscriptions=(a, b))
    runner = Runner(settings)
    GATES[b.id] = trio.Event()
    async with running(runner):
        first = await world.append("b/1", {"n": 1})
        await eventually(lambda: HELD[b.id] == 1, what="the claim of b to be in its handler")
        reloaded = await runner.reload(with_subscriptions(settings, a, delete_removed_subscriptions=delete))
        assert (reloaded.removed, reloaded.draining) == ([b.id], [b.id])
        assert [claim.subscription for claim in runner.health().in_flight] == [b.id], "not cut by the reload"
        await world.append("b/1", {"n": 2})  # after the reload: no claim of b takes it
        assert await subscription_exists(world, b.id), "not deleted under a claim in flight"
        GATES[b.id].set()
        with trio.fail_after(10):
            await reloaded.settled.wait()
        assert HANDLED[b.id] == [{"n": 1}], "the claim in flight finished; no new claim of b"
        assert runner.health().claims["completed"] == 1
        assert runner.health().claims["interrupted"] == runner.health().claims["aborted"] == 0
        assert not runner.health().in_flight
        if delete:
            assert not await subscription_exists(world, b.id)
        else:
            assert await subscription_exists(world, b.id)
            assert await world.acked_offsets(b.id) == {world.stream("b/1"): first}, "acknowledged, handed back"
        await world.append("a/1", {"n": 3})
        await eventually(lambda: len(HANDLED[a.id]) == 1, what="a, still served")
    assert HANDLED[b.id] == [{"n": 1}]


@pytest.mark.parametrize("policy", ["keep", "replace"])
async def test_a_changed_subscription_is_kept_with_a_warning_or_replaced_losing_nothing(
    world: World, policy: str
) -> None:
    a = spec(world, "a", lease_ttl_ms=5_000)
    changed = spec(world, "a", lease_ttl_ms=7_000, pattern=f"jobs-{world.uid}/a/*")
    await world.create("a/1")
    settings = world.settings(subscriptions=(a,))
    runner = Runner(settings)
    GATES[a.id] = trio.Event()
    with captured_logs() as logs:
        async with running(runner):
            await world.append("a/1", {"n": 1})
            await eventually(lambda: HELD[a.id] == 1, what="a claim of a in its handler")
            reloaded = await runner.reload(with_subscriptions(settings, changed, on_subscription_changed=policy))
            assert reloaded.changed == {a.id: "kept" if policy == "keep" else "replaced"}
            # Appended while the old claim is held: after a replace, the server links the stream past these.
            await world.append("a/1", {"n": 2}, {"n": 3})
            GATES[a.id].set()
            with trio.fail_after(10):
                await reloaded.settled.wait()
            await world.append("a/1", {"n": 4})
            await eventually(lambda: len(HANDLED[a.id]) >= 4, what="every event of a")
    assert sorted(message["n"] for message in HANDLED[a.id]) == [1, 2, 3, 4], "none lost, none twice"
    server = await world.get_subscription(a.id)
    if policy == "keep":
        assert server["lease_ttl_ms"] == 5_000
        warned = [entry for entry in logs if entry["event"] == "subscription.conflict"]
        assert len(warned) == 1
        assert warned[0]["differs"] == ["lease_ttl_ms: server 5000, configured 7000"]
    else:
        assert server["lease_ttl_ms"] == 7_000
        assert [entry["subscription"] for entry in logs if entry["event"] == "subscription.replaced"] == [a.id]


async def test_a_reload_that_cannot_be_applied_changes_nothing(world: World) -> None:
    a, b = spec(world, "a"), spec(world, "b", handler="tests.no_such_module:handle")
    await world.create("a/1")
    settings = world.settings(subscriptions=(a,))
    runner = Runner(settings)
    async with running(runner):
        with pytest.raises(ConfigError, match="no_such_module"):
            await runner.reload(with_subscriptions(settings, b))
        assert runner.settings.subscriptions == (a,)
        assert not await subscription_exists(world, b.id)
        await world.append("a/1", {"n": 1})
        await eventually(lambda: len(HANDLED[a.id]) == 1, what="a, still served")


async def test_settings_that_cannot_change_live_are_named_once_and_keep_their_values(world: World) -> None:
    a, b = spec(world, "a"), spec(world, "b")
    await world.create("a/1", "b/1")
    settings = world.settings(subscriptions=(a,))
    runner = Runner(settings)
    with captured_logs() as logs:
        async with running(runner):
            new = with_subscriptions(settings, a, b, wake_stream=f"other-{world.uid}", cooldown=3.0)
            reloaded = await runner.reload(new)
            assert reloaded.kept_settings == ["cooldown", "wake_stream"]
            assert (runner.settings.wake_stream, runner.settings.cooldown) == (settings.wake_stream, settings.cooldown)
            await world.append("b/1", {"n": 1})
            await eventually(lambda: len(HANDLED[b.id]) == 1, what="b served, woken on the old wake stream")
    kept = [entry for entry in logs if entry["event"] == "reload.settings_kept"]
    assert [entry["settings"] for entry in kept] == [["cooldown", "wake_stream"]]


async def test_events_flowing_while_subscriptions_come_and_go_are_each_handled_once(world: World) -> None:
    """A producer appends to a, b and c all along; a reload adds c and removes b meanwhile."""
    a, b, c = spec(world, "a"), spec(world, "b"), spec(world, "c")
    await world.create("a/1", "a/2", "b/1", "c/1")
    settings = world.settings(subscriptions=(a, b))
    runner = Runner(settings)
    appended: dict[str, list[int]] = {"a": [], "b": [], "c": []}

    async def produce(reloaded: trio.Event) -> None:
        for n in range(150):
            for name in ("a/1", "a/2", "b/1") if n % 3 else ("a/1", "b/1", "c/1"):
                await world.append(name, {"n": n, "stream": name})
                appended[name[0]].append(n)
            if n == 75:
                await reloaded.wait()
            await trio.sleep(0.002)  # a steady trickle, not one burst

    async with running(runner):
        reloaded = trio.Event()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(produce, reloaded)
            await eventually(lambda: len(HANDLED[b.id]) >= 20, what="b under way")
            result = await runner.reload(with_subscriptions(settings, a, c))
            # c is created during the reload: the server links its stream at the tail then (its rule), so
            # what was appended before is not c's; what comes after the reload must all be handled.
            added_at = len(appended["c"])
            assert (result.added, result.removed) == ([c.id], [b.id])
            reloaded.set()
        await eventually(
            lambda: len(HANDLED[a.id]) == len(appended["a"]) and len(HANDLED[c.id]) >= len(appended["c"]) - added_at,
            what="every event of a, and of c since it was added",
        )
        with trio.fail_after(10):
            await result.settled.wait()
    seen_a = [(m["stream"], m["n"]) for m in HANDLED[a.id]]
    assert sorted(seen_a) == sorted({*seen_a}), "a: none handled twice"
    assert len(seen_a) == len(appended["a"]), "a: none lost"
    seen_c = [m["n"] for m in HANDLED[c.id]]
    assert len(seen_c) == len(set(seen_c)), "c: none handled twice"
    assert set(appended["c"][added_at:]) <= set(seen_c), "c: nothing appended after the reload lost"
    seen_b = [m["n"] for m in HANDLED[b.id]]
    assert len(seen_b) == len(set(seen_b)), "b: none handled twice"
    assert seen_b == appended["b"][: len(seen_b)], "b: handled in order up to where it was removed"
    assert reload_handlers.HELD[b.id] == 0
