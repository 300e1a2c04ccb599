"""Configuration: defaults < TOML file < PULLWAKE_* environment < explicit overrides (CLI flags)."""

from __future__ import annotations

import fnmatch
import ipaddress
import os
import re
import socket
import tomllib
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    InitSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
)

from .errors import ConfigError

CREDENTIAL_NAME = "pullwake-token"
"""The name of the systemd credential holding the service token (LoadCredential=)."""

_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")

UNIX_PATH_MAX = 107
"""The longest path a Unix socket can be bound to on Linux (sun_path is 108 bytes with its NUL)."""


def unix_socket_path_problem(path: Path) -> str | None:
    """Why `path` cannot be a Unix socket's address (too long for AF_UNIX), or None."""
    length = len(os.fsencode(path))
    if length > UNIX_PATH_MAX:
        return f"{path} is {length} bytes long; a Unix socket path can be at most {UNIX_PATH_MAX}"
    return None


def _default_runner_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


def _stream_path(value: str) -> str:
    path = value.strip().strip("/")
    if not path:
        raise ValueError("must name a stream, e.g. 'wake/pool'")
    if "?" in path or "#" in path or any(part in ("", ".", "..") for part in path.split("/")):
        raise ValueError(f"{value!r} is not a valid stream path")
    return path


def _one_line(text: str) -> str:
    """A file's content without the one line ending an editor adds; a second line stays (and is refused)."""
    for ending in ("\r\n", "\n"):
        if text.endswith(ending):
            return text[: -len(ending)]
    return text


def _checked_token(token: str, source: str) -> str:
    """`token` without surrounding spaces, if an HTTP header can carry it; else one `ConfigError` line.

    The message names where the token came from and what is wrong, never the token itself.
    """
    token = token.strip(" ")
    if "\n" in token or "\r" in token:
        raise ConfigError(f"{source}: the token is more than one line; it must be a single line")
    if any(ord(char) < 0x20 or ord(char) == 0x7F for char in token):
        raise ConfigError(f"{source}: the token contains control characters (tabs, escapes, NUL)")
    if not token.isascii():
        raise ConfigError(f"{source}: the token is not ASCII; an HTTP Authorization header cannot carry it")
    return token


