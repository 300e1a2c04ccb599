"""Operator surfaces at start: a live control socket is never stolen, and every start-up error
is one line on stderr with exit code 78 (EX_CONFIG), never a traceback.

Real `python -m runner` processes. No server is needed: the runners point at a loopback port
nobody serves (they keep reconnecting, which is enough to serve the control socket).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from runner._config import UNIX_PATH_MAX
from tests.support import eventually
from tests.test_end_to_end import ROOT, start_runner_process
from tests.test_operations import pullwake

EX_CONFIG = 78
NOBODY = "http://127.0.0.1:9"  # loopback, nothing listens: the runner reconnects and stays up


def write_config(path: Path, **settings: Any) -> Path:
    lines = [
        f'server_url = "{NOBODY}"',
        'runner_id = "startup-test"',
        *(f"{key} = {json.dumps(value)}" for key, value in settings.items()),
        "[[subscriptions]]",
        'id = "jobs"',
        'pattern = "jobs/*"',
        'handler = "runner.examples:log_batch"',
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


def one_line_config_error(result: subprocess.CompletedProcess[str], *fragments: str) -> str:
    """Assert the start failed as a configuration error: exit 78, one line on stderr, no traceback."""
    assert result.returncode == EX_CONFIG, f"exit {result.returncode}, stderr:\n{result.stderr}"
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got:\n{result.stderr}"
    line = lines[0]
    assert line.startswith("pullwake: "), line
    for fragment in fragments:
        assert fragment in line, f"{fragment!r} is not in: {line}"
    return line


def listening(path: Path) -> bool:
    """Whether something accepts connections on the Unix socket `path` (a connect() succeeds)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(str(path))
        except OSError:
            return False
    return True


def stale_socket(path: Path) -> Path:
    """A socket file left behind by a process that is gone: connect() is refused."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.bind(str(path))
    return path


def stop(process: subprocess.Popen[bytes]) -> int:
    process.send_signal(signal.SIGTERM)
    return process.wait(timeout=30)


# -- 1. a live control socket is never stolen ------------------------------------------------


async def test_a_second_runner_on_a_live_control_socket_exits_78_and_the_first_keeps_serving(tmp_path: Path) -> None:
    control = tmp_path / "control.sock"
    config = write_config(tmp_path / "runner.toml", control_socket=str(control))
    first = start_runner_process(config, tmp_path / "first.log")
    try:
        await eventually(lambda: listening(control), what="the first runner to serve its control socket")
        with trio.fail_after(30):  # a runner that took the socket over would run on: fail, do not hang
            second = await trio.run_process(
                [sys.executable, "-m", "runner", "run", "--config", str(config)],
                capture_stdout=True,
                capture_stderr=True,
                check=False,
                env={**os.environ, "PYTHONPATH": str(ROOT)},
            )
        result = subprocess.CompletedProcess(second.args, second.returncode, "", second.stderr.decode())
        one_line_config_error(result, "another runner is serving on", str(control))
        assert "runner.starting" not in second.stdout.decode(), "the refused runner must not start any work"

        status = pullwake("status", "--socket", str(control))
        assert status.returncode == 0, status.stderr
        assert "startup-test" in status.stdout
        assert control.exists(), "the refused runner leaves the first one's socket in place"
    finally:
        assert stop(first) == 0
    assert not control.exists(), "the first runner removes its own socket when it stops"


async def test_a_stale_control_socket_is_replaced(tmp_path: Path) -> None:
    control = stale_socket(tmp_path / "control.sock")
    config = write_config(tmp_path / "runner.toml", control_socket=str(control))
    runner = start_runner_process(config, tmp_path / "runner.log")
    try:
        await eventually(lambda: listening(control), what="the runner to take over the stale socket")
        status = pullwake("status", "--socket", str(control))
        assert status.returncode == 0, status.stderr
    finally:
        assert stop(runner) == 0


# -- 2. every start-up error is one line and exit 78 -----------------------------------------


@pytest.fixture
def busy_port() -> Iterator[int]:
    """A loopback port that something else is listening on."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen(1)
        yield holder.getsockname()[1]


