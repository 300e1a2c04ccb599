"""The `pullwake` command line. The only place that configures logging or installs signal handlers."""

from __future__ import annotations

import datetime
import json
import os
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any, NoReturn

import click
import structlog
import trio

import machine

from .._config import Settings, load_settings, operator_warnings
from .._runner import Runner
from ..errors import ClientError, ConfigError, RunnerError
from .logs import LEVELS, configure_logging

EX_OK = 0
EX_FAILURE = 1
EX_CONFIG = 78

log = structlog.get_logger("pullwake.cli")


def _fail_config(error: ConfigError) -> NoReturn:
    click.echo(f"pullwake: {error}", err=True)
    sys.exit(EX_CONFIG)


def _settings(config: Path | None, **flags: Any) -> Settings:
    try:
        return _load(config, flags)
    except ConfigError as error:
        _fail_config(error)


def _load(config: Path | None, flags: dict[str, Any]) -> Settings:
    """The settings from `config`, the environment and the flags given; `ConfigError` says what is wrong."""
    settings = load_settings(config, {key: value for key, value in flags.items() if value is not None})
    # systemd hands us these directories (StateDirectory=, RuntimeDirectory=); explicit settings win.
    defaults: dict[str, Any] = {}
    if settings.state_dir is None and (state := os.environ.get("STATE_DIRECTORY")):
        defaults["state_dir"] = Path(state.split(":")[0])
    if settings.control_socket is None and (runtime := os.environ.get("RUNTIME_DIRECTORY")):
        defaults["control_socket"] = Path(runtime.split(":")[0]) / "control.sock"
    return settings.model_copy(update=defaults) if defaults else settings


config_option = click.option(
    "--config",
    "-c",
    type=click.Path(dir_okay=False, path_type=Path),
    envvar="PULLWAKE_CONFIG",
    help="TOML configuration file (env: PULLWAKE_CONFIG).",
)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="pullwake-runner")
def main() -> None:
    """Follow Durable Streams pull-wake subscriptions: claim, run handlers, ack."""


@main.command()
@config_option
@click.option("--server-url", help="Durable Streams server base URL.")
@click.option("--runner-id", help="Worker name used when claiming.")
@click.option("--wake-stream", help="Wake stream to follow.")
@click.option("--state-dir", type=click.Path(file_okay=False, path_type=Path), help="Checkpoint directory.")
@click.option("--live-mode", type=click.Choice(["sse", "long-poll"]), help="How to follow the wake stream.")
@click.option("--log-level", type=click.Choice(LEVELS), default="info", show_default=True)
@click.option("--log-format", type=click.Choice(["auto", "json", "console"]), default="auto", show_default=True)
def run(config: Path | None, log_level: str, log_format: str, **flags: Any) -> None:
    """Run the worker until SIGTERM or SIGINT (a second signal skips the drain wait).

    SIGHUP (`systemctl reload`) re-reads the configuration and applies its subscriptions.
    """
    settings = _settings(config, **flags)
    runner = Runner(settings)
    try:
        runner.check()
    except ConfigError as error:
        _fail_config(error)
    configure_logging(log_level, log_format, redactor=runner.redactor)  # type: ignore[arg-type]
    for warning in operator_warnings(settings):
        log.warning("config.warning", detail=warning)
    from .daemon import serve

    try:
        exit_status = trio.run(serve, runner, partial(_load, config, flags))
    except (ConfigError, BaseExceptionGroup) as error:
        # What fails inside trio (binding the control socket or the metrics port) comes wrapped
        # in trio's exception groups: a ConfigError among them is the same one line and 78.
        if (config_error := _config_error_in(error)) is None:
            raise
        _fail_config(config_error)
    sys.exit(exit_status)


def _config_error_in(error: BaseException) -> ConfigError | None:
    """The first ConfigError in `error` or in the exception groups nested in it, if any."""
    if isinstance(error, ConfigError):
        return error
    if isinstance(error, BaseExceptionGroup):
        for inner in error.exceptions:
            if (found := _config_error_in(inner)) is not None:
                return found
    return None


