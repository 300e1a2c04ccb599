"""The token at the edges: what is accepted, what is redacted, and what the operator is warned about."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import structlog
import trio
from pydantic import SecretStr

from runner import Settings
from runner._config import operator_warnings
from runner._secrets import REDACTED, Redactor
from runner._service.logs import processors
from runner._service.systemd import Notifier
from runner.errors import ConfigError

TOKEN = "tok-3f9a1c77e2b64d0c"
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def no_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("CREDENTIALS_DIRECTORY", "PULLWAKE_TOKEN", "PULLWAKE_TOKEN_FILE"):
        monkeypatch.delenv(name, raising=False)


# -- token hygiene: what an HTTP header can carry ---------------------------------------------

BAD_TOKENS = {
    "two lines": (TOKEN + "\nsecond-line", "more than one line"),
    "an extra line": (TOKEN + "\n\n", "more than one line"),
    "a carriage return": (TOKEN + "\r", "more than one line"),
    "an escape": (TOKEN + "\x1b[2J", "control characters"),
    "a NUL": (TOKEN + "\x00", "control characters"),
    "a tab": ("tok\t" + TOKEN, "control characters"),
    "non-ASCII": (TOKEN + "é", "not ASCII"),
}


def _settings_with_token(source: str, token: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Settings:
    if source == "token":
        return Settings(token=SecretStr(token))
    if source == "token_file":
        (tmp_path / "token").write_bytes(token.encode("utf-8", "surrogateescape"))
        return Settings(token_file=tmp_path / "token")
    (tmp_path / "pullwake-token").write_bytes(token.encode("utf-8", "surrogateescape"))
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
    return Settings()


@pytest.mark.parametrize("source", ["token", "token_file", "credential"])
@pytest.mark.parametrize("case", sorted(BAD_TOKENS))
def test_a_token_no_header_can_carry_is_one_clear_error_naming_its_source(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, source: str, case: str
) -> None:
    token, problem = BAD_TOKENS[case]
    if source == "token" and case == "an extra line":
        token = TOKEN + "\n"  # a setting has no file line ending to forgive
    settings = _settings_with_token(source, token, tmp_path, monkeypatch)
    with pytest.raises(ConfigError) as error:
        settings.service_token()
    message = str(error.value)
    assert problem in message
    assert {"token": "token (setting", "token_file": "token_file", "credential": "systemd credential"}[
        source
    ] in message
    assert "\n" not in message, "one line"
    assert TOKEN not in message, "the error never shows the token"


def test_bytes_that_are_not_utf8_in_a_token_file_are_refused(tmp_path: Path) -> None:
    (tmp_path / "token").write_bytes(TOKEN.encode() + b"\xff\xfe")
    with pytest.raises(ConfigError, match="not ASCII"):
        Settings(token_file=tmp_path / "token").service_token()


@pytest.mark.parametrize("source", ["token_file", "credential"])
@pytest.mark.parametrize("ending", ["\n", "\r\n", ""])
def test_one_line_ending_in_a_token_file_is_fine(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, source: str, ending: str
) -> None:
    token = _settings_with_token(source, TOKEN + ending, tmp_path, monkeypatch).service_token()
    assert token is not None
    assert token.get_secret_value() == TOKEN


def test_config_check_refuses_a_token_file_with_an_extra_line_in_one_line_and_exit_78(tmp_path: Path) -> None:
    (tmp_path / "token").write_text(TOKEN + "\nextra\n")
    env = {
        **os.environ,
        "PULLWAKE_TOKEN_FILE": str(tmp_path / "token"),
        "PULLWAKE_SUBSCRIPTIONS": json.dumps(
            [{"id": "jobs", "pattern": "jobs/*", "handler": "runner.examples:log_batch"}]
        ),
    }
    result = subprocess.run(
        [sys.executable, "-m", "runner", "config", "check"], env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 78
    assert result.stderr.strip().splitlines() == [
        f"pullwake: token_file {tmp_path / 'token'}: the token is more than one line; it must be a single line"
    ]
    assert TOKEN not in result.stdout + result.stderr


# -- redaction: the exact value, everywhere ---------------------------------------------------


def rendered_log(redactor: Redactor | None, **event: object) -> str:
    """One event through the CLI's real processor chain (JSON), as it would be written."""
    lines: list[str] = []

    class Collect:
        def msg(self, message: str) -> None:
            lines.append(message)

        error = msg

    logger = structlog.wrap_logger(Collect(), processors=processors(structlog.processors.JSONRenderer(), redactor))
    logger.error("claim.failed", **event)
    return "\n".join(lines)