def test_a_control_socket_under_a_file_is_one_line_and_78(tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("not a directory\n")
    for control in (tmp_path / "a-file" / "deeper" / "control.sock", tmp_path / "a-file" / "control.sock"):
        config = write_config(tmp_path / "runner.toml", control_socket=str(control))
        one_line_config_error(pullwake("run", "--config", str(config)), "control_socket", "a-file")


def test_a_control_socket_path_too_long_for_af_unix_is_one_line_and_78(tmp_path: Path) -> None:
    deep = tmp_path / ("d" * (UNIX_PATH_MAX + 10))
    # Set in the configuration: refused when the settings are read.
    config = write_config(tmp_path / "runner.toml", control_socket=str(deep / "control.sock"))
    one_line_config_error(pullwake("config", "check", "--config", str(config)), "control_socket", "at most 107")
    # Handed over by systemd (RuntimeDirectory=): refused when the socket is bound.
    config = write_config(tmp_path / "runner.toml")
    result = pullwake("run", "--config", str(config), env={"RUNTIME_DIRECTORY": str(deep)})
    one_line_config_error(result, "control_socket", "at most 107")


def test_a_metrics_port_in_use_is_one_line_and_78(tmp_path: Path, busy_port: int) -> None:
    listen = f"127.0.0.1:{busy_port}"
    config = write_config(tmp_path / "runner.toml", metrics_listen=listen)
    result = pullwake("run", "--config", str(config))
    one_line_config_error(result, "metrics_listen", listen, "in use")
    assert "runner.starting" not in result.stdout, "a runner that cannot serve its surfaces does no work"


def test_a_metrics_port_out_of_range_is_one_line_and_78(tmp_path: Path) -> None:
    config = write_config(tmp_path / "runner.toml", metrics_listen="127.0.0.1:99999")
    one_line_config_error(pullwake("run", "--config", str(config)), "metrics_listen", "out of range")


@pytest.mark.parametrize(
    ("value", "fragments"),
    [
        ("[{", ("PULLWAKE_SUBSCRIPTIONS is not valid JSON",)),
        ("jobs", ("PULLWAKE_SUBSCRIPTIONS is not valid JSON",)),
        ('[{"id": 3, "pattern": "jobs/*"}]', ("subscriptions.0.id", "valid string")),
        ('{"id": "jobs"}', ("subscriptions", "valid tuple")),
    ],
    ids=["truncated-json", "not-json", "wrong-field-type", "object-not-list"],
)
def test_bad_pullwake_subscriptions_is_one_line_and_78(tmp_path: Path, value: str, fragments: tuple[str, ...]) -> None:
    config = write_config(tmp_path / "runner.toml")
    result = pullwake("run", "--config", str(config), env={"PULLWAKE_SUBSCRIPTIONS": value})
    one_line_config_error(result, *fragments)


def test_config_check_says_the_same_of_bad_pullwake_subscriptions(tmp_path: Path) -> None:
    config = write_config(tmp_path / "runner.toml")
    result = pullwake("config", "check", "--config", str(config), env={"PULLWAKE_SUBSCRIPTIONS": "[{"})
    one_line_config_error(result, "PULLWAKE_SUBSCRIPTIONS is not valid JSON", "line 1 column 3")


def test_a_handler_module_that_raises_at_import_is_one_line_and_78(tmp_path: Path) -> None:
    modules = tmp_path / "modules"
    modules.mkdir()
    (modules / "exploding_handler.py").write_text(
        'raise RuntimeError("no database configured:\\n  set DATABASE_URL")\n\ndef handle(batch):\n    pass\n'
    )
    config = tmp_path / "runner.toml"
    config.write_text(
        f'server_url = "{NOBODY}"\n[[subscriptions]]\nid = "jobs"\npattern = "jobs/*"\n'
        'handler = "exploding_handler:handle"\n'
    )
    env = {"PYTHONPATH": os.pathsep.join([str(ROOT), str(modules)])}
    result = pullwake("run", "--config", str(config), env=env)
    one_line_config_error(result, "exploding_handler", "RuntimeError", "no database configured", "DATABASE_URL")


# -- 3. status and abort against a socket nobody answers on ----------------------------------


@pytest.mark.parametrize("command", [["status"], ["abort", "jobs"]])
def test_status_and_abort_on_a_stale_socket_say_nobody_answers(tmp_path: Path, command: list[str]) -> None:
    control = stale_socket(tmp_path / "control.sock")
    result = pullwake(*command, "--socket", str(control))
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        f"pullwake: nobody is answering on {control} (connection refused): the runner is not running, "
        "or it stopped without removing its socket"
    ]


def test_status_on_a_socket_that_never_answers_times_out_in_one_line(tmp_path: Path) -> None:
    control = tmp_path / "control.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as wedged:
        wedged.bind(str(control))
        wedged.listen(8)  # connections queue up; nobody ever accepts or answers
        result = pullwake("status", "--socket", str(control), "--timeout", "0.3")
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        f"pullwake: the runner at {control} did not answer within 0.3 s: it is wedged, "
        "or something other than a runner holds this socket"
    ]


async def test_status_on_a_socket_that_is_not_a_runner_says_so_in_one_line(tmp_path: Path) -> None:
    control = tmp_path / "control.sock"
    listener = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
    await listener.bind(str(control))
    listener.listen(8)

    async def not_a_runner(task_status: trio.TaskStatus[None]) -> None:
        task_status.started()
        while True:
            conn, _ = await listener.accept()
            with conn:
                await conn.recv(65536)
                await conn.send(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\nconnection: close\r\n\r\nhello")

    with listener:
        async with trio.open_nursery() as nursery:
            await nursery.start(not_a_runner)
            with trio.fail_after(60):
                result = await trio.run_process(
                    [sys.executable, "-m", "runner", "status", "--socket", str(control), "--timeout", "5"],
                    capture_stdout=True,
                    capture_stderr=True,
                    check=False,
                    env={**os.environ, "PYTHONPATH": str(ROOT)},
                )
            nursery.cancel_scope.cancel()
    stderr = result.stderr.decode()
    assert result.returncode == 1
    assert "Traceback" not in stderr
    assert stderr.strip().splitlines() == [
        f"pullwake: {control} answered HTTP 200 without JSON: it is not a pullwake control socket"
    ]


def test_a_state_dir_under_a_file_is_one_line_and_78(tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("x\n")
    config = write_config(tmp_path / "runner.toml", state_dir=str(tmp_path / "a-file" / "state"))
    one_line_config_error(pullwake("run", "--config", str(config)), "state_dir", "not a directory")
