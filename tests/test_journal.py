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
from runner._state.journal import Journal
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
