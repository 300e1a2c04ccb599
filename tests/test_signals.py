"""Signals an operator sends a running daemon, with a real `pullwake run` process."""

from __future__ import annotations

import json
import signal
from pathlib import Path

from tests.support import World, eventually
from tests.test_end_to_end import lines, start_runner_process, write_config


def logged(log: Path, event: str) -> list[dict[str, object]]:
    found = []
    for line in log.read_text().splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if entry.get("event") == event:
            found.append(entry)
    return found


async def test_sighup_with_an_unchanged_configuration_changes_nothing_and_the_daemon_keeps_working(
    world: World, record_file: Path, tmp_path: Path
) -> None:
    await world.create("a")
    config = write_config(tmp_path / "runner.toml", world, tmp_path / "state")
    log = tmp_path / "runner.log"
    process = start_runner_process(config, log)
    try:
        await eventually(lambda: '"target": "streaming"' in log.read_text(), what="the runner to stream")
        process.send_signal(signal.SIGHUP)
        await eventually(lambda: bool(logged(log, "reload.applied")), what="the reload after SIGHUP")
        await world.append("a", {"n": 1})
        await eventually(lambda: len(lines(record_file)) == 1, what="the runner to handle an event after SIGHUP")
        assert process.poll() is None, "SIGHUP did not end the daemon"
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=30)
    [applied] = logged(log, "reload.applied")
    assert (applied["added"], applied["removed"], applied["changed"], applied["kept_settings"]) == ([], [], {}, [])
    assert [entry["signal"] for entry in logged(log, "signal.reload")] == ["SIGHUP"]
    assert [entry["signal"] for entry in logged(log, "signal.stop")] == ["SIGTERM"]
