"""Log configuration for the CLI. Library code never calls this: embedding apps configure their own."""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import MutableMapping
from typing import Any, Literal, TextIO

import structlog

from .._secrets import Redactor

LogFormat = Literal["auto", "json", "console"]
LEVELS = ("debug", "info", "warning", "error")

# Belt and braces: tokens are never passed to the logger, but if a bearer
# credential ever shows up in a message, it is masked before it is written.
_BEARER = re.compile(r"(?i)(bearer\s+)[A-Za-z0-9._~+/=-]+")


def _redact(_logger: object, _name: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    for key, value in event.items():
        if isinstance(value, str) and "earer" in value:
            event[key] = _BEARER.sub(r"\1[redacted]", value)
    return event


def processors(
    renderer: structlog.typing.Processor, redactor: Redactor | None = None
) -> list[structlog.typing.Processor]:
    """The processor chain of `configure_logging`, ending in `renderer`.

    Redaction comes after format_exc_info, so a token quoted in a traceback is caught too;
    the exact-value redactor (the runner's known secrets) runs before the Bearer pattern.
    """
    chain: list[structlog.typing.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.format_exc_info,
    ]
    if redactor is not None:
        chain.append(redactor.processor)
    chain += [_redact, renderer]
    return chain


def configure_logging(
    level: str = "info", fmt: LogFormat = "auto", stream: TextIO | None = None, redactor: Redactor | None = None
) -> None:
    """JSON lines when the output is not a terminal (journald, shippers), readable text when it is.

    `redactor`: the runner's known secrets (`Runner.redactor`), replaced in every logged value.
    """
    out = stream or sys.stdout
    use_json = fmt == "json" or (fmt == "auto" and not out.isatty())
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer() if use_json else structlog.dev.ConsoleRenderer(colors=out.isatty())
    )
    structlog.configure(
        processors=processors(renderer, redactor),
        wrapper_class=structlog.make_filtering_bound_logger(getattr(logging, level.upper())),
        logger_factory=structlog.PrintLoggerFactory(out),
        cache_logger_on_first_use=False,
    )
    # Libraries that log through the standard library (httpx, hypercorn) stay quiet unless it matters.
    logging.basicConfig(level=logging.WARNING, stream=out, format="%(levelname)s %(name)s: %(message)s", force=True)
    if redactor is not None:
        for handler in logging.getLogger().handlers:
            handler.addFilter(_RedactingFilter(redactor))


class _RedactingFilter(logging.Filter):
    """The same exact-value redaction for what libraries log through the standard library."""

    def __init__(self, redactor: Redactor) -> None:
        super().__init__()
        self.redactor = redactor

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        redacted = self.redactor.redact(message)
        if redacted != message:
            record.msg, record.args = redacted, None
        return True