@main.command()
@click.option("--port", default=4437, show_default=True, help="Loopback port (0 picks a free one).")
@click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path), help="Keep streams on disk here.")
@click.option("--long-poll-timeout", default=30.0, show_default=True, help="Seconds a live read is held open.")
@click.option("--install-only", is_flag=True, help="Install the pinned server into the cache and exit.")
def dev(port: int, data_dir: Path | None, long_poll_timeout: float, install_only: bool) -> None:
    """Run the pinned Durable Streams reference server on 127.0.0.1 (installs it on first use)."""
    from .devserver import PACKAGE, VERSION, DevServer, DevServerError, install

    server = DevServer(port=port, data_dir=data_dir, long_poll_timeout=long_poll_timeout)
    try:
        if install_only:
            click.echo(f"{PACKAGE}@{VERSION} installed in {install()}")
            return
        url = server.start()
    except DevServerError as error:
        click.echo(f"pullwake dev: {error}", err=True)
        sys.exit(EX_FAILURE)
    click.echo(f"reference server listening on {url} (stream root /v1/stream); Ctrl-C to stop")
    try:
        server.wait()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()


@main.command()
@click.option("--jobs", default=300, show_default=True, help="How many jobs to append.")
def demo(jobs: int) -> None:
    """Start a local reference server, run a runner with an example handler, and show it working."""
    from .demo import demo as run_demo

    configure_logging("warning", "console", stream=sys.stderr)
    sys.exit(trio.run(run_demo, jobs))


@main.command("machine")
@click.option("--mermaid", "as_mermaid", is_flag=True, help="Print a Mermaid stateDiagram-v2 instead of the table.")
def show_machine(as_mermaid: bool) -> None:
    """Print the lifecycle: the (event x state) table, or the Mermaid diagram."""
    click.echo(machine.mermaid() if as_mermaid else machine.table_text(), nl=False)


def _socket_path(socket: Path | None, config: Path | None) -> Path:
    if socket is not None:
        return socket
    if config is not None or os.environ.get("PULLWAKE_CONFIG"):
        configured = _settings(config).control_socket
        if configured is not None:
            return configured
    if runtime := os.environ.get("RUNTIME_DIRECTORY"):
        return Path(runtime.split(":")[0]) / "control.sock"
    return Path("/run/pullwake-runner/control.sock")


socket_option = click.option(
    "--socket",
    "socket_path",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Control socket of the runner (default: from the config, else /run/pullwake-runner/control.sock).",
)


timeout_option = click.option(
    "--timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=5.0,
    show_default=True,
    help="Seconds to wait for the runner's answer.",
)


def _ask(socket_path: Path | None, config: Path | None, method: str, url: str, timeout: float) -> tuple[int, Any]:
    from .control import request

    try:
        return request(_socket_path(socket_path, config), method, url, timeout=timeout)
    except RunnerError as error:
        click.echo(f"pullwake: {error}", err=True)
        sys.exit(EX_FAILURE)


def _ago(timestamp: float | None) -> str:
    if timestamp is None:
        return "never"
    seconds = max(0.0, time.time() - timestamp)
    return f"{seconds:.0f} s ago" if seconds < 120 else f"{seconds / 60:.0f} min ago"


@main.command()
@config_option
@socket_option
@timeout_option
@click.option("--json", "as_json", is_flag=True, help="Print the full status snapshot as JSON.")
def status(config: Path | None, socket_path: Path | None, timeout: float, as_json: bool) -> None:
    """Show what a running runner is doing: state, health, counters, claims in flight."""
    _, snapshot = _ask(socket_path, config, "GET", "/status", timeout)
    code, health = _ask(socket_path, config, "GET", "/health", timeout)
    if as_json:
        click.echo(json.dumps({**snapshot, "healthy": health["ok"], "health_reason": health["reason"]}, indent=2))
        sys.exit(EX_OK if code == 200 else EX_FAILURE)
    rows = [
        ("runner", snapshot["runner_id"]),
        ("state", f"{snapshot['state']} (since {_ago(snapshot['state_since'])})"),
        ("health", f"{'healthy' if health['ok'] else 'UNHEALTHY'}: {health['reason']}"),
        ("wake offset", snapshot["offset"] or "-"),
        ("reconnects", str(snapshot["reconnect_count"])),
        (
            "last error",
            f"{snapshot['last_error']} ({_ago(snapshot['last_error_at'])})" if snapshot["last_error"] else "-",
        ),
        (
            "heartbeat",
            f"{'ok' if snapshot['last_heartbeat_ok'] else 'failing'} ({_ago(snapshot['last_heartbeat_at'])}), "
            f"{snapshot['liveness_resets']} reset(s)",
        ),
        ("events", str(snapshot["events_received"])),
        (
            "claims",
            f"{snapshot['claims_succeeded']} succeeded, {snapshot['claims_skipped']} skipped, "
            f"{snapshot['claims_failed']} failed",
        ),
    ]
    width = max(len(label) for label, _ in rows)
    for label, value in rows:
        click.echo(f"{label:<{width}}  {value}")
    claims = snapshot["in_flight"]
    click.echo(f"\nin flight: {len(claims)}")
    for claim in claims:
        generation, stream = claim["generation"] or "-", claim["stream"] or "-"
        click.echo(
            f"  {claim['subscription']:<24} generation {generation:<6} stream {stream:<24} "
            f"batches {claim['batches_done']:<4} started {_ago(claim['started_at'])}"
        )
    sys.exit(EX_OK if code == 200 else EX_FAILURE)