def test_a_token_echoed_in_an_error_text_never_reaches_the_rendered_log_line() -> None:
    claim_token = "eyJzdWIiOiJjbGFpbS1zZWNyZXQifQ"
    redactor = Redactor(SecretStr(TOKEN))
    try:
        raise RuntimeError(f"server said: invalid credentials {TOKEN!r}")
    except RuntimeError:
        with redactor.holding(claim_token):
            line = rendered_log(
                redactor,
                error=f"401 from server: token {TOKEN} refused",
                response={"echo": [f"Authorization: Bearer {claim_token}", TOKEN]},
                cause=ValueError(f"bad header {TOKEN}"),
                exc_info=True,
            )
    assert TOKEN not in line
    assert claim_token not in line
    assert REDACTED in line
    document = json.loads(line)
    assert document["error"] == f"401 from server: token {REDACTED} refused"
    assert "invalid credentials" in document["exception"], "the traceback is kept, less the token"


def test_the_bearer_pattern_still_masks_a_token_nobody_registered() -> None:
    line = rendered_log(Redactor(), error="sent Authorization: Bearer abc.def-ghi")
    assert "abc.def-ghi" not in line


def test_a_claim_token_stays_redacted_a_while_after_its_claim_ends_and_then_is_forgotten() -> None:
    redactor = Redactor()
    with redactor.holding("claim-one"), redactor.holding("claim-one"):
        assert redactor.redact("x claim-one x") == f"x {REDACTED} x"
    assert redactor.redact("late: claim-one") == f"late: {REDACTED}"
    for n in range(100):  # many later claims push it out: the set stays bounded
        with redactor.holding(f"claim-later-{n:03}"):
            pass
    assert redactor.redact("claim-one") == "claim-one"


def test_a_kept_secret_is_kept_once_and_for_good() -> None:
    redactor = Redactor()
    for _ in range(3):  # start, stop, start...
        redactor.keep(SecretStr(TOKEN))
    redactor.keep(None)
    for n in range(100):
        with redactor.holding(f"claim-{n:03}"):
            pass
    assert redactor.redact(TOKEN) == REDACTED


def test_a_secret_inside_another_is_replaced_whole() -> None:
    redactor = Redactor("abc", "abcdef")
    assert redactor.redact("abcdef abc") == f"{REDACTED} {REDACTED}"


async def test_sd_notify_status_is_redacted_and_stays_one_key_per_line(tmp_path: Path) -> None:
    address = tmp_path / "notify.sock"
    listener = trio.socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    with listener:
        await listener.bind(str(address))
        notifier = Notifier(str(address), redact=Redactor(TOKEN).redact)
        try:
            notifier.send(f"STATUS=reconnecting: 401 for token {TOKEN}\nWATCHDOG=1")
        finally:
            notifier.close()
        with trio.fail_after(5):
            message = (await listener.recv(4096)).decode()
    assert TOKEN not in message
    assert message.splitlines() == [f"STATUS=reconnecting: 401 for token {REDACTED} WATCHDOG=1"]


# -- operator warnings -----------------------------------------------------------------------


def test_no_warning_for_a_safe_configuration() -> None:
    assert operator_warnings(Settings(server_url="https://streams.example", token=SecretStr(TOKEN))) == []
    assert operator_warnings(Settings(server_url="http://127.0.0.1:4437", token=SecretStr(TOKEN))) == []
    assert operator_warnings(Settings(server_url="http://localhost:4437", token=SecretStr(TOKEN))) == []
    assert operator_warnings(Settings(server_url="http://[::1]:4437", token=SecretStr(TOKEN))) == []
    assert operator_warnings(Settings(server_url="http://streams.example")) == [], "no token, nothing to leak"


def test_turning_tls_verification_off_is_a_warning() -> None:
    (warning,) = operator_warnings(Settings(server_url="https://streams.example", verify_tls=False))
    assert "verify_tls = false" in warning


@pytest.mark.parametrize("host", ["streams.example", "10.0.0.7", "[2001:db8::1]"])
def test_a_token_over_plain_http_to_another_host_is_a_warning(tmp_path: Path, host: str) -> None:
    (warning,) = operator_warnings(Settings(server_url=f"http://{host}:4437", token=SecretStr(TOKEN)))
    assert "plain http" in warning
    assert host.strip("[]") in warning
    assert TOKEN not in warning
    (tmp_path / "token").write_text(TOKEN + "\n")
    assert operator_warnings(Settings(server_url=f"http://{host}", token_file=tmp_path / "token")) == [warning]


def test_a_token_echoed_by_the_server_never_reaches_health_or_status() -> None:
    from runner import Runner

    secret = "tok-echoed-1234"
    runner = Runner(Settings(token=SecretStr(secret)), handlers={"jobs": lambda batch: None})
    runner.check()
    runner._vitals.error(f"claim jobs: 401 TOKEN_INVALID token {secret} refused")  # what a server echo turns into
    snapshot = json.dumps(runner.health().to_dict())
    assert secret not in snapshot
    assert REDACTED in snapshot
