"""Operating the runner: CLI, configuration, logs, systemd, health and metrics."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import trio
import trio.testing
from pydantic import SecretStr

from machine import Event, State
from runner import Batch, ConfigError, Runner, Settings, load_settings
from runner._driver import StateContext
from runner._service.systemd import Notifier, keep_watchdog
from tests.driver_harness import Fakes, drive_to, settle
from tests.support import Recorder, World, eventually, running, serving
from tests.test_end_to_end import ROOT, start_runner_process, write_config

CONFIG = ROOT / "config"
EXAMPLE_TOML = CONFIG / "pullwake.example.toml"
EXAMPLE_ENV = CONFIG / "pullwake.example.env"
SUBSCRIPTION_SECTION = "[[subscriptions]]"


def pullwake(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "runner", *args],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})},
        check=False,
        timeout=60,
    )


# -- configuration --------------------------------------------------------------------------


def documented_toml_keys() -> tuple[set[str], set[str]]:
    """Keys shown in the example (set or commented out), above and below [[subscriptions]]."""
    top_level: set[str] = set()
    subscription: set[str] = set()
    current = top_level
    for line in EXAMPLE_TOML.read_text().splitlines():
        if line.strip() == SUBSCRIPTION_SECTION:
            current = subscription
            continue
        if found := re.match(r"^#?\s?([a-z_]+)\s*=", line):
            current.add(found.group(1))
    return top_level, subscription


def documented_env_keys() -> set[str]:
    return {m.group(1).lower() for m in re.finditer(r"^#?\s?PULLWAKE_([A-Z_]+)=", EXAMPLE_ENV.read_text(), re.M)}


def test_the_example_toml_documents_exactly_the_model() -> None:
    top, subscription = documented_toml_keys()
    model_top = set(Settings.model_fields) - {"subscriptions"}
    assert top - model_top == set(), "the example documents keys the model does not have"
    assert model_top - top == set(), "the example is missing keys of the model"
    from runner import SubscriptionSpec

    assert subscription == set(SubscriptionSpec.model_fields)


def test_the_example_env_file_documents_exactly_the_model() -> None:
    keys = documented_env_keys() - {"config"}
    assert keys == set(Settings.model_fields)


def test_config_check_accepts_the_example_toml() -> None:
    result = pullwake("config", "check", "--config", str(EXAMPLE_TOML))
    assert result.returncode == 0, result.stderr
    effective = json.loads(result.stdout)
    assert effective["subscriptions"][0]["handler"] == "runner.examples:log_batch"


def test_config_check_accepts_every_setting_of_the_example_env_file() -> None:
    env: dict[str, str] = {}
    for found in re.finditer(r"^#?\s?(PULLWAKE_[A-Z_]+)=(.*)$", EXAMPLE_ENV.read_text(), re.M):
        env[found.group(1)] = found.group(2)
    env["PULLWAKE_CONFIG"] = str(EXAMPLE_TOML)
    # These name files that exist on the operator's machine, not here; token and token_file exclude each other.
    for key in ("PULLWAKE_TOKEN_FILE", "PULLWAKE_CA_FILE"):
        env.pop(key)
    result = pullwake("config", "check", env=env)
    assert result.returncode == 0, result.stderr
    effective = json.loads(result.stdout)
    assert effective["metrics_listen"] == "127.0.0.1:9464", "the environment overrides the file"
    assert effective["token"] == "**********", "secrets are redacted"


def test_a_broken_configuration_names_every_bad_key_and_exits_78(tmp_path: Path) -> None:
    broken = tmp_path / "broken.toml"
    broken.write_text(
        "\n".join(
            [
                'server_url = "ftp://example"',
                "heartbeat_interval = -1",
                "colour = 'blue'",
                "[[subscriptions]]",
                'id = "jobs"',
                'pattern = "jobs/*"',
                "lease_ttl_ms = 10",
            ]
        )
    )
    result = pullwake("config", "check", "--config", str(broken))
    assert result.returncode == 78
    message = result.stderr
    for key in ("server_url", "heartbeat_interval", "colour", "subscriptions.0.lease_ttl_ms"):
        assert key in message, f"{key} is not named in:\n{message}"
    assert "Traceback" not in message
    assert len(message.strip().splitlines()) == 5, "one line per problem, plus the heading"


def test_unreadable_toml_and_missing_files_are_config_errors(tmp_path: Path) -> None:
    (tmp_path / "bad.toml").write_text("server_url = \n")
    result = pullwake("config", "check", "--config", str(tmp_path / "bad.toml"))
    assert (result.returncode, "not valid TOML" in result.stderr) == (78, True)
    result = pullwake("config", "check", "--config", str(tmp_path / "missing.toml"))
    assert (result.returncode, "does not exist" in result.stderr) == (78, True)
    result = pullwake("run", "--config", str(EXAMPLE_TOML), env={"PULLWAKE_HEARTBEAT_TIMEOUT": "9"})
    assert result.returncode == 78
    assert "heartbeat_timeout must not exceed heartbeat_interval" in result.stderr
    unimportable = tmp_path / "handler.toml"
    unimportable.write_text('[[subscriptions]]\nid = "x"\npattern = "a/*"\nhandler = "no.such.module:handle"\n')
    for command in (["run"], ["config", "check"]):
        result = pullwake(*command, "--config", str(unimportable))
        assert result.returncode == 78, result.stderr
        assert "cannot import no.such.module" in result.stderr
        assert "Traceback" not in result.stderr


def test_precedence_is_defaults_then_file_then_environment_then_flags(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "runner.toml"
    config.write_text('wake_stream = "from/file"\nlive_mode = "long-poll"\n')
    assert load_settings(config).wake_stream == "from/file"
    assert load_settings(config).drain_timeout == 30.0, "unset keys keep their defaults"
    monkeypatch.setenv("PULLWAKE_WAKE_STREAM", "from/env")
    assert load_settings(config).wake_stream == "from/env"
    assert load_settings(config).live_mode == "long-poll"
    assert load_settings(config, {"wake_stream": "from/flag"}).wake_stream == "from/flag"


def test_the_token_comes_from_the_setting_a_file_or_the_systemd_credential(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    assert Settings().service_token() is None
    (tmp_path / "token").write_text("file-secret\n")
    token = Settings(token_file=tmp_path / "token").service_token()
    assert token is not None
    assert token.get_secret_value() == "file-secret"
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    (credentials / "pullwake-token").write_text("credential-secret")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(credentials))
    token = Settings().service_token()
    assert token is not None
    assert token.get_secret_value() == "credential-secret"
    (credentials / "pullwake-token").write_text("")
    assert Settings().service_token() is None, "an empty credential file means no token"
    assert "credential-secret" not in repr(Settings(token=SecretStr("credential-secret")))
    with pytest.raises(ConfigError, match="token_file"):
        Settings(token_file=tmp_path / "nope").service_token()


# -- logs -----------------------------------------------------------------------------------


async def test_a_full_run_logs_json_with_context_and_never_a_token(
    world: World, tmp_path: Path, record_file: Path
) -> None:
    await world.create("a")
    record = record_file
    secret = "s3cr3t-service-token-do-not-log"
    config = write_config(tmp_path / "runner.toml", world, tmp_path / "state", token=secret)
    log = tmp_path / "runner.log"
    process = start_runner_process(config, log)
    try:
        await eventually(lambda: '"target": "streaming"' in log.read_text(), what="the runner to stream")
        for n in range(5):
            await world.append("a", {"n": n})
        await eventually(lambda: len(record.read_text().splitlines()) == 5, what="five events handled")
    finally:
        process.send_signal(signal.SIGTERM)
        await trio.to_thread.run_sync(process.wait, 20)
    output = log.read_text()
    assert secret not in output
    assert "eyJzdWIi" not in output, "no claim token (base64 JSON starting {'sub':...}) in the logs"
    entries = [json.loads(line) for line in output.splitlines()]
    assert all({"event", "level", "timestamp", "runner_id"} <= entry.keys() for entry in entries)
    claims = [entry for entry in entries if entry["event"] == "claim.started"]
    assert claims
    assert all({"subscription", "wake_id", "generation"} <= entry.keys() for entry in claims)


# -- systemd --------------------------------------------------------------------------------


async def test_systemd_hears_ready_status_watchdog_and_stopping_in_order(
    world: World, tmp_path: Path, record_file: Path
) -> None:
    await world.create("a")
    notify_path = tmp_path / "notify.sock"
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    await sock.bind(str(notify_path))
    heard: list[str] = []

    async def listen() -> None:
        while True:
            heard.append((await sock.recv(4096)).decode())

    config = write_config(tmp_path / "runner.toml", world, tmp_path / "state")
    log = tmp_path / "runner.log"
    with sock:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(listen)
            process = start_runner_process(
                config, log, NOTIFY_SOCKET=str(notify_path), WATCHDOG_USEC="400000", WATCHDOG_PID=""
            )
            try:
                await eventually(lambda: any("STATUS=streaming" in m for m in heard), what="STATUS=streaming")
                await eventually(lambda: sum("WATCHDOG=1" in m for m in heard) >= 3, what="watchdog pings")
            finally:
                process.send_signal(signal.SIGTERM)
                await trio.to_thread.run_sync(process.wait, 20)
            await eventually(lambda: any("STATUS=stopped" in m for m in heard), what="the last status")
            nursery.cancel_scope.cancel()
    assert process.returncode == 0
    first = [index for index, message in enumerate(heard) if "READY=1" in message]
    watchdog = [index for index, message in enumerate(heard) if "WATCHDOG=1" in message]
    stopping = [index for index, message in enumerate(heard) if "STOPPING=1" in message]
    assert first == [0], f"READY=1 comes first and once: {heard}"
    assert watchdog[0] > first[0]
    assert stopping
    assert stopping[0] > watchdog[0], "STOPPING=1 after the pings"
    assert not any("WATCHDOG=1" in message for message in heard[stopping[0] + 3 :]), "no pings long after stop"
    assert any(message.startswith("STATUS=") or "\nSTATUS=" in message for message in heard[first[0] :])


async def test_the_watchdog_is_withheld_while_the_driver_is_wedged(autojump_clock: trio.testing.MockClock) -> None:
    fakes = Fakes()

    async def refuses_to_stop(context: StateContext) -> None:
        with trio.CancelScope(shield=True):
            await trio.sleep_until(100)

    fakes.scripts["consume"] = refuses_to_stop
    driver = fakes.driver()
    pings: list[float] = []

    class Recording(Notifier):
        def send(self, *lines: str) -> None:
            if "WATCHDOG=1" in lines:
                pings.append(trio.current_time())

    def progressing() -> tuple[bool, str]:
        busy = driver.busy_for()
        return busy <= 10, f"stuck for {busy:.0f} s"

    async with trio.open_nursery() as nursery:
        await nursery.start(driver.run)
        await drive_to(driver, State.STREAMING)
        nursery.start_soon(keep_watchdog, Recording(None), progressing, 5.0)
        await trio.sleep(20)
        wedged_at = trio.current_time()
        await driver.send(Event.STREAM_RESET, epoch=driver.epoch)  # the consume activity will not end
        await settle()
        await trio.sleep(60)
        assert driver.busy_for() == pytest.approx(60), "still inside the transition"
        assert max(pings) <= wedged_at + 10, "pings stop once the driver has been stuck for 10 s"
        await trio.sleep(40)  # the activity gives up at last; the transition completes
        assert driver.busy_for() == 0
        [backoff] = fakes.running()
        assert backoff.name == "backoff", "the next state's activity only starts after the old one ended"
        assert max(pings) > 100, "pings resume once the driver moves again (the activity ended at 100 s)"
        nursery.cancel_scope.cancel()


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_systemd_analyze_verifies_both_units(tmp_path: Path) -> None:
    # verify checks that ExecStart= exists: point it at this checkout's pullwake.
    executable = Path(sys.executable).parent / "pullwake"
    for unit in ("pullwake-runner.service", "pullwake-runner@.service"):
        text = (ROOT / "systemd" / unit).read_text()
        assert "Type=notify" in text
        assert "WatchdogSec=" in text
        (tmp_path / unit).write_text(text.replace("/opt/pullwake-runner/bin/pullwake", str(executable)))
    result = subprocess.run(
        ["systemd-analyze", "verify", "pullwake-runner.service", "pullwake-runner@demo.service"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == "", f"systemd-analyze complained:\n{result.stderr}"


def test_the_unit_gives_the_drain_time_to_finish() -> None:
    text = (ROOT / "systemd" / "pullwake-runner.service").read_text()
    stop = int(re.search(r"^TimeoutStopSec=(\d+)s", text, re.M).group(1))  # type: ignore[union-attr]
    defaults = Settings()
    assert stop > defaults.drain_timeout + defaults.command_kill_grace + defaults.finalizer_timeout


# -- status, health, metrics ----------------------------------------------------------------


async def test_pullwake_status_shows_the_state_and_the_claims_in_flight(world: World, tmp_path: Path) -> None:
    await world.create("a")
    busy = trio.Event()

    async def slow(batch: Batch) -> None:
        busy.set()
        await trio.sleep(30)

    socket_path = tmp_path / "control.sock"
    runner = Runner(world.settings(control_socket=socket_path, drain_timeout=0.2), handlers={world.sub: slow})
    async with serving(runner):
        await world.append("a", {"n": 1})
        await busy.wait()
        with trio.fail_after(60):
            table = await trio.run_process(
                [sys.executable, "-m", "runner", "status", "--socket", str(socket_path)],
                capture_stdout=True,
                check=False,
            )
            snapshot = await trio.run_process(
                [sys.executable, "-m", "runner", "status", "--json", "--socket", str(socket_path)],
                capture_stdout=True,
                check=False,
            )
        async with httpx.AsyncClient(transport=httpx.AsyncHTTPTransport(uds=str(socket_path))) as control:
            health = await control.get("http://runner/health")
    text = table.stdout.decode()
    assert table.returncode == 0
    assert "streaming" in text
    assert "in flight: 1" in text
    assert world.sub in text
    assert "healthy" in text
    document = json.loads(snapshot.stdout)
    assert document["state"] == "streaming"
    assert [claim["subscription"] for claim in document["in_flight"]] == [world.sub]
    assert health.status_code == 200
    assert health.json()["ok"] is True


async def test_health_is_503_when_stuck(world: World, tmp_path: Path) -> None:
    socket_path = tmp_path / "control.sock"
    settings = world.settings(control_socket=socket_path, server_url="http://127.0.0.1:9", stuck_after=1.0)
    runner = Runner(settings, handlers={world.sub: Recorder()})
    transport = httpx.AsyncHTTPTransport(uds=str(socket_path))
    async with serving(runner, streaming=False), httpx.AsyncClient(transport=transport) as control:
        await eventually(lambda: runner.health().reconnect_count >= 1)
        await trio.sleep(1.2)
        health = await control.get("http://runner/health")
    assert health.status_code == 503
    assert "stuck" in health.json()["reason"]
    assert "ConnectError" in health.json()["reason"], "the reason says what is wrong"


def metric(exposition: str, name: str, **labels: str) -> float:
    selector = ",".join(f'{key}="{value}"' for key, value in labels.items())
    pattern = rf"^{re.escape(name)}{re.escape('{' + selector + '}') if selector else ''} (\S+)$"
    found = re.search(pattern, exposition, re.M)
    assert found, f"{name} {labels} is not in the exposition"
    return float(found.group(1))


async def test_metrics_after_a_short_run_are_plausible_and_per_runner(world: World) -> None:
    await world.create("a", "b")
    recorder = Recorder()
    runner = Runner(world.settings(metrics_listen="127.0.0.1:0"), handlers={world.sub: recorder})
    other = Runner(world.settings(subscriptions=(world.spec(f"{world.sub}-other"),)), handlers={})
    async with serving(runner) as metrics_url:
        for n in range(20):
            await world.append("ab"[n % 2], {"n": n})
        await eventually(lambda: recorder.count == 20)
        await eventually(lambda: not runner.health().in_flight)
        assert metrics_url is not None
        async with httpx.AsyncClient(base_url=metrics_url) as scraper:
            exposition = (await scraper.get("/metrics")).text
            healthz = await scraper.get("/healthz")
            abort = await scraper.post(f"/claims/{world.sub}/abort")
    assert healthz.status_code == 200
    assert abort.status_code == 404, "no abort over TCP: only the owner-only socket can abort"
    assert metric(exposition, "pullwake_state", state="streaming") == 1
    assert metric(exposition, "pullwake_state", state="stopped") == 0
    assert metric(exposition, "pullwake_wake_events_total") >= 1
    completed = metric(exposition, "pullwake_claims_total", result="completed")
    assert 1 <= completed <= 20
    assert metric(exposition, "pullwake_batches_total", outcome="ok") >= completed
    assert metric(exposition, "pullwake_handler_duration_seconds_count") == metric(
        exposition, "pullwake_batches_total", outcome="ok"
    )
    latency_count = metric(exposition, "pullwake_wake_to_handler_seconds_count")
    assert latency_count >= 1
    assert 0 <= metric(exposition, "pullwake_wake_to_handler_seconds_sum") / latency_count < 5
    assert metric(exposition, "pullwake_events_handled_total") == 20
    assert metric(exposition, "pullwake_reconnects_total") == 0
    assert metric(exposition, "pullwake_heartbeat_failures_total") == 0
    assert metric(exposition, "pullwake_claims_in_flight") == 0
    assert "# TYPE pullwake_lease_renewals_total counter" in exposition  # values: test_lease_renewals_are_counted
    assert metric(exposition, "pullwake_runner_info", runner_id=runner.settings.runner_id) == 1
    theirs = other.metrics_exposition()[0].decode()
    assert runner.settings.runner_id not in theirs, "two runners in one process keep separate registries"


async def test_lease_renewals_are_counted(world: World) -> None:
    await world.create("a")

    async def slow(batch: Batch) -> None:
        await trio.sleep(1.5)

    runner = Runner(world.settings(subscriptions=(world.spec(lease_ttl_ms=1_500),)), handlers={world.sub: slow})
    async with running(runner):
        await world.append("a", {"n": 1})
        await eventually(lambda: runner.health().claims["completed"] == 1, what="the slow claim to complete")
    exposition = runner.metrics_exposition()[0].decode()
    assert metric(exposition, "pullwake_lease_renewals_total", result="ok") >= 2


# -- the command line -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "command", [[], ["run"], ["dev"], ["demo"], ["status"], ["abort"], ["config"], ["config", "check"], ["machine"]]
)
def test_every_command_has_help(command: list[str]) -> None:
    result = pullwake(*command, "--help")
    assert result.returncode == 0
    assert "Usage:" in result.stdout


def test_pullwake_machine_prints_the_table_and_the_diagram() -> None:
    import machine

    assert pullwake("machine").stdout == machine.table_text()
    assert pullwake("machine", "--mermaid").stdout == machine.mermaid()


def test_status_without_a_runner_is_a_clear_error(tmp_path: Path) -> None:
    result = pullwake("status", "--socket", str(tmp_path / "nothing.sock"))
    assert result.returncode == 1
    assert "no control socket" in result.stderr