@main.command()
@click.argument("subscription")
@config_option
@socket_option
@timeout_option
def abort(subscription: str, config: Path | None, socket_path: Path | None, timeout: float) -> None:
    """Abort the in-flight claim of SUBSCRIPTION: progress is acked, the claim released."""
    code, answer = _ask(socket_path, config, "POST", f"/claims/{subscription}/abort", timeout)
    if code == 202:
        click.echo(f"aborted the claim of {subscription}")
        return
    click.echo(f"pullwake: {answer.get('error', answer)}", err=True)
    sys.exit(EX_FAILURE)


@main.command()
@config_option
@socket_option
@click.option(
    "--timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=30.0,
    show_default=True,
    help="Seconds to wait for the runner's answer (it creates added subscriptions on the server first).",
)
def reload(config: Path | None, socket_path: Path | None, timeout: float) -> None:
    """Have the running runner re-read its configuration and apply its subscriptions; print what changed."""
    code, answer = _ask(socket_path, config, "POST", "/reload", timeout)
    if code != 200:
        click.echo(f"pullwake: reload failed, nothing changed: {answer.get('error', answer)}", err=True)
        sys.exit(EX_FAILURE)
    for key, label in (("added", "added"), ("removed", "removed")):
        for subscription in answer[key]:
            click.echo(f"{label:<8} {subscription}")
    for subscription, what in answer["changed"].items():
        click.echo(f"changed  {subscription} ({what})")
    if not (answer["added"] or answer["removed"] or answer["changed"]):
        click.echo("no subscription changed")
    if answer["draining"]:
        click.echo(f"draining {', '.join(answer['draining'])}: their claims in flight finish first")
    if answer["kept_settings"]:
        click.echo(f"pullwake: warning: these need a restart to change: {', '.join(answer['kept_settings'])}", err=True)
    for problem in answer["problems"]:
        click.echo(f"pullwake: {problem}", err=True)
    sys.exit(EX_FAILURE if answer["problems"] else EX_OK)


@main.group("subscriptions", invoke_without_command=True)
@click.pass_context
def subscriptions_group(context: click.Context) -> None:
    """The subscriptions on the server: list them, delete one (with or without a runner up)."""
    if context.invoked_subcommand is None:
        click.echo(context.get_help())


@subscriptions_group.command("list")
@click.argument("extra", nargs=-1, metavar="[ID]...")
@config_option
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list.")
def subscriptions_list(extra: tuple[str, ...], config: Path | None, as_json: bool) -> None:
    """Show each configured subscription (and each ID named) as the server has it.

    The protocol offers no listing of a server's subscriptions: only those named are read.
    """
    from .._wake.subscriptions import list_subscriptions

    found = _on_the_server(list_subscriptions, _settings(config), extra)
    if as_json:
        click.echo(json.dumps(found, indent=2))
        return
    for entry in found:
        if not entry["on_server"]:
            state = "MISSING" if entry["configured"] else "not on the server"
            click.echo(f"{entry['id']:<32} {state}")
            continue
        what = entry["pattern"] or ", ".join(entry["streams"]) or "-"
        match = "" if not entry["configured"] else " differs" if entry["differs"] else " as configured"
        click.echo(
            f"{entry['id']:<32} {what:<28} lease {entry['lease_ttl_ms']} ms, "
            f"{len(entry['linked'])} stream(s) linked{match}"
        )
        for difference in entry["differs"] or ():
            click.echo(f"    {difference}")


@subscriptions_group.command("delete")
@click.argument("subscription")
@config_option
def subscriptions_delete(subscription: str, config: Path | None) -> None:
    """Delete SUBSCRIPTION on the server (its claim, if held, is void; its acknowledged offsets are lost)."""
    from .._wake.subscriptions import delete_subscription

    settings = _settings(config)
    _on_the_server(delete_subscription, settings, subscription)
    click.echo(f"deleted {subscription}")
    spec = settings.subscription(subscription)
    if spec is not None and spec.manage:
        click.echo(
            f"pullwake: note: {subscription} is in the configuration with manage = true: a runner serving it "
            "creates it again; remove it from the configuration and reload first",
            err=True,
        )


