"""When the journal reaches the disk, and what a start reads back (docs/design.md §6.4), in virtual time.

A claim taken is appended to the log and fsynced (file, and directory once per
log) at once, and the claim waits for that record only; acks and ended claims are
appended at most once per interval; full logs are compacted into a snapshot
beside the appends; whatever is left when the run ends becomes one snapshot.
Without a running `keep`, every change is written through. A start replays the
snapshot and the logs; a torn last line is ignored, a damaged log set aside.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.lowlevel
import trio.testing
from pydantic import SecretStr

import runner._state.journal
import runner._state.journal_records
from runner._state import journal_files
from runner._state.journal import Journal
from runner._state.journal_files import LogWriter, logs
from runner._state.journal_records import Gap
from runner._wire.protocol import Ack, Claim, ClaimedStream
from tests.support import captured_logs

INTERVAL = 1.0
STREAM = "jobs/a"
SERVER = "http://127.0.0.1:1"


def claim(wake_id: str = "w1", subscription: str = "s1") -> Claim:
    return Claim(subscription, wake_id, 1, (ClaimedStream(STREAM, "-1", "00000009", True),), 30_000, SecretStr("t"))


@dataclass
class Disk:
    """What reached the disk, in order: appends (records, fsynced?) and every fsync (of which path)."""

    appends: list[tuple[list[str], bool]] = field(default_factory=list)
    syncs: list[str] = field(default_factory=list)
    compaction_gate: trio.Event | None = None
    """While set to an unset event, compactions wait for it (as a slow disk would)."""

    def ops(self) -> list[list[str]]:
        return [ops for ops, _ in self.appends]


@pytest.fixture
def disk(monkeypatch: pytest.MonkeyPatch) -> Disk:
    """The worker threads' hops are made inline, so a write is done when the tasks are
    (virtual time cannot wait for a real thread); the files are real."""
    seen = Disk()
    append, fsync = LogWriter.append, os.fsync

    def recording_append(self: LogWriter, records: list[dict[str, Any]], *, sync: bool) -> Any:
        seen.appends.append(([record["op"] for record in records], sync))
        return append(self, records, sync=sync)

    def recording_fsync(descriptor: int) -> None:
        seen.syncs.append(os.readlink(f"/proc/self/fd/{descriptor}"))
        fsync(descriptor)

    async def inline(function: Callable[..., Any], *args: Any) -> Any:
        await trio.lowlevel.checkpoint()
        if getattr(function, "__name__", "") == "_compact" and seen.compaction_gate is not None:
            await seen.compaction_gate.wait()
        return function(*args)

    monkeypatch.setattr(LogWriter, "append", recording_append)
    monkeypatch.setattr(os, "fsync", recording_fsync)
    monkeypatch.setattr(trio.to_thread, "run_sync", inline)
    return seen


async def settle() -> None:
    """Let the keeper finish what is due now (no virtual time passes)."""
    await trio.testing.wait_all_tasks_blocked()


def journal_at(path: Path) -> Journal:
    return Journal(path / "journal.json", server_url=SERVER)


def log_records(directory: Path) -> list[dict[str, Any]]:
    """The records of every log in `directory` (headers left out), oldest first."""
    return [
        json.loads(line) for _, found in logs(directory / "journal.json") for line in found.read_text().splitlines()[1:]
    ]


def test_a_lease_renewal_that_acknowledged_nothing_tells_the_fleet_nothing() -> None:
    """A peer takes an `acked` entry as word of where the subscription was linked: an empty one
    would spare it the confirmation that tells it, and a put-back after a server restart would
    find no gap."""
    journal = Journal(None, server_url=SERVER)
    journal.acked(claim(), [])
    assert journal.take_fresh() == {}
    peer = Journal(None, server_url=SERVER)
    peer.learn("s1", {})
    assert "s1" not in peer.vouched
    assert not peer.knows("s1")


def test_a_runner_tells_a_joining_peer_where_a_subscription_was_linked_only_once_no_gap_of_its_own_is_pending() -> None:
    """A peer that learnt the offset past a gap would put the subscription back, after a server
    restart, without those events: only the runner that found the gap holds them until replayed."""
    journal = Journal(None, server_url=SERVER)
    journal.linked("s1", {"jobs/a": "0001"}, created=False)
    journal.linked("s2", {"jobs/b": "0001"}, created=False)
    [gap] = journal.linked("s2", {"jobs/b": "0009"}, created=True)  # forgotten, re-created past events
    journal.linked("s3", {"jobs/c": "0001", "jobs/d": "0001"}, created=False)
    assert journal.vouchable(["s1", "s2", "s4"], streams=10) == {"s1": {"jobs/a": "0001"}}
    assert journal.vouchable(["s1", "s3"], streams=2) == {"s1": {"jobs/a": "0001"}}, "two streams in all"
    journal.replayed("s2", gap, "0009")
    assert journal.vouchable(["s2"], streams=10) == {"s2": {"jobs/b": "0009"}}


async def test_a_claim_waits_for_its_own_record_fsynced_with_its_directory_and_acks_wait_for_the_interval(
    tmp_path: Path, disk: Disk, autojump_clock: trio.testing.MockClock
) -> None:
    journal = journal_at(tmp_path)
    async with trio.open_nursery() as nursery:
        await nursery.start(lambda task_status: journal.keep(interval=INTERVAL, task_status=task_status))
        await settle()
        disk.syncs.clear()  # the first snapshot (of what was loaded: nothing)
        written = journal.claimed(claim())
        assert disk.appends == [], "the event loop only made the record"
        assert await written.wait() is True
        assert disk.appends == [(["claimed"], True)]
        [log] = logs(tmp_path / "journal.json")
        assert disk.syncs == [str(log[1]), str(tmp_path)], "the file, then its directory (a new log)"
        assert [record["op"] for record in log_records(tmp_path)] == ["claimed"], "on disk before the wait ended"

        for n in range(1, 6):
            journal.acked(claim(), [Ack(STREAM, f"0000000{n}")])
            await trio.sleep(0.1)
        await settle()
        assert len(disk.appends) == 1, "acks wait for the interval"
        await trio.sleep(INTERVAL)
        await settle()
        assert disk.appends[1] == (["acked"] * 5, False), "one append carries every ack since; no fsync"

        disk.syncs.clear()
        assert await journal.claimed(claim("w2", "s2")).wait() is True
        assert disk.syncs == [str(log[1])], "the directory is synced once per log"
        journal.ended("s1", "w1")
        nursery.cancel_scope.cancel()
    # The end of the run: everything as one snapshot, the logs it holds removed.
    assert logs(tmp_path / "journal.json") == []
    snapshot = json.loads((tmp_path / "journal.json").read_text())
    assert snapshot["claims"].keys() == {"s2"}
    assert snapshot["acked"]["s1"] == {STREAM: "00000005"}
    restarted = journal_at(tmp_path)
    assert [held.wake_id for held in restarted.held_claims()] == ["w2"]


async def test_a_claim_does_not_wait_for_a_compaction_or_for_records_made_after_it(
    tmp_path: Path, disk: Disk, autojump_clock: trio.testing.MockClock
) -> None:
    journal = journal_at(tmp_path)
    async with trio.open_nursery() as nursery:
        await nursery.start(lambda task_status: journal.keep(interval=INTERVAL, task_status=task_status))
        await settle()
        disk.compaction_gate = trio.Event()
        assert journal._writer is not None
        journal._writer.bound = 0  # the next append seals the log: a compaction starts, and hangs
        assert await journal.claimed(claim("w1", "s1")).wait()
        assert await journal.claimed(claim("w2", "s2")).wait(), "not held up by the compaction"
        assert len(logs(tmp_path / "journal.json")) == 2, "the sealed log stays until its snapshot is written"

        first = journal.claimed(claim("w3", "s3"))
        journal.acked(claim("w3", "s3"), [Ack(STREAM, "00000001")])
        with trio.fail_after(0.001):  # virtual time: nothing but its own append is awaited
            assert await first.wait()
        disk.compaction_gate.set()
        await settle()
        assert len(logs(tmp_path / "journal.json")) == 1, "compacted while the run goes on"
        nursery.cancel_scope.cancel()
    assert {held.subscription for held in journal_at(tmp_path).held_claims()} == {"s1", "s2", "s3"}


async def test_gaps_found_and_replayed_are_fsynced_at_once(
    tmp_path: Path, disk: Disk, autojump_clock: trio.testing.MockClock
) -> None:
    journal = journal_at(tmp_path)
    journal.linked("s1", {STREAM: "00000002"}, created=False)
    async with trio.open_nursery() as nursery:
        await nursery.start(lambda task_status: journal.keep(interval=INTERVAL, task_status=task_status))
        await settle()
        before = len(disk.appends)
        [gap] = journal.linked("s1", {STREAM: "00000009"}, created=True)  # the server forgot it: a gap
        await settle()
        assert disk.appends[before:] == [(["linked"], True)]
        assert log_records(tmp_path)[-1]["gaps"] == [{"stream": STREAM, "start": "00000002", "end": "00000009"}]
        journal.replayed("s1", gap, "00000005")
        await settle()
        assert disk.appends[-1] == (["replayed"], True)
        nursery.cancel_scope.cancel()
    assert [(g.start, g.end) for g in journal_at(tmp_path).gaps("s1")] == [("00000005", "00000009")]


async def test_an_ack_that_refreshed_the_claims_token_is_fsynced_at_once(
    tmp_path: Path, disk: Disk, autojump_clock: trio.testing.MockClock
) -> None:
    """A restart hands the claim back with the newest token: that ack does not wait for the interval."""
    journal = journal_at(tmp_path)
    async with trio.open_nursery() as nursery:
        await nursery.start(lambda task_status: journal.keep(interval=INTERVAL, task_status=task_status))
        await journal.claimed(claim()).wait()
        journal.acked(claim(), [Ack(STREAM, "00000001")])  # same token: waits for the interval
        journal.acked(claim("w-other"), [Ack(STREAM, "00000002")])  # not the claim held: no hurry
        await settle()
        assert disk.appends[-1] == (["claimed"], True)
        refreshed = replace(claim(), token=SecretStr("t2"))
        journal.acked(refreshed, [Ack(STREAM, "00000003")])
        await settle()
        assert disk.appends[-1] == (["acked"] * 3, True)
        nursery.cancel_scope.cancel()
    assert [held.token for held in journal_at(tmp_path).held_claims()] == ["t2"]


async def test_without_a_keeper_every_change_is_written_through(tmp_path: Path, disk: Disk) -> None:
    journal = journal_at(tmp_path)
    written = journal.claimed(claim())
    with trio.fail_after(1):
        assert await written.wait() is True, "on disk already"
    journal.acked(claim(), [Ack(STREAM, "00000003")])
    journal.ended("s1", "w1")
    assert disk.ops() == [["claimed"], ["acked"], ["ended"]]
    assert [sync for _, sync in disk.appends] == [True, False, False]
    assert written.ok
    restarted = journal_at(tmp_path)
    assert restarted.held_claims() == []
    assert restarted.sole_stream("s1") == (STREAM, "00000003")


def test_the_journal_is_private_to_its_owner_and_its_directory_is_made_on_the_first_write(tmp_path: Path) -> None:
    """The log holds claim tokens: owner-only (0600), like the snapshot."""
    writes: list[bool] = []
    journal = Journal(tmp_path / "state" / "of" / "journal.json", server_url=SERVER, on_write=writes.append)
    journal.claimed(claim())
    journal.acked(claim(), [Ack(STREAM, "00000001")])
    [(_, log)] = logs(tmp_path / "state" / "of" / "journal.json")
    assert log.stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "state" / "of" / "journal.json").stat().st_mode & 0o777 == 0o600
    assert writes
    assert all(writes), "every write said so"


def test_a_failed_fsync_is_reported_and_its_records_reach_the_next_snapshot(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    writes: list[bool] = []
    journal = Journal(tmp_path / "journal.json", server_url=SERVER, on_write=writes.append)
    journal.claimed(claim("w1", "s1"))
    fsync = os.fsync

    def failing(descriptor: int) -> None:
        if os.readlink(f"/proc/self/fd/{descriptor}").endswith(".log"):
            raise OSError(5, "Input/output error")
        fsync(descriptor)

    monkeypatch.setattr(os, "fsync", failing)
    with captured_logs() as entries:
        written = journal.claimed(claim("w2", "s2"))
    assert written.ok is False
    assert writes[-2:] == [False, True], "the append failed; the snapshot written after it did not"
    assert "journal.sync_failed" in [e["event"] for e in entries]
    snapshot = json.loads((tmp_path / "journal.json").read_text())
    assert set(snapshot["claims"]) == {"s1", "s2"}, "the sealed log's records are in the snapshot"
    monkeypatch.setattr(os, "fsync", fsync)
    assert {held.subscription for held in journal_at(tmp_path).held_claims()} == {"s1", "s2"}


def test_a_torn_last_line_is_ignored_and_what_came_before_is_kept(tmp_path: Path) -> None:
    journal = journal_at(tmp_path)
    journal.claimed(claim("w1", "s1"))
    journal.claimed(claim("w2", "s2"))
    [(_, log)] = logs(tmp_path / "journal.json")
    data = log.read_bytes()
    log.write_bytes(data[: data.rindex(b"\n", 0, len(data) - 1) + 1 + 30])  # the second record, cut short
    with captured_logs() as entries:
        restarted = journal_at(tmp_path)
    assert [held.subscription for held in restarted.held_claims()] == ["s1"]
    assert [e["event"] for e in entries if e["log_level"] == "warning"] == [], "a torn tail is no damage"
    restarted.flush()
    assert [held.subscription for held in journal_at(tmp_path).held_claims()] == ["s1"]


def test_a_damaged_log_keeps_what_precedes_the_damage_and_is_set_aside(tmp_path: Path) -> None:
    journal = journal_at(tmp_path)
    journal.claimed(claim("w1", "s1"))
    journal.claimed(claim("w2", "s2"))
    journal.claimed(claim("w3", "s3"))
    [(_, log)] = logs(tmp_path / "journal.json")
    lines = log.read_bytes().split(b"\n")
    lines[2] = b'{"op": "claimed", "sub": 7}'  # the second record: valid JSON, wrong type
    log.write_bytes(b"\n".join(lines))
    with captured_logs() as entries:
        restarted = journal_at(tmp_path)
    assert [held.subscription for held in restarted.held_claims()] == ["s1"]
    [warning] = [e for e in entries if e["event"] == "state.unusable"]
    assert "claimed sub: int where str belongs" in warning["reason"]
    assert list(tmp_path.glob("journal.*.log.unusable-*")), "kept for a post-mortem"


def test_a_full_log_is_compacted_into_a_snapshot_and_a_crash_in_between_loses_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(runner._state.journal, "LOG_MIN_BYTES", 600)  # a few records a log
    journal = journal_at(tmp_path)
    assert journal._writer is not None
    journal._writer.bound = 600
    for n in range(20):
        journal.claimed(claim(f"w{n}", f"s{n}"))
        if n % 2:
            journal.ended(f"s{n}", f"w{n}")
    held = {h.subscription for h in journal.held_claims()}
    assert held == {f"s{n}" for n in range(0, 20, 2)}
    generations = [generation for generation, _ in logs(tmp_path / "journal.json")]
    assert len(generations) == 1, "each compaction removed the logs its snapshot holds"
    snapshot = json.loads((tmp_path / "journal.json").read_text())
    assert snapshot["generation"] == generations[0]
    assert snapshot["claims"], "the snapshot holds the records of the sealed logs"
    assert {h.subscription for h in journal_at(tmp_path).held_claims()} == held

    # A crash after a snapshot was written and before the logs it holds were removed.
    stale = journal_files.log_path(tmp_path / "journal.json", generations[0] - 1)
    stale.write_text(
        json.dumps({"version": 2, "server_url": SERVER, "stream_root": "/v1/stream", "generation": generations[0] - 1})
        + "\n"
        + json.dumps({"op": "linked", "sub": "s0", "offsets": {STREAM: "00000001"}, "gaps": []})
        + "\n"
    )
    reloaded = journal_at(tmp_path)
    assert {h.subscription for h in reloaded.held_claims()} == held
    assert reloaded.sole_stream("s0") == (STREAM, "-1"), "a log the snapshot holds is not replayed again"


def test_a_journal_of_the_old_single_file_format_is_read(tmp_path: Path) -> None:
    old = {
        "version": 1,
        "server_url": SERVER,
        "stream_root": "/v1/stream",
        "claims": {"s1": {"subscription": "s1", "wake_id": "w1", "generation": 2, "token": "t", "renewed_at": 1.0}},
        "acked": {"s1": {STREAM: "00000004"}},
        "gaps": {},
    }
    (tmp_path / "journal.json").write_text(json.dumps(old))
    journal = journal_at(tmp_path)
    assert [(h.subscription, h.generation) for h in journal.held_claims()] == [("s1", 2)]
    journal.ended("s1", "w1")
    assert journal_at(tmp_path).held_claims() == []


# -- what a start reads back ------------------------------------------------------------------------

HEADER: dict[str, Any] = {"version": 2, "server_url": SERVER, "stream_root": "/v1/stream"}


def claim_of(wake_id: str, subscription: str, token: str, acked_offset: str = "-1") -> Claim:
    return Claim(
        subscription, wake_id, 3, (ClaimedStream(STREAM, acked_offset, "00000009", True),), 30_000, SecretStr(token)
    )


def memory(journal: Journal, *subscriptions: str) -> list[Any]:
    """What a restart must find again: held claims (with their newest token), offsets and gaps."""
    return [
        sorted((h.subscription, h.wake_id, h.generation, h.token, h.renewed_at) for h in journal.held_claims()),
        [journal.sole_stream(sub) for sub in subscriptions],
        [journal.gaps(sub) for sub in subscriptions],
    ]


def test_every_kind_of_change_comes_back_after_a_restart_from_the_log_and_from_the_snapshot(tmp_path: Path) -> None:
    journal = journal_at(tmp_path)
    journal.claimed(claim_of("w1", "s1", "t1"))
    journal.acked(claim_of("w1", "s1", "t1-refreshed"), [Ack(STREAM, "00000004")])
    journal.claimed(claim_of("w2", "s2", "t2"))
    journal.ended("s2", "w2")
    journal.ended("s1", "w-other")  # not the claim held: it stays held
    journal.learn("s3", {STREAM: "00000007"})  # a peer acknowledged it
    journal.learn("s3", {STREAM: "00000006"})  # an older word changes nothing
    journal.claimed(claim_of("w4", "s3", "t4", acked_offset="00000005"))  # offsets never go back
    journal.linked("s4", {STREAM: "00000001"}, created=False)
    assert journal.linked("s4", {STREAM: "00000003"}, created=False) == [], "a confirm finds no gap"
    journal.linked("s4", {STREAM: "00000002"}, created=False)
    found = journal.linked("s4", {STREAM: "00000009", "jobs/b": "00000003"}, created=True)  # the server forgot it
    assert found == [Gap(STREAM, "00000002", "00000009"), Gap("jobs/b", "-1", "00000003")], (
        "a new stream from its start"
    )
    partly, whole = journal.gaps("s4")
    assert (partly, whole) == tuple(found)
    assert journal.replayed("s4", partly, "00000005") == Gap(STREAM, "00000005", "00000009")
    assert journal.replayed("s4", whole, "00000003") is None
    journal.linked("s5", {STREAM: "00000001"}, created=False)
    [only] = journal.linked("s5", {STREAM: "00000004"}, created=True)
    journal.replayed("s5", only, "00000004")  # its only gap: nothing left to replay
    assert journal.replayed("s6", only, "00000004") is None, "no such gap"
    journal.ended("s6", "w6")  # held by nobody: nothing to end
    journal.linked("s6", {STREAM: "00000001"}, created=False)
    assert journal.linked("s6", {STREAM: "00000002"}, created=True, keep_gaps=False) == [
        Gap(STREAM, "00000001", "00000002")
    ]
    assert journal.gaps("s6") == [], "found, not kept"

    subscriptions = ("s1", "s2", "s3", "s4", "s5", "s6")
    expected = memory(journal, *subscriptions)
    assert expected[0][0][:4] == ("s1", "w1", 3, "t1-refreshed")
    assert expected[0][1][:4] == ("s3", "w4", 3, "t4")
    assert expected[1] == [
        (STREAM, "00000004"),
        (STREAM, "-1"),
        (STREAM, "00000007"),
        None,
        (STREAM, "00000004"),
        (STREAM, "00000002"),
    ]
    assert expected[2] == [[], [], [], [Gap(STREAM, "00000005", "00000009")], [], []]
    assert logs(tmp_path / "journal.json"), "the records are in the log, not yet in a snapshot"
    with captured_logs() as entries:
        from_the_log = journal_at(tmp_path)
    assert memory(from_the_log, *subscriptions) == expected
    assert [e for e in entries if e["log_level"] == "warning"] == []
    from_the_log.flush()
    assert logs(tmp_path / "journal.json") == [], "one snapshot now"
    assert memory(journal_at(tmp_path), *subscriptions) == expected


def test_records_for_claims_a_lost_snapshot_held_are_replayed_without_them(tmp_path: Path) -> None:
    journal = journal_at(tmp_path)
    journal.claimed(claim_of("w1", "s1", "t1"))
    journal.claimed(claim_of("w2", "s2", "t2"))
    journal.flush()  # both claims in the snapshot only
    journal = journal_at(tmp_path)
    journal.acked(claim_of("w1", "s1", "t1"), [Ack(STREAM, "00000004")])
    journal.ended("s2", "w2")
    (tmp_path / "journal.json").write_text("{damaged")
    with captured_logs() as entries:
        restarted = journal_at(tmp_path)
    assert [e["event"] for e in entries if e["log_level"] == "warning"] == ["state.unusable"]
    assert restarted.held_claims() == [], "what only the snapshot knew is lost, and only that"
    assert restarted.sole_stream("s1") == (STREAM, "00000004")


def write_log(directory: Path, *records: Any) -> None:
    lines = [HEADER | {"generation": 1}, *records]
    (directory / "journal.1.log").write_text("".join(json.dumps(line) + "\n" for line in lines))


GOOD: dict[str, dict[str, Any]] = {
    "claimed": {"op": "claimed", "sub": "s", "wake_id": "w", "generation": 1, "token": "t", "at": 1, "offsets": {}},
    "acked": {"op": "acked", "sub": "s", "wake_id": "w", "token": "t", "at": 1.5, "offsets": {STREAM: "00000001"}},
    "ended": {"op": "ended", "sub": "s", "wake_id": "w"},
    "learned": {"op": "learned", "sub": "s", "offsets": {STREAM: "00000001"}},
    "linked": {"op": "linked", "sub": "s", "offsets": {}, "gaps": [{"stream": STREAM, "start": "1", "end": "2"}]},
    "replayed": {"op": "replayed", "sub": "s", "gap": {"stream": STREAM, "start": "1", "end": "2"}, "offset": "2"},
}


def damaged(op: str, **changes: Any) -> dict[str, Any]:
    return {key: value for key, value in (GOOD[op] | changes).items() if value is not ...}


@pytest.mark.parametrize(
    ("record", "reason"),
    [
        ([1], "line 3 is not a JSON object; the records after it are lost"),
        ({"sub": "s"}, "record op: NoneType where str belongs"),
        ({"op": "forgot", "sub": "s"}, "unknown record op 'forgot'"),
        (damaged("claimed", sub=None), "claimed sub: NoneType where str belongs"),
        (damaged("claimed", wake_id=...), "claimed wake_id: NoneType"),
        (damaged("acked", wake_id=2), "acked wake_id: int"),
        (damaged("ended", wake_id=...), "ended wake_id: NoneType"),
        (damaged("claimed", token=...), "claimed token: NoneType"),
        (damaged("acked", token=[]), "acked token: list"),
        (damaged("claimed", at="1"), "claimed at: str where int or float belongs"),
        (damaged("acked", at=True), "acked at: bool"),
        (damaged("claimed", generation="1"), "claimed generation: str where int belongs"),
        (damaged("claimed", offsets=[]), "claimed offsets: list where dict belongs"),
        (damaged("acked", offsets={STREAM: 1}), "offset in acked offsets: int"),
        (damaged("learned", offsets=...), "learned offsets: NoneType"),
        (damaged("linked", offsets="x"), "linked offsets: str"),
        (damaged("linked", gaps={}), "linked gaps: dict where list belongs"),
        (damaged("linked", gaps=[{"stream": STREAM, "start": "1"}]), "gap end of a linked gap: NoneType"),
        (damaged("replayed", gap=...), "a replayed gap: NoneType where dict belongs"),
        (damaged("replayed", offset=5), "replayed offset: int where str belongs"),
    ],
)
def test_a_damaged_record_of_any_kind_is_named_and_what_preceded_it_is_kept(
    tmp_path: Path, record: Any, reason: str
) -> None:
    before = GOOD["claimed"] | {"sub": "s0"}
    after = GOOD["claimed"] | {"sub": "s9"}
    write_log(tmp_path, before, record, after)
    with captured_logs() as entries:
        restarted = journal_at(tmp_path)
    assert [held.subscription for held in restarted.held_claims()] == ["s0"]
    [warning] = [e for e in entries if e["event"] == "state.unusable"]
    assert reason in warning["reason"]
    assert not (tmp_path / "journal.1.log").exists(), "set aside"


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"version": 3}, "unknown version '3'"),
        ({"generation": "1"}, "generation: str where int belongs"),
        ({"claims": []}, "claims: list where dict belongs"),
        ({"claims": {"s": 1}}, "claims.s: int where dict belongs"),
        ({"claims": {"s": {"wake_id": "w"}}}, "claim subscription: NoneType"),
        ({"claims": {"s": {"subscription": "s"}}}, "claim wake_id: NoneType"),
        ({"claims": {"s": {"subscription": "s", "wake_id": "w"}}}, "claim generation: NoneType"),
        ({"claims": {"s": {"subscription": "s", "wake_id": "w", "generation": 1}}}, "claim token: NoneType"),
        (
            {"claims": {"s": {"subscription": "s", "wake_id": "w", "generation": 1, "token": "t"}}},
            "claim renewed_at: NoneType",
        ),
        ({"acked": None}, "acked: NoneType where dict belongs"),
        ({"acked": {"s": {STREAM: 4}}}, "offset in acked.s: int"),
        ({"gaps": 1}, "gaps: int where dict belongs"),
        ({"gaps": {"s": {}}}, "gaps.s: dict where list belongs"),
        ({"gaps": {"s": [{"stream": STREAM, "start": "1", "end": 2}]}}, "gap end of a gap of s: int"),
    ],
)
def test_a_damaged_snapshot_is_named_and_set_aside(tmp_path: Path, changes: dict[str, Any], reason: str) -> None:
    snapshot = HEADER | {"generation": 1, "claims": {}, "acked": {}, "gaps": {}} | changes
    (tmp_path / "journal.json").write_text(json.dumps(snapshot))
    with captured_logs() as entries:
        journal_at(tmp_path)
    [warning] = [e for e in entries if e["event"] == "state.unusable"]
    assert reason in warning["reason"]


def test_a_log_of_another_generation_than_its_name_is_set_aside(tmp_path: Path) -> None:
    (tmp_path / "journal.2.log").write_text(json.dumps(HEADER | {"generation": 1}) + "\n")
    (tmp_path / "journal.3.log").write_text(json.dumps(HEADER | {"generation": "3"}) + "\n")
    (tmp_path / "journal.4.log").write_text("{\n")
    (tmp_path / "journal.5.log").write_text(json.dumps(HEADER | {"version": 1, "generation": 5}) + "\n")
    with captured_logs() as entries:
        journal_at(tmp_path)
    reasons = [e["reason"] for e in entries if e["event"] == "state.unusable"]
    assert reasons == [
        "a header of generation '1' in the log of 2",
        "a header of generation '3' in the log of 3",
        "the header is damaged (JSONDecodeError); the records after it are lost",
        "unknown version '1'",
    ]


async def test_a_first_change_that_is_no_hurry_is_written_at_once_later_ones_wait_for_the_interval(
    tmp_path: Path, disk: Disk, autojump_clock: trio.testing.MockClock
) -> None:
    journal = journal_at(tmp_path)
    async with trio.open_nursery() as nursery:
        await nursery.start(lambda task_status: journal.keep(interval=INTERVAL, task_status=task_status))
        await settle()
        journal.learn("s1", {STREAM: "00000001"})
        await settle()
        assert disk.ops() == [["learned"]], "nothing was written for an interval: no reason to wait"
        journal.learn("s1", {STREAM: "00000002"})
        await settle()
        assert len(disk.appends) == 1
        await trio.sleep(INTERVAL)
        await settle()
        assert disk.ops() == [["learned"], ["learned"]]
        nursery.cancel_scope.cancel()


def test_the_streams_acknowledged_longest_ago_are_forgotten_first(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(runner._state.journal_records, "MAX_STREAMS", 3)
    journal = journal_at(tmp_path)
    journal.learn("s1", {"jobs/a": "00000001", "jobs/b": "00000001", "jobs/c": "00000001"})
    journal.learn("s1", {"jobs/a": "00000002"})  # acknowledged again: the newest now
    journal.learn("s1", {"jobs/d": "00000001"})
    restarted = journal_at(tmp_path)  # read back before the checks below change the journal
    for each in (journal, restarted):
        gaps = each.linked("s1", dict.fromkeys(["jobs/a", "jobs/b", "jobs/c", "jobs/d"], "00000009"), created=True)
        assert [(gap.stream, gap.start) for gap in gaps] == [
            ("jobs/a", "00000002"),
            ("jobs/b", "-1"),
            ("jobs/c", "00000001"),
            ("jobs/d", "00000001"),
        ], "jobs/b is forgotten: replayed from its start"