class SubscriptionSpec(BaseModel):
    """One pull-wake subscription this runner serves (and, if `manage`, keeps in place)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(description="Subscription id on the server.")
    pattern: str | None = Field(None, description="Glob of streams to follow, e.g. 'jobs/*'.")
    streams: tuple[str, ...] = Field((), description="Explicit list of streams to follow.")
    lease_ttl_ms: int = Field(30_000, ge=1_000, le=600_000, description="Lease length the server grants a claim.")
    description: str | None = None
    handler: str | None = Field(None, description="Python handler as 'module:function'.")
    workflow: str | None = Field(
        None, description="Durable-run workflow as 'module:function': each stream is a run (docs/design.md §9)."
    )
    command: tuple[str, ...] | None = Field(None, description="External command handler: argv list.")
    command_env_passthrough: bool = Field(
        False,
        description="Give the command the runner's token variables (PULLWAKE_TOKEN, PULLWAKE_TOKEN_FILE, "
        "CREDENTIALS_DIRECTORY); withheld by default.",
    )
    manage: bool = Field(True, description="Create/confirm the subscription on the server after every connect.")
    dead_letter_stream: str | None = Field(None, description="Where exhausted batches go; overrides the default.")

    @field_validator("id")
    @classmethod
    def _valid_id(cls, value: str) -> str:
        if not _ID.match(value):
            raise ValueError("must be letters, digits, '.', '_' or '-' (no slashes)")
        return value

    @field_validator("streams")
    @classmethod
    def _valid_streams(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(_stream_path(stream) for stream in value)

    @field_validator("command")
    @classmethod
    def _valid_command(cls, value: tuple[str, ...] | None) -> tuple[str, ...] | None:
        if value is not None and not value:
            raise ValueError("must name a program to run")
        return value

    @model_validator(mode="after")
    def _coherent(self) -> SubscriptionSpec:
        if self.manage and not self.pattern and not self.streams:
            raise ValueError("a managed subscription needs 'pattern' or 'streams'")
        if sum(1 for kind in (self.handler, self.command, self.workflow) if kind) > 1:
            raise ValueError("give one of 'handler', 'command' or 'workflow'")
        return self


_toml_file: ContextVar[Path | None] = ContextVar("_toml_file", default=None)


class Settings(BaseSettings):
    """Everything the runner can be told. Every key can come from `PULLWAKE_<KEY>`."""

    model_config = SettingsConfigDict(env_prefix="PULLWAKE_", extra="forbid", validate_default=True)

    # Where the work is
    server_url: str = Field("http://127.0.0.1:4437", description="Base URL of the Durable Streams server.")
    stream_root: str = Field("/v1/stream", description="Path under which the server keeps streams.")
    runner_id: str = Field(default_factory=_default_runner_id, description="Worker name used when claiming.")
    wake_stream: str = Field("wake/pool", description="The wake stream this runner follows.")
    subscriptions: tuple[SubscriptionSpec, ...] = ()
    state_dir: Path | None = Field(None, description="Where the wake offset checkpoint is kept.")

    # Credentials and TLS
    token: SecretStr | None = Field(None, description="Service bearer token for the server.")
    token_file: Path | None = Field(None, description="File holding the service token.")
    ca_file: Path | None = Field(None, description="Extra CA bundle to verify the server's certificate.")
    verify_tls: bool = Field(True, description="Verify the server's TLS certificate.")

    # The wire
    live_mode: Literal["sse", "long-poll"] = Field("sse", description="How to follow the wake stream.")
    request_timeout: float = Field(10.0, gt=0, description="Bound on every request except the live stream.")
    connect_timeout: float = Field(10.0, gt=0, description="Bound on opening the wake stream.")
    keepalive_timeout: float = Field(
        75.0,
        gt=0,
        description="Silence on the live stream that counts as dead, unless liveness probes find the server "
        "answering with nothing missed meanwhile (servers without idle keep-alives). Keep it above the server's "
        "keep-alive interval.",
    )
    long_poll_timeout: float = Field(30.0, gt=0, description="How long the server holds a long-poll.")
    request_deadline: float = Field(60.0, gt=0, description="Total time one request may take, body included.")
    max_response_bytes: int = Field(
        16 * 1024 * 1024, ge=64 * 1024, description="Largest response body accepted (the live stream excepted)."
    )
    max_event_bytes: int = Field(1024 * 1024, ge=4 * 1024, description="Largest live-stream event or line accepted.")
    http_transport: Literal["lean", "httpx"] = Field(
        "lean", description="HTTP/1.1 transport: the runner's own ('lean') or httpx's default ('httpx')."
    )

    # Liveness
    heartbeat_interval: float = Field(5.0, gt=0, description="Seconds between liveness probes.")
    heartbeat_timeout: float = Field(3.0, gt=0, description="Bound on one liveness probe (at most the interval).")
    heartbeat_failure_threshold: int = Field(2, ge=1, description="Consecutive failed probes that reset.")
    backoff_initial: float = Field(1.0, gt=0, description="First reconnect delay.")
    backoff_max: float = Field(30.0, gt=0, description="Longest reconnect delay.")
    backoff_jitter: float = Field(0.2, ge=0, lt=1, description="Fraction by which a delay may be shortened.")

    # Work
    max_concurrent_claims: int = Field(16, ge=1, description="Claims worked on at once (gap replays: as many again).")
    sweep_interval: float = Field(300.0, gt=0, description="How often every served subscription is claimed.")
    handler_max_attempts: int = Field(3, ge=1, description="Tries per batch before giving up on it.")
    handler_retry_initial: float = Field(1.0, gt=0, description="Delay before the first retry of a batch.")
    handler_retry_max: float = Field(30.0, gt=0, description="Longest delay between retries of a batch.")
    handler_timeout: float | None = Field(None, gt=0, description="Bound on one handler call (none if unset).")
    command_kill_grace: float = Field(5.0, gt=0, description="SIGTERM-to-SIGKILL grace for command handlers.")
    command_output_cap: int = Field(
        65_536,
        ge=1_024,
        description="Bytes of a command's stdout and of its stderr kept (the tail); the rest is read and dropped.",
    )
    cooldown: float = Field(30.0, ge=0, description="Pause before reclaiming a subscription that failed.")
    dead_letter_stream: str | None = Field(None, description="Default stream for exhausted batches.")
    on_subscription_lost: Literal["replay", "skip"] = Field(
        "replay", description="Events the server skipped when it re-created a subscription: replay or skip them."
    )

    # Live changes: a reload (`Runner.reload`, SIGHUP, `pullwake reload`) reads these from the new configuration
    delete_removed_subscriptions: bool = Field(
        False,
        description="A reload deletes on the server each managed subscription it removed, once its claim in "
        "flight has ended; otherwise the server keeps it (and its events pile up).",
    )
    on_subscription_changed: Literal["keep", "replace"] = Field(
        "keep",
        description="A reload that changes a managed subscription's pattern, streams, lease or description: "
        "'keep' the server's version (one warning says what differs) or 'replace' it (delete and create: "
        "streams are linked again at their tail and the gap is replayed from the acknowledged offsets).",
    )

    # A fleet (docs/design.md §5.9)
    fleet: bool = Field(True, description="Know the other runners of this wake stream: one claimant per wake.")
    fleet_stream: str | None = Field(
        None, description="Stream the runners of one wake stream share (default __pullwake/fleet/<wake_stream>)."
    )
    fleet_interval: float = Field(5.0, gt=0, description="How often a runner says it is alive on the fleet stream.")
    fleet_fallback: float = Field(
        1.0, ge=0, description="How long the next runner in line waits for the first to take a wake."
    )

    # Stopping
    drain_timeout: float = Field(30.0, ge=0, description="How long stop() lets in-flight claims finish.")
    finalizer_timeout: float = Field(5.0, gt=0, description="Bound on a cancelled claim's ack and release.")
    checkpoint_interval: float = Field(
        1.0, gt=0, description="Most frequent write of the wake offset checkpoint, and of the journal after acks."
    )

    # Control and observation
    control_stream: str | None = Field(None, description="Stream of control events (default runners/<id>/control).")
    control_stream_enabled: bool = Field(True, description="Follow the control stream for remote aborts.")
    control_socket: Path | None = Field(None, description="Unix socket for status, health, metrics and abort.")
    metrics_listen: str | None = Field(None, description="Loopback host:port serving /healthz and /metrics.")
    stuck_after: float = Field(60.0, gt=0, description="Not following the wake stream this long is unhealthy.")

    @field_validator("server_url")
    @classmethod
    def _valid_url(cls, value: str) -> str:
        if not re.match(r"^https?://[^/\s]+", value):
            raise ValueError("must be an http:// or https:// URL")
        return value.rstrip("/")

    @field_validator("stream_root")
    @classmethod
    def _valid_root(cls, value: str) -> str:
        return "/" + value.strip("/") if value.strip("/") else ""

    @field_validator("runner_id")
    @classmethod
    def _valid_runner_id(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be empty")
        return value

    @field_validator("wake_stream", "dead_letter_stream", "control_stream", "fleet_stream")
    @classmethod
    def _valid_stream(cls, value: str | None) -> str | None:
        return None if value is None else _stream_path(value)

    @field_validator("ca_file")
    @classmethod
    def _readable_file(cls, value: Path | None) -> Path | None:
        if value is not None and not value.is_file():
            raise ValueError(f"{value} is not a readable file")
        return value

    @field_validator("metrics_listen")
    @classmethod
    def _loopback_listener(cls, value: str | None) -> str | None:
        if value is None:
            return None
        host, _, port = value.rpartition(":")
        if host not in ("127.0.0.1", "localhost", "[::1]") or not port.isdigit():
            raise ValueError("must be a loopback host:port such as 127.0.0.1:9464")
        if int(port) > 65_535:
            raise ValueError(f"port {port} is out of range (0-65535)")
        return value

    @field_validator("control_socket")
    @classmethod
    def _bindable_socket(cls, value: Path | None) -> Path | None:
        if value is not None and (problem := unix_socket_path_problem(value)):
            raise ValueError(problem)
        return value

    @model_validator(mode="after")
    def _coherent(self) -> Settings:
        if self.backoff_max < self.backoff_initial:
            raise ValueError("backoff_max must be at least backoff_initial")
        if self.heartbeat_timeout > self.heartbeat_interval:
            raise ValueError("heartbeat_timeout must not exceed heartbeat_interval")
        ids = [spec.id for spec in self.subscriptions]
        if duplicates := sorted({i for i in ids if ids.count(i) > 1}):
            raise ValueError(f"subscription ids must be unique: {', '.join(duplicates)}")
        if self.token is not None and self.token_file is not None:
            raise ValueError("give either token or token_file, not both")
        if self.fleet:
            for spec in self.subscriptions:
                if spec.pattern and fnmatch.fnmatchcase(self.fleet_stream_path, spec.pattern):
                    raise ValueError(
                        f"subscription {spec.id!r}: its pattern {spec.pattern!r} matches the fleet stream "
                        f"{self.fleet_stream_path}: set fleet_stream to a path it does not match"
                    )
        return self

    @property
    def control_stream_path(self) -> str:
        return self.control_stream or f"runners/{self.runner_id}/control"

    @property
    def fleet_stream_path(self) -> str:
        return self.fleet_stream or f"__pullwake/fleet/{self.wake_stream}"

    def service_token(self) -> SecretStr | None:
        """The service token: `token`, else `token_file`, else the systemd credential.

        Raises `ConfigError` naming the source (never the value) when the token cannot go
        into an HTTP header as it is: more than one line, control characters, or not ASCII.
        """
        if self.token is not None:
            return SecretStr(_checked_token(self.token.get_secret_value(), "token (setting or PULLWAKE_TOKEN)"))
        candidates = [(self.token_file, f"token_file {self.token_file}")] if self.token_file else []
        if credentials := os.environ.get("CREDENTIALS_DIRECTORY"):
            path = Path(credentials) / CREDENTIAL_NAME
            candidates.append((path, f"systemd credential {CREDENTIAL_NAME} ({path})"))
        for path, source in candidates:
            try:
                text = path.read_bytes().decode("utf-8", errors="surrogateescape")
            except OSError as exc:
                if path == self.token_file:
                    raise ConfigError(f"token_file: cannot read {path}: {exc.strerror}") from exc
                continue
            secret = _checked_token(_one_line(text), source)
            # An empty credential file means "no token" (the unit's LoadCredential= needs a file).
            return SecretStr(secret) if secret else None
        return None

    def subscription(self, subscription_id: str) -> SubscriptionSpec | None:
        return next((spec for spec in self.subscriptions if spec.id == subscription_id), None)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        path = _toml_file.get()
        file_values = _read_toml(path) if path is not None else {}
        return init_settings, env_settings, InitSettingsSource(settings_cls, init_kwargs=file_values)


LIVE_SETTINGS = frozenset({"subscriptions", "delete_removed_subscriptions", "on_subscription_changed"})
"""What a reload applies; every other setting keeps the value the run started with."""


def fixed_settings_changed(old: Settings, new: Settings) -> list[str]:
    """The settings that differ between `old` and `new` but cannot change while running (names, never values)."""
    return sorted(
        name for name in Settings.model_fields if name not in LIVE_SETTINGS and getattr(old, name) != getattr(new, name)
    )


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as file:
            return tomllib.load(file)
    except FileNotFoundError as exc:
        raise ConfigError(f"config file {path} does not exist") from exc
    except OSError as exc:
        raise ConfigError(f"config file {path}: {exc.strerror}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from exc


@contextmanager
def _reading(path: Path | None) -> Iterator[None]:
    token = _toml_file.set(path)
    try:
        yield
    finally:
        _toml_file.reset(token)


def describe_validation_error(error: ValidationError) -> str:
    lines = []
    for problem in error.errors():
        key = ".".join(str(part) for part in problem["loc"]) or "(top level)"
        message = problem["msg"].removeprefix("Value error, ")
        if problem["type"] == "extra_forbidden":
            message = "unknown key"
        lines.append(f"  {key}: {message}")
    return "invalid configuration:\n" + "\n".join(lines)


def _describe_settings_error(error: ValueError) -> str:
    """One line for what pydantic-settings raises before validation: a complex value that does not parse.

    It says which field and source (`error parsing value for field "subscriptions" from source
    "EnvSettingsSource"`) and chains the JSON error; the line names the variable and the JSON problem.
    """
    found = re.search(r'field "(\w+)" from source "(\w+)"', str(error))
    if found is None:
        return "invalid configuration: " + " ".join(str(error).split())
    field, source = found.groups()
    where = f"PULLWAKE_{field.upper()}" if source == "EnvSettingsSource" else f"{field} (from {source})"
    cause = error.__cause__ or error.__context__
    if cause is None:
        return f"{where}: cannot be parsed"
    what = "is not valid JSON" if isinstance(cause, ValueError) else "cannot be parsed"
    return f"{where} {what}: " + " ".join(str(cause).split())


def load_settings(config_file: Path | str | None = None, overrides: Mapping[str, Any] | None = None) -> Settings:
    """Build the settings from a TOML file, the environment and explicit overrides.

    Raises `ConfigError`: one line for one problem, else a heading and one line per bad key.
    """
    path = Path(config_file) if config_file is not None else None
    with _reading(path):
        try:
            return Settings(**dict(overrides or {}))
        except ValidationError as exc:
            heading, *problems = describe_validation_error(exc).splitlines()
            if len(problems) == 1:
                raise ConfigError(f"{heading} {problems[0].strip()}") from None
            raise ConfigError("\n".join([heading, *problems])) from None
        except (SettingsError, ValueError) as exc:  # a complex env value (PULLWAKE_SUBSCRIPTIONS) that is not JSON
            raise ConfigError(_describe_settings_error(exc)) from None


def _is_loopback(host: str) -> bool:
    if host.lower() in ("localhost", "localhost."):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _token_configured(settings: Settings) -> bool:
    try:
        return settings.service_token() is not None
    except ConfigError:
        return True  # a token was given, only a broken one; `check` says so, here it counts as sent


def operator_warnings(settings: Settings) -> list[str]:
    """What an operator must hear once at start: settings that work but expose the server or the token.

    Not errors: development setups use them on purpose. The caller logs each at WARNING.
    """
    warnings = []
    url = urlsplit(settings.server_url)
    if not settings.verify_tls and url.scheme == "https":
        warnings.append(
            "verify_tls = false: the server's TLS certificate is not checked, so anyone on the path "
            "can pose as the server and read the token and the events"
        )
    elif not settings.verify_tls:
        warnings.append(
            "verify_tls = false has no effect on an http:// server_url, and would turn checks off for https"
        )
    if url.scheme == "http" and not _is_loopback(url.hostname or "") and _token_configured(settings):
        warnings.append(
            f"the service token is sent over plain http to {url.hostname}, readable by anyone on the path: "
            "use an https:// server_url"
        )
    return warnings


def check_state_dir(state_dir: Path) -> None:
    """ConfigError (one line) if `state_dir` is not, and cannot become, a writable directory.

    Creates nothing (`config check` runs this too): it looks at the nearest part that exists.
    """
    existing = state_dir
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"state_dir {state_dir}: {existing} exists and is not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"state_dir {state_dir}: {existing} is not writable by this user")