def _on_the_server(function: Any, *args: Any) -> Any:
    """Run `function(*args)` against the server; a failure is one line and exit 1."""
    try:
        return trio.run(function, *args)
    except ConfigError as error:
        _fail_config(error)
    except ClientError as error:
        click.echo(f"pullwake: {error}", err=True)
        sys.exit(EX_FAILURE)


@main.group("config")
def config_group() -> None:
    """Inspect the configuration."""


@config_group.command("check")
@config_option
def config_check(config: Path | None) -> None:
    """Validate the configuration and print the effective settings (secrets redacted)."""
    settings = _settings(config)
    try:
        Runner(settings).check()
    except ConfigError as error:
        _fail_config(error)
    for warning in operator_warnings(settings):
        click.echo(f"pullwake: warning: {warning}", err=True)
    document = settings.model_dump(mode="json")
    for key in ("token",):
        if document.get(key) is not None:
            document[key] = "**********"
    click.echo(json.dumps(document, indent=2))


@main.group("runs", invoke_without_command=True)
@config_option
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list of runs.")
@click.pass_context
def runs_group(context: click.Context, config: Path | None, as_json: bool) -> None:
    """List every run of the configured workflow subscriptions, read from the server."""
    if context.invoked_subcommand is not None:
        return
    from .._runs.listing import list_runs, workflow_subscriptions

    settings = _settings(config)
    found = trio.run(list_runs, settings, workflow_subscriptions(settings))
    if as_json:
        click.echo(json.dumps(found, indent=2))
        return
    for run in found:
        waiting = run["waiting_for"]
        detail = f" waiting for {waiting['type']} {waiting.get('key') or ''}".rstrip() if waiting else ""
        if run.get("holder_lost"):
            lost = datetime.datetime.fromtimestamp(run["last_held"], datetime.UTC).strftime("%H:%M:%S UTC")
            detail = f" no holder since {lost} (resumes at the next claim)"
        click.echo(f"{run['id']:<32} {run['status']:<10} steps {len(run['steps']):<4}{detail}")


@runs_group.command("start")
@click.argument("subscription")
@click.argument("run_path")
@click.option("--input", "run_input", required=True, help="The run's input, as JSON.")
@config_option
def runs_start(subscription: str, run_path: str, run_input: str, config: Path | None) -> None:
    """Start a run: create RUN_PATH with the input as its first message."""
    from .._runs.listing import start_run

    try:
        trio.run(start_run, _settings(config), subscription, run_path, _json_option("--input", run_input))
    except ConfigError as error:
        _fail_config(error)
    click.echo(f"started {run_path}")


@runs_group.command("send")
@click.argument("run_path")
@click.argument("event_type", metavar="TYPE")
@click.option("--key", help="The event's key (what a wait_for(type, key=...) matches).")
@click.option("--data", default="{}", help="More fields of the event, as a JSON object.")
@config_option
def runs_send(run_path: str, event_type: str, key: str | None, data: str, config: Path | None) -> None:
    """Send a run an event: {"type": TYPE, "key": KEY, ...DATA}."""
    from .._runs.listing import send_event

    fields = _json_option("--data", data)
    if not isinstance(fields, dict):
        _fail_config(ConfigError("--data must be a JSON object"))
    event = {**fields, "type": event_type, **({"key": key} if key is not None else {})}
    try:
        trio.run(send_event, _settings(config), run_path, event)
    except ConfigError as error:
        _fail_config(error)
    click.echo(f"sent {event_type} to {run_path}")


@runs_group.command("cancel")
@click.argument("run_path")
@click.option("--reason", help="Why, kept in the run's journal.")
@config_option
def runs_cancel(run_path: str, reason: str | None, config: Path | None) -> None:
    """Cancel a run: the step in flight is cut, the run ends `cancelled`, no later event resumes it."""
    from .._runs.listing import cancel_run

    try:
        trio.run(cancel_run, _settings(config), run_path, reason)
    except ConfigError as error:
        _fail_config(error)
    click.echo(f"cancelling {run_path}")


def _json_option(name: str, text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError as error:
        _fail_config(ConfigError(f"{name} is not JSON: {error}"))
