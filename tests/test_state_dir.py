"""The state dir as an operator finds it: shared by two runners, corrupt, too large, or stale.

Real `pullwake run` processes against the reference server; the loaders also get a
property test: no input from disk can make a start fail.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from runner import Runner
from runner._state.checkpoint import Checkpoint
from runner._state.journal import Journal
from runner._state.loading import MAX_STATE_FILE_BYTES
from runner.errors import StateDirInUse
from tests.support import Recorder, World, captured_logs, eventually, running
from tests.test_end_to_end import ROOT, lines, start_runner_process, write_config
from tests.test_signals import logged
from tests.test_startup_errors import one_line_config_error

SERVER = "http://127.0.0.1:1"
ROOT_PATH = "/v1/stream"


async def run_second(config: Path) -> subprocess.CompletedProcess[str]:
    with trio.fail_after(60):  # a runner that was not refused would run on: fail, do not hang
        second = await trio.run_process(
            [sys.executable, "-m", "runner", "run", "--config", str(config), "--log-format", "json"],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
    return subprocess.CompletedProcess(second.args, second.returncode, second.stdout.decode(), second.stderr.decode())


# -- 1. one owner per state dir ------------------------------------------------------------------


async def test_a_second_runner_on_the_same_state_dir_exits_78_naming_the_holder(
    world: World, record_file: Path, tmp_path: Path
) -> None:
    await world.create("a")
    state_dir = tmp_path / "state"
    config = write_config(tmp_path / "runner.toml", world, state_dir)
    log = tmp_path / "runner.log"
    first = start_runner_process(config, log)
    try:
        await eventually(lambda: '"target": "streaming"' in log.read_text(), what="the first runner to stream")
        second = await run_second(config)
        one_line_config_error(second, str(state_dir), f"pid {first.pid}")
        assert "runner.starting" not in second.stdout, "the refused runner read nothing and started no work"
        await world.append("a", {"n": 1})
        await eventually(lambda: len(lines(record_file)) == 1, what="the first runner to keep working")
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=30)
    # The kernel released the lock with the killed process: a restart is not blocked by the lock file.
    restarted = start_runner_process(config, log)
    try:
        await eventually(
            lambda: log.read_text().count('"target": "streaming"') == 2, what="the restarted runner to stream"
        )
        assert (state_dir / "lock").read_text().strip() == str(restarted.pid)
    finally:
        restarted.send_signal(signal.SIGTERM)
        assert restarted.wait(timeout=30) == 0


async def test_the_library_refuses_a_state_dir_another_runner_holds(world: World, tmp_path: Path) -> None:
    await world.create("a")
    settings = world.settings(state_dir=tmp_path / "state")
    first = Runner(settings, handlers={world.sub: Recorder()})
    async with running(first):
        second = Runner(settings, handlers={world.sub: Recorder()})
        with pytest.raises(StateDirInUse, match=f"pid {os.getpid()}"):
            await second.run()
        assert first.health().status == "ok", "the holder is not disturbed"
    # Released at the end of the run: the same directory can be had again.
    async with running(Runner(settings, handlers={world.sub: Recorder()})):
        pass


# -- 2. nothing on disk stops a start ------------------------------------------------------------


def journal_document(**fields: Any) -> dict[str, Any]:
    return {
        "version": 1,
        "server_url": SERVER,
        "stream_root": ROOT_PATH,
        "claims": {},
        "acked": {},
        "gaps": {},
    } | fields


async def test_a_journal_of_the_wrong_shape_is_set_aside_and_the_runner_starts_clean(
    world: World, record_file: Path, tmp_path: Path
) -> None:
    await world.create("a")
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    journal = state_dir / "journal.json"
    wrong = journal_document(server_url=world.url, acked={world.sub: "0000000000000000_0000000000000003"})
    journal.write_text(json.dumps(wrong))
    config = write_config(tmp_path / "runner.toml", world, state_dir)
    log = tmp_path / "runner.log"
    process = start_runner_process(config, log)
    try:
        await eventually(lambda: '"target": "streaming"' in log.read_text(), what="the runner to stream")
        await world.append("a", {"n": 1})
        await eventually(lambda: len(lines(record_file)) == 1, what="the runner to work")
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
    [warning] = logged(log, "state.unusable")
    assert "acked" in str(warning["reason"])
    assert "str where dict belongs" in str(warning["reason"])
    assert "gaps" in str(warning["lost"])
    [aside] = state_dir.glob("journal.json.unusable-*")
    assert json.loads(aside.read_text()) == wrong, "kept for a post-mortem"
    assert str(aside) == warning["moved_to"]


def test_a_journal_larger_than_the_bound_is_not_read_whole(tmp_path: Path) -> None:
    path = tmp_path / "journal.json"
    with path.open("wb") as file:
        file.truncate(MAX_STATE_FILE_BYTES + 1)  # sparse: cheap to make, costly to read whole
    with captured_logs() as logs:
        journal = Journal(path, server_url=SERVER, stream_root=ROOT_PATH)
    assert journal.held_claims() == []
    assert [entry["reason"] for entry in logs if entry["event"] == "state.unusable"] == ["larger than 64 MiB"]
    assert not path.exists()


def test_state_written_for_another_stream_root_is_not_applied(tmp_path: Path) -> None:
    path = tmp_path / "journal.json"
    mine = journal_document(acked={"s1": {"jobs/a": "0000000000000000_0000000000000003"}})
    path.write_text(json.dumps(mine))
    assert Journal(path, server_url=SERVER, stream_root=ROOT_PATH).sole_stream("s1") is not None
    with captured_logs() as logs:
        elsewhere = Journal(path, server_url=SERVER, stream_root="/other/root")
    assert elsewhere.sole_stream("s1") is None
    assert "another stream_root" in next(e["reason"] for e in logs if e["event"] == "state.unusable")

    checkpoint = Checkpoint(tmp_path, server_url=SERVER, stream_root=ROOT_PATH, wake_stream="wake")
    checkpoint.save("0000000000000000_0000000000000007")
    assert checkpoint.load() == "0000000000000000_0000000000000007"
    assert Checkpoint(tmp_path, server_url=SERVER, stream_root="/other/root", wake_stream="wake").load() is None
    assert list(tmp_path.glob("wake-checkpoint.json.unusable-*")), "set aside"


# Arbitrary JSON, and documents that look like the runner's own with arbitrary values in them.
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20,
)
near_misses = st.fixed_dictionaries(
    {
        "version": st.sampled_from([1, 1.0, True, "1", 2]),
        "server_url": st.sampled_from([SERVER, "http://elsewhere"]),
        "stream_root": st.sampled_from([ROOT_PATH, None]),
        "wake_stream": st.sampled_from(["wake", 3]),
        "offset": json_values,
        "claims": st.dictionaries(st.text(max_size=3), json_values, max_size=2) | json_values,
        "acked": st.dictionaries(st.text(max_size=3), json_values, max_size=2) | json_values,
        "gaps": st.dictionaries(st.text(max_size=3), st.lists(json_values, max_size=2), max_size=2) | json_values,
    }
)


def load_both(directory: Path, content: bytes, log: bytes | None = None) -> None:
    (directory / "journal.json").write_bytes(content)
    (directory / "wake-checkpoint.json").write_bytes(content)
    if log is not None:
        (directory / "journal.0.log").write_bytes(log)
    journal = Journal(directory / "journal.json", server_url=SERVER, stream_root=ROOT_PATH)
    # What was loaded must also be usable: written back and read again without a loss.
    state = journal.held_claims(), journal.gaps("s1"), journal.sole_stream("s1")
    journal.flush()
    again = Journal(directory / "journal.json", server_url=SERVER, stream_root=ROOT_PATH)
    assert (again.held_claims(), again.gaps("s1"), again.sole_stream("s1")) == state
    Checkpoint(directory, server_url=SERVER, stream_root=ROOT_PATH, wake_stream="wake").load()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(json_values, near_misses).map(lambda value: json.dumps(value).encode()) | st.binary(max_size=64))
def test_no_file_content_makes_the_loaders_raise(content: bytes) -> None:
    with tempfile.TemporaryDirectory() as directory:
        load_both(Path(directory), content)


# The journal's log: a header (right or nearly), then records that look like the runner's own with
# arbitrary values, arbitrary JSON or bytes, and a last line that may be torn anywhere.
texts = st.sampled_from(["s1", "jobs/a", "-1", "00000003", ""]) | st.text(max_size=4)
records = st.fixed_dictionaries(
    {
        "op": st.sampled_from(["claimed", "acked", "ended", "learned", "linked", "replayed", "other"]),
        "sub": texts,
    },
    optional={
        "wake_id": texts | json_values,
        "generation": st.integers() | json_values,
        "token": texts | json_values,
        "at": st.floats() | st.integers() | json_values,
        "offsets": st.dictionaries(texts, texts | json_values, max_size=3) | json_values,
        "gaps": st.lists(st.fixed_dictionaries({"stream": texts, "start": texts, "end": texts}) | json_values)
        | json_values,
        "gap": st.fixed_dictionaries({"stream": texts, "start": texts, "end": texts}) | json_values,
        "offset": texts | json_values,
    },
)
headers = st.fixed_dictionaries(
    {
        "version": st.sampled_from([2, 2.0, True, 1]),
        "server_url": st.sampled_from([SERVER, "http://elsewhere"]),
        "stream_root": st.sampled_from([ROOT_PATH, None]),
        "generation": st.sampled_from([0, 1, "0"]),
    }
)
log_lines = st.lists(records.map(json.dumps) | json_values.map(json.dumps), max_size=8)


@st.composite
def log_contents(draw: st.DrawFn) -> bytes:
    lines = [json.dumps(draw(headers)), *draw(log_lines)]
    data = "".join(line + "\n" for line in lines).encode()
    if draw(st.booleans()):
        data = data[: draw(st.integers(0, len(data)))]  # torn anywhere
    return data + draw(st.binary(max_size=16) | st.just(b""))


snapshots = st.sampled_from(
    [
        b"",
        json.dumps({**journal_document(), "version": 2, "generation": 0}).encode(),
        json.dumps(journal_document()).encode(),
    ]
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(snapshots, log_contents())
def test_no_log_content_makes_the_journal_loader_raise(snapshot: bytes, log: bytes) -> None:
    with tempfile.TemporaryDirectory() as directory:
        load_both(Path(directory), snapshot, log)
