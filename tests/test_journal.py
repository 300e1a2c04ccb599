"""When the journal reaches the disk (docs/design.md §6.4), in virtual time.

What a restart depends on (a claim granted, gaps) is written at once; acks and
ended claims at most once per interval; whatever is left when the run ends is
written then. Without a running `keep`, every change is written through.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.lowlevel
import trio.testing
from pydantic import SecretStr

import runner._state.journal
from runner._state.journal import Gap, HeldClaim, Journal
from runner._wire.protocol import Ack, Claim, ClaimedStream

INTERVAL = 1.0
STREAM = "jobs/a"


def claim(wake_id: str = "w1") -> Claim:
    return Claim("s1", wake_id, 1, (ClaimedStream(STREAM, "-1", "00000009", True),), 30_000, SecretStr("t"))


@pytest.fixture
def writes(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """Every document the journal writes, in order. The worker thread's hop is made inline,
    so a write is done when the tasks are (virtual time cannot wait for a real thread)."""
    written: list[dict[str, Any]] = []
    original = runner._state.journal._write

    def recording(path: Path, document: bytes) -> bool:
        written.append(json.loads(document))
        return original(path, document)

    async def inline(function: Callable[..., Any], *args: Any) -> Any:
        await trio.lowlevel.checkpoint()
        return function(*args)

    monkeypatch.setattr(runner._state.journal, "_write", recording)
    monkeypatch.setattr(trio.to_thread, "run_sync", inline)
    return written


async def settle() -> None:
    """Let the keeper finish what is due now (no virtual time passes)."""
    await trio.testing.wait_all_tasks_blocked()


async def test_a_granted_claim_is_written_at_once_and_acks_at_most_once_an_interval(
    tmp_path: Path, writes: list[dict[str, Any]], autojump_clock: trio.testing.MockClock
) -> None:
    journal = Journal(tmp_path / "journal.json", server_url="http://127.0.0.1:1")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(lambda: journal.keep(interval=INTERVAL))
        await settle()
        journal.claimed(claim())
        await settle()
        assert len(writes) == 1, "a granted claim is on disk at once"
        assert "s1" in writes[0]["claims"]

        for n in range(1, 6):
            journal.acked(claim(), [Ack(STREAM, f"0000000{n}")])
            await trio.sleep(0.1)
        await settle()
        assert len(writes) == 1, "acks wait for the interval"

        await trio.sleep(INTERVAL)
        await settle()
        assert len(writes) == 2
        assert writes[1]["acked"]["s1"][STREAM] == "00000005", "one write carries every ack since"

        journal.ended("s1", "w1")
        nursery.cancel_scope.cancel()
    assert writes[-1]["claims"] == {}, "the end of the run writes what is left"
    on_disk = json.loads((tmp_path / "journal.json").read_text())
    assert on_disk == writes[-1]


async def test_gaps_are_written_at_once(
    tmp_path: Path, writes: list[dict[str, Any]], autojump_clock: trio.testing.MockClock
) -> None:
    journal = Journal(tmp_path / "journal.json", server_url="http://127.0.0.1:1")
    journal.linked("s1", {STREAM: "00000002"}, created=False)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(lambda: journal.keep(interval=INTERVAL))
        await settle()
        before = len(writes)
        journal.linked("s1", {STREAM: "00000009"}, created=True)  # the server forgot it: a gap
        await settle()
        assert len(writes) == before + 1
        assert writes[-1]["gaps"]["s1"] == [{"stream": STREAM, "start": "00000002", "end": "00000009"}]
        nursery.cancel_scope.cancel()


def test_without_a_keeper_every_change_is_written_through(tmp_path: Path, writes: list[dict[str, Any]]) -> None:
    journal = Journal(tmp_path / "journal.json", server_url="http://127.0.0.1:1")
    journal.claimed(claim())
    journal.acked(claim(), [Ack(STREAM, "00000003")])
    journal.ended("s1", "w1")
    assert len(writes) == 3
    restarted = Journal(tmp_path / "journal.json", server_url="http://127.0.0.1:1")
    assert restarted.held_claims() == []
    assert restarted.sole_stream("s1") == (STREAM, "00000003")


# -- what the journal remembers ------------------------------------------------------------

URL = "http://127.0.0.1:1"


def on_disk(path: Path) -> dict[str, Any]:
    document: dict[str, Any] = json.loads(path.read_text())
    return document


def test_a_granted_claim_is_held_until_that_claim_ends(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("runner._state.journal.time.time", lambda: 1000.0)
    journal = Journal(None, server_url=URL)
    journal.claimed(claim("w1"))
    assert journal.holds("s1")
    assert journal.held_claims() == [HeldClaim("s1", "w1", 1, "t", 1000.0)]
    assert journal.sole_stream("s1") == (STREAM, "-1")

    monkeypatch.setattr("runner._state.journal.time.time", lambda: 1005.0)
    journal.acked(claim("w1"), [Ack(STREAM, "00000002")])
    assert journal.held_claims() == [HeldClaim("s1", "w1", 1, "t", 1005.0)], "an ack renews the lease"
    monkeypatch.setattr("runner._state.journal.time.time", lambda: 1010.0)
    journal.acked(claim("w0"), [Ack(STREAM, "00000003")])
    assert journal.held_claims()[0].renewed_at == 1005.0, "an ack of an older claim renews nothing"
    assert journal.sole_stream("s1") == (STREAM, "00000003"), "but its progress counts"

    journal.ended("s1", "w0")
    assert journal.holds("s1"), "an older claim ending does not end this one"
    journal.ended("s1", "w1")
    assert not journal.holds("s1")
    assert journal.held_claims() == []


def test_a_held_claim_speaks_for_its_claim() -> None:
    held = HeldClaim("s1", "w3", 3, "secret", 1.0)
    as_claim = held.as_claim()
    assert (as_claim.subscription, as_claim.wake_id, as_claim.generation) == ("s1", "w3", 3)
    assert as_claim.token.get_secret_value() == "secret"


def test_acknowledged_offsets_never_go_backwards() -> None:
    journal = Journal(None, server_url=URL)
    journal.acked(claim(), [Ack(STREAM, "00000005")])
    journal.acked(claim(), [Ack(STREAM, "00000003")])
    assert journal.sole_stream("s1") == (STREAM, "00000005")
    journal.claimed(claim())  # the claim says the server has it acknowledged at -1
    assert journal.sole_stream("s1") == (STREAM, "00000005")
    journal.acked(claim(), [Ack(STREAM, "00000006")])
    assert journal.sole_stream("s1") == (STREAM, "00000006")


def test_sole_stream_only_for_a_subscription_with_one_known_stream() -> None:
    journal = Journal(None, server_url=URL)
    assert journal.sole_stream("s1") is None
    journal.linked("s1", {}, created=False)
    assert journal.sole_stream("s1") is None
    journal.acked(claim(), [Ack(STREAM, "00000001")])
    assert journal.sole_stream("s1") == (STREAM, "00000001")
    journal.acked(claim(), [Ack("jobs/b", "00000001")])
    assert journal.sole_stream("s1") is None


def test_the_streams_acknowledged_longest_ago_are_forgotten_first(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(runner._state.journal, "MAX_STREAMS", 3)
    journal = Journal(tmp_path / "journal.json", server_url=URL)
    for name in "abc":
        journal.acked(claim(), [Ack(f"jobs/{name}", "00000001")])
    journal.acked(claim(), [Ack("jobs/a", "00000002")])  # a is the newest now
    journal.acked(claim(), [Ack("jobs/d", "00000001")])
    assert on_disk(tmp_path / "journal.json")["acked"]["s1"] == {
        "jobs/c": "00000001",
        "jobs/a": "00000002",
        "jobs/d": "00000001",
    }


def test_a_subscription_the_server_forgot_leaves_gaps_from_what_was_acknowledged() -> None:
    journal = Journal(None, server_url=URL)
    journal.acked(claim(), [Ack(STREAM, "00000002"), Ack("jobs/b", "00000004"), Ack("jobs/c", "00000004")])
    linked = {STREAM: "00000009", "jobs/b": "00000004", "jobs/c": "00000003", "jobs/new": "00000002"}
    gaps = journal.linked("s1", linked, created=True)
    assert gaps == [Gap(STREAM, "00000002", "00000009"), Gap("jobs/new", "-1", "00000002")]
    assert journal.gaps("s1") == gaps
    assert journal.gaps("s2") == []


def test_a_confirmed_subscription_leaves_no_gaps_and_takes_the_servers_offsets() -> None:
    journal = Journal(None, server_url=URL)
    journal.acked(claim(), [Ack(STREAM, "00000002")])
    assert journal.linked("s1", {STREAM: "00000009"}, created=False) == []
    assert journal.gaps("s1") == []
    assert journal.sole_stream("s1") == (STREAM, "00000009")
    journal.linked("s1", {STREAM: "00000001"}, created=False)
    assert journal.sole_stream("s1") == (STREAM, "00000001"), "the server's word, even backwards"


def test_a_subscription_never_seen_leaves_no_gaps_when_created() -> None:
    journal = Journal(None, server_url=URL)
    assert journal.linked("s1", {STREAM: "00000009"}, created=True) == []
    assert journal.sole_stream("s1") == (STREAM, "00000009")
    assert journal.linked("s1", {STREAM: "00000012"}, created=True) == [Gap(STREAM, "00000009", "00000012")]


def test_gaps_only_reported_are_not_kept() -> None:
    journal = Journal(None, server_url=URL)
    journal.acked(claim(), [Ack(STREAM, "00000002")])
    assert journal.linked("s1", {STREAM: "00000009"}, created=True, keep_gaps=False) == [
        Gap(STREAM, "00000002", "00000009")
    ]
    assert journal.gaps("s1") == []
    assert journal.sole_stream("s1") == (STREAM, "00000009")


def test_gaps_are_a_copy() -> None:
    journal = Journal(None, server_url=URL)
    journal.acked(claim(), [Ack(STREAM, "00000002")])
    journal.linked("s1", {STREAM: "00000009"}, created=True)
    journal.gaps("s1").clear()
    assert len(journal.gaps("s1")) == 1


def test_what_is_replayed_of_a_gap_is_taken_off_it_in_place(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "journal.json", server_url=URL)
    journal.acked(claim(), [Ack(STREAM, "00000002"), Ack("jobs/b", "00000001")])
    first, second = journal.linked("s1", {STREAM: "00000009", "jobs/b": "00000003"}, created=True)

    left = journal.replayed("s1", first, "00000005")
    assert left == Gap(STREAM, "00000005", "00000009")
    assert journal.gaps("s1") == [left, second], "the gap keeps its place"
    assert journal.replayed("s1", first, "00000006") is None, "a gap no longer there"
    assert journal.gaps("s1") == [left, second]

    assert journal.replayed("s1", left, "00000009") is None
    assert journal.gaps("s1") == [second]
    assert journal.replayed("s1", second, "00000004") is None, "past the end: all of it"
    assert journal.gaps("s1") == []
    assert journal.replayed("s1", second, "00000004") is None, "a subscription without gaps"
    assert on_disk(tmp_path / "journal.json")["gaps"] == {}


def test_a_restarted_runner_remembers_claims_offsets_and_gaps(tmp_path: Path) -> None:
    path = tmp_path / "journal.json"
    journal = Journal(path, server_url=URL)
    journal.claimed(claim())
    journal.acked(claim(), [Ack(STREAM, "00000002")])
    journal.linked("s2", {"jobs/b": "00000001"}, created=False)
    journal.linked("s2", {"jobs/b": "00000004"}, created=True)
    restarted = Journal(path, server_url=URL)
    assert restarted.held_claims() == journal.held_claims()
    assert restarted.sole_stream("s1") == (STREAM, "00000002")
    assert restarted.gaps("s2") == [Gap("jobs/b", "00000001", "00000004")]
    assert on_disk(path)["version"] == 1
    assert on_disk(path)["server_url"] == URL


@pytest.mark.parametrize(
    "change",
    [
        pytest.param(lambda document: {**document, "version": 2}, id="another-version"),
        pytest.param(lambda document: {k: v for k, v in document.items() if k != "version"}, id="no-version"),
        pytest.param(lambda document: {**document, "server_url": "http://elsewhere:1"}, id="another-server"),
        pytest.param(lambda document: {k: v for k, v in document.items() if k != "gaps"}, id="no-gaps"),
        pytest.param(lambda document: {**document, "claims": {"s1": {"token": "t"}}}, id="a-broken-claim"),
        pytest.param(lambda document: {**document, "acked": []}, id="acked-not-a-map"),
        pytest.param(lambda document: [document], id="not-an-object"),
    ],
)
def test_a_journal_of_another_kind_or_server_is_not_used(tmp_path: Path, change: Callable[[Any], Any]) -> None:
    path = tmp_path / "journal.json"
    journal = Journal(path, server_url=URL)
    journal.claimed(claim())
    journal.linked("s2", {"jobs/b": "00000001"}, created=False)
    journal.linked("s2", {"jobs/b": "00000004"}, created=True)
    path.write_text(json.dumps(change(on_disk(path))))
    restarted = Journal(path, server_url=URL)
    assert restarted.held_claims() == []
    assert restarted.sole_stream("s1") is None
    assert restarted.gaps("s2") == []


@pytest.mark.parametrize("text", ["{not json", ""])
def test_an_unreadable_journal_is_not_used(tmp_path: Path, text: str) -> None:
    path = tmp_path / "journal.json"
    path.write_text(text)
    journal = Journal(path, server_url=URL)
    assert journal.held_claims() == []
    journal.claimed(claim())
    assert Journal(path, server_url=URL).holds("s1"), "and is replaced by the next write"


async def test_without_a_file_nothing_is_written(
    writes: list[dict[str, Any]], autojump_clock: trio.testing.MockClock
) -> None:
    journal = Journal(None, server_url=URL)
    with trio.fail_after(1):
        await journal.keep(interval=INTERVAL)  # returns at once: nothing to keep
    journal.claimed(claim())
    journal.ended("s1", "w1")
    assert writes == []


@pytest.mark.parametrize(
    "change",
    [
        pytest.param(lambda journal: journal.claimed(claim("w2")), id="a-claim"),
        pytest.param(lambda journal: journal.linked("s1", {"jobs/c": "00000009"}, created=True), id="a-gap"),
        pytest.param(lambda journal: journal.replayed("s1", journal.gaps("s1")[0], "00000002"), id="a-replayed-gap"),
    ],
)
async def test_what_a_restart_depends_on_is_written_at_once_even_right_after_a_write(
    tmp_path: Path,
    writes: list[dict[str, Any]],
    autojump_clock: trio.testing.MockClock,
    change: Callable[[Journal], object],
) -> None:
    journal = Journal(tmp_path / "journal.json", server_url=URL)
    journal.acked(claim(), [Ack(STREAM, "00000001")])
    journal.linked("s1", {"jobs/b": "00000003"}, created=True)  # a gap of jobs/b
    async with trio.open_nursery() as nursery:
        nursery.start_soon(lambda: journal.keep(interval=INTERVAL))
        await settle()
        journal.acked(claim(), [Ack(STREAM, "00000002")])
        await settle()
        before = len(writes)
        assert writes[-1]["acked"]["s1"][STREAM] == "00000002", "the first change after a quiet spell: at once"
        journal.acked(claim(), [Ack(STREAM, "00000003")])
        change(journal)
        await settle()
        assert len(writes) == before + 1, "urgent: not held back by the interval"
        assert writes[-1]["acked"]["s1"][STREAM] == "00000003"
        nursery.cancel_scope.cancel()


async def test_a_keeper_with_nothing_to_write_writes_nothing(
    tmp_path: Path, writes: list[dict[str, Any]], autojump_clock: trio.testing.MockClock
) -> None:
    journal = Journal(tmp_path / "journal.json", server_url=URL)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(lambda: journal.keep(interval=INTERVAL))
        await trio.sleep(INTERVAL)
        nursery.cancel_scope.cancel()
    assert writes == [], "a journal never changed is not written"
    journal.claimed(claim())  # written through: no keeper now
    assert len(writes) == 1
    async with trio.open_nursery() as nursery:
        nursery.start_soon(lambda: journal.keep(interval=INTERVAL))
        await trio.sleep(5 * INTERVAL)
        nursery.cancel_scope.cancel()
    assert len(writes) == 1
    journal.ended("s1", "w1")  # after the keeper: written through again
    assert len(writes) == 2
    assert Journal(tmp_path / "journal.json", server_url=URL).held_claims() == []
