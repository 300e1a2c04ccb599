"""Reloading a real `pullwake run` process (SIGHUP, `pullwake reload`), and `pullwake subscriptions`."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
from pathlib import Path

import trio

from tests.support import World, eventually
from tests.test_end_to_end import ROOT, lines, start_runner_process
from tests.test_signals import logged


def write_config(path: Path, world: World, names: list[str], **extra: object) -> Path:
    """A daemon's configuration serving subscription <sub>-<name> (streams jobs-<uid>/<name>/*) per name."""
    body = [
        f'server_url = "{world.url}"',
        f'runner_id = "reloaded-{world.uid}"',
        f'wake_stream = "{world.wake}"',
        "heartbeat_interval = 0.5",
        "heartbeat_timeout = 0.5",
        *(f"{key} = {json.dumps(value)}" for key, value in extra.items()),
    ]
    for name in names:
        body += [
            "[[subscriptions]]",
            f'id = "{world.sub}-{name}"',
            f'pattern = "jobs-{world.uid}/{name}/*"',
            "lease_ttl_ms = 2000",
            'handler = "tests.file_handlers:record"',
        ]
    path.write_text("\n".join(body) + "\n")
    return path


def spoil(config: Path, text: str, *, keep: bool) -> None:
    """Write `text` into the configuration file, after what it holds if `keep`."""
    config.write_text((config.read_text() if keep else "") + text)


def pullwake(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "runner", *args], capture_output=True, text=True, timeout=60, cwd=ROOT, check=False
    )


def handled(record_file: Path) -> list[int]:
    return [json.loads(line)["message"]["n"] for line in lines(record_file)]


async def test_sighup_and_pullwake_reload_change_the_subscriptions_of_a_running_daemon(
    world: World, record_file: Path, tmp_path: Path
) -> None:
    await world.create("a/1", "b/1", "c/1")
    control = tmp_path / "control.sock"
    config = write_config(tmp_path / "runner.toml", world, ["a"], control_socket=str(control))
    log = tmp_path / "runner.log"
    notify = trio.socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    await notify.bind(str(tmp_path / "notify.sock"))
    heard: list[str] = []

    async def listen() -> None:
        while True:
            heard.append((await notify.recv(4096)).decode())

    async with trio.open_nursery() as listening:
        listening.start_soon(listen)
        process = start_runner_process(config, log, NOTIFY_SOCKET=str(tmp_path / "notify.sock"))
        try:
            await daemon_reloaded(world, record_file, config, control, log, process, heard)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait(timeout=30)
            listening.cancel_scope.cancel()
    notify.close()
    assert len(logged(log, "reload.applied")) == 2


