"""Command handlers with real processes: the token stays out, output is bounded, nothing outlives the run."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import psutil
import pytest
import trio

from runner import Batch, CommandHandler, Runner
from runner._handlers.command import RUN_MARKER, CommandFailed
from runner.errors import ConfigError, PermanentFailure

from .support import World, eventually, running

COMMANDS = Path(__file__).parent / "edge_commands.py"


def command(*args: str, **options: float | bool) -> CommandHandler:
    return CommandHandler([sys.executable, str(COMMANDS), *args], **options)  # type: ignore[arg-type]


def batch() -> Batch:
    return Batch(
        subscription="jobs",
        stream="jobs/a",
        messages=[{"n": 1}],
        start_offset="-1",
        next_offset="0000000000000001",
        wake_id="w1",
        generation=1,
        attempt=1,
    )


def gone(pid: int) -> bool:
    """Exited: no such process, or a zombie its new parent has not reaped yet."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


async def pid_from(pidfile: Path) -> int:
    await eventually(pidfile.exists, what=f"{pidfile.name} to be written")
    return int(await trio.Path(pidfile).read_text())


# -- the token stays out of the command's environment ----------------------------------------


@pytest.mark.parametrize("passthrough", [False, True])
async def test_the_command_gets_the_token_variables_only_when_it_asks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, passthrough: bool
) -> None:
    monkeypatch.setenv("PULLWAKE_TOKEN", "service-secret")
    monkeypatch.setenv("PULLWAKE_TOKEN_FILE", "/etc/pullwake-runner/token")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", "/run/credentials/pullwake-runner.service")
    monkeypatch.setenv("SOMETHING_ELSE", "kept")
    dump = tmp_path / "env.json"

    await command("env", str(dump), env_passthrough=passthrough)(batch())

    env = json.loads(dump.read_text())
    assert env["SOMETHING_ELSE"] == "kept"
    assert RUN_MARKER in env
    withheld = {"PULLWAKE_TOKEN", "PULLWAKE_TOKEN_FILE", "CREDENTIALS_DIRECTORY"}
    if passthrough:
        assert withheld <= env.keys()
        assert env["PULLWAKE_TOKEN"] == "service-secret"
    else:
        assert not withheld & env.keys(), "the token's variables must not reach the command"


# -- output is read concurrently and capped ---------------------------------------------------


async def test_a_command_flooding_its_output_keeps_the_runner_small() -> None:
    me = psutil.Process()
    baseline = me.memory_info().rss
    peak = baseline
    flood = 50 * 1024 * 1024  # 50 MiB on stdout and 50 MiB on stderr

    async def sample_rss() -> None:
        nonlocal peak
        while True:
            peak = max(peak, me.memory_info().rss)
            await trio.sleep(0.01)  # real-time: a measurement, not a synchronization

    async with trio.open_nursery() as nursery:
        nursery.start_soon(sample_rss)
        with pytest.raises(PermanentFailure) as failure, trio.fail_after(60):
            await command("flood", str(flood), "3", output_cap=64 * 1024)(batch())
        nursery.cancel_scope.cancel()

    grown = (peak - baseline) / 2**20
    assert grown < 30, f"RSS grew {grown:.1f} MiB while the command wrote 100 MiB"
    message = str(failure.value)
    assert "exited with 3" in message
    assert message.endswith("the last words"), "the error quotes the end of stderr"
    assert len(message) < 1000, "the error text is built from the capped tail only"


async def test_a_tempfail_quotes_the_tail_of_stderr() -> None:
    with pytest.raises(CommandFailed, match="the last words") as failure:
        await command("flood", "100000", "75")(batch())
    assert failure.value.returncode == 75


# -- nothing the command started outlives it --------------------------------------------------


@pytest.mark.parametrize("mode", ["setsid-and-hang", "setsid-stubborn"])
async def test_aborting_a_command_ends_a_child_that_left_its_session(tmp_path: Path, mode: str) -> None:
    pidfile = tmp_path / "grandchild.pid"
    handler = command(mode, str(pidfile), kill_grace=0.5)
    with trio.fail_after(15):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(handler, batch())
            grandchild = await pid_from(pidfile)
            the_command = psutil.Process(grandchild).ppid()
            assert os.getsid(grandchild) == grandchild != os.getsid(the_command), "the grandchild left the session"
            # An abort cancels the claim's scope, and with it the handler call.
            nursery.cancel_scope.cancel()
    assert gone(grandchild), f"the setsid grandchild {grandchild} survived the abort"
    assert gone(the_command), "the command survived the abort"


@pytest.mark.parametrize("mode", ["background", "background-setsid"])
@pytest.mark.parametrize("code", [0, 3])
async def test_a_command_that_exits_decides_its_batch_at_once_and_its_leftovers_end(
    tmp_path: Path, mode: str, code: int
) -> None:
    pidfile = tmp_path / "leftover.pid"
    handler = command(mode, str(pidfile), str(code))
    # The leftover sleeps 600 s with the command's stdout and stderr open: waiting for the
    # pipes to close would hold the batch (and its claim) that long.
    with trio.fail_after(20):
        if code == 0:
            assert await handler(batch()) is None
        else:
            with pytest.raises(PermanentFailure, match="its child still holds this pipe"):
                await handler(batch())
    assert gone(await pid_from(pidfile)), "the leftover child outlived its command"


# -- the same through a runner and the reference server ---------------------------------------


async def test_an_operator_abort_ends_a_commands_setsid_grandchild(world: World, tmp_path: Path) -> None:
    await world.create("a")
    pidfile = tmp_path / "grandchild.pid"
    handler = command("setsid-and-hang", str(pidfile), kill_grace=1.0)
    runner = Runner(world.settings(), handlers={world.sub: handler})
    async with running(runner):
        await world.append("a", {"n": 1})
        grandchild = await pid_from(pidfile)
        assert runner.abort(world.sub)
        await eventually(lambda: runner.health().claims["aborted"] == 1, what="the aborted outcome")
        assert gone(grandchild), "the grandchild in its own session outlived the abort"


async def test_a_command_leaving_a_child_on_its_output_does_not_hold_the_claim(world: World, tmp_path: Path) -> None:
    await world.create("a")
    pidfile = tmp_path / "leftover.pid"
    runner = Runner(world.settings(), handlers={world.sub: command("background", str(pidfile), "0")})
    async with running(runner):
        await world.append("a", {"n": 1})
        # The leftover sleeps 600 s holding the command's stdout: the claim must not wait for it.
        await eventually(lambda: runner.health().claims["completed"] == 1, what="the claim to complete")
        assert gone(await pid_from(pidfile))


def test_without_pidfds_a_command_handler_is_a_configuration_error(monkeypatch: pytest.MonkeyPatch) -> None:
    # What macOS or a kernel older than 5.3 looks like to the handler.
    monkeypatch.delattr(os, "pidfd_open")
    with pytest.raises(ConfigError, match=r"Linux 5\.3"):
        command("env", "/dev/null")