async def daemon_reloaded(
    world: World,
    record_file: Path,
    config: Path,
    control: Path,
    log: Path,
    process: subprocess.Popen[bytes],
    heard: list[str],
) -> None:
    """SIGHUP adds b; `pullwake reload` removes b (deleted) and adds c; two broken configurations change nothing."""
    await eventually(lambda: any("READY=1" in message for message in heard), what="READY=1")

    write_config(config, world, ["a", "b"], control_socket=str(control))
    process.send_signal(signal.SIGHUP)
    await eventually(lambda: bool(logged(log, "reload.applied")), what="the reload after SIGHUP")
    assert logged(log, "reload.applied")[0]["added"] == [f"{world.sub}-b"]
    await eventually(lambda: sum("READY=1" in message for message in heard) == 2, what="READY=1 again")
    reloading = [index for index, message in enumerate(heard) if "RELOADING=1" in message]
    assert len(reloading) == 1
    assert "MONOTONIC_USEC=" in heard[reloading[0]]
    assert "READY=1" in heard[reloading[0] + 1], f"READY=1 follows the reload: {heard}"
    await world.append("b/1", {"n": 1})
    await eventually(lambda: handled(record_file) == [1], what="b's event, handled after SIGHUP")

    write_config(config, world, ["a", "c"], control_socket=str(control), delete_removed_subscriptions=True)
    done = await trio.to_thread.run_sync(pullwake, "reload", "--config", str(config))
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [f"added    {world.sub}-c", f"removed  {world.sub}-b"]
    await eventually(lambda: bool(logged(log, "subscription.deleted")), what="b deleted on the server")
    await world.append("c/1", {"n": 2})
    await world.append("b/1", {"n": 3})  # b is gone: nobody handles this one
    await world.append("a/1", {"n": 4})
    await eventually(lambda: sorted(handled(record_file)) == [1, 2, 4], what="c's and a's events")

    spoil(config, "[[subscriptions]]\nid = 'broken'\npattern = 'x/*'\nhandler = 'tests.nowhere:x'\n", keep=True)
    refused = await trio.to_thread.run_sync(pullwake, "reload", "--socket", str(control))
    assert refused.returncode == 1
    assert "nothing changed" in refused.stderr
    assert "tests.nowhere" in refused.stderr
    spoil(config, "this is = = not TOML\n", keep=False)
    process.send_signal(signal.SIGHUP)
    await eventually(lambda: len(logged(log, "reload.failed")) == 2, what="the failed reload after SIGHUP")
    assert "not valid TOML" in str(logged(log, "reload.failed")[1]["error"])
    await world.append("c/1", {"n": 5})
    await eventually(lambda: sorted(handled(record_file)) == [1, 2, 4, 5], what="c, still served")
    assert process.poll() is None
    process.send_signal(signal.SIGTERM)
    assert await trio.to_thread.run_sync(process.wait, 30) == 0


async def test_pullwake_subscriptions_lists_and_deletes_them_on_the_server(world: World, tmp_path: Path) -> None:
    config = write_config(tmp_path / "runner.toml", world, ["a", "b"])
    a, b = f"{world.sub}-a", f"{world.sub}-b"
    await world.client.create_stream(world.wake)
    await world.client.ensure_subscription(
        a, wake_stream=world.wake, pattern=f"jobs-{world.uid}/a/*", lease_ttl_ms=2000
    )
    await world.client.ensure_subscription(
        b, wake_stream=world.wake, pattern=f"jobs-{world.uid}/b/*", lease_ttl_ms=9000
    )
    await world.client.ensure_subscription("elsewhere-" + world.uid, wake_stream=world.wake, streams=["x"])

    listed = await trio.to_thread.run_sync(pullwake, "subscriptions", "list", "--config", str(config), "--json")
    assert listed.returncode == 0, listed.stderr
    found = {entry["id"]: entry for entry in json.loads(listed.stdout)}
    assert list(found) == [a, b]
    assert found[a]["differs"] == []
    assert found[a]["pattern"] == f"jobs-{world.uid}/a/*"
    assert found[b]["differs"] == ["lease_ttl_ms: server 9000, configured 2000"]

    table = await trio.to_thread.run_sync(
        pullwake, "subscriptions", "list", "elsewhere-" + world.uid, "--config", str(config)
    )
    assert table.returncode == 0, table.stderr
    assert [line.split()[0] for line in table.stdout.splitlines() if not line.startswith(" ")] == [
        a,
        b,
        "elsewhere-" + world.uid,
    ]
    assert "differs" in table.stdout
    assert "lease_ttl_ms: server 9000" in table.stdout

    deleted = await trio.to_thread.run_sync(pullwake, "subscriptions", "delete", b, "--config", str(config))
    assert deleted.returncode == 0, deleted.stderr
    assert deleted.stdout.strip() == f"deleted {b}"
    assert "creates it again" in deleted.stderr, "b is managed in the configuration: the operator is told"
    listed = await trio.to_thread.run_sync(pullwake, "subscriptions", "list", "--config", str(config), "--json")
    assert [(entry["id"], entry["on_server"]) for entry in json.loads(listed.stdout)] == [(a, True), (b, False)]
