"""Keep secrets out of every text the runner shows: logs, health, status, sd_notify.

A `Redactor` knows the exact secret values in play (the service token, the claim
tokens of the claims held right now) and replaces each of them with `[redacted]`
in any text. A pattern (`Bearer …`) only catches the forms someone thought of; a
server error that echoes the token, or a header value quoted in an exception, is
caught only by looking for the value itself.
"""

from __future__ import annotations

import threading
from collections import Counter, deque
from collections.abc import Iterator, Mapping, MutableMapping
from contextlib import contextmanager
from typing import Any, Final

from pydantic import SecretStr

REDACTED: Final = "[redacted]"

# Claim tokens are forgotten when their claim ends, but a late log line about that claim
# may still quote one: the last few stay redacted for a while, within a fixed bound.
_RECENTLY_FORGOTTEN = 64

# Values that cannot hold a secret in their rendering; everything else is checked as text.
_PLAIN = (int, float, bool, type(None))


def _plain_value(secret: str | SecretStr | None) -> str | None:
    value = secret.get_secret_value() if isinstance(secret, SecretStr) else secret
    return value or None


class Redactor:
    """Replaces the exact secret values it was given with `[redacted]`.

    Safe to use from worker threads (sync handlers log from them): the list of values is
    rebuilt under a lock and read as one reference.

    No regular expression: one over every token held or recently forgotten (~70 long
    alternatives) takes ~20 ms to compile, and the set changes with every claim.
    Plain substring checks cost microseconds per log value.
    """

    def __init__(self, *secrets: str | SecretStr | None) -> None:
        self._lock = threading.Lock()
        self._kept: set[str] = set()
        self._held: Counter[str] = Counter()
        self._recent: deque[str] = deque(maxlen=_RECENTLY_FORGOTTEN)
        self._values: tuple[str, ...] = ()
        """Longest first, so a secret that contains another is replaced whole."""
        for secret in secrets:
            self.keep(secret)

    def keep(self, secret: str | SecretStr | None) -> None:
        """Redact this value for good (the service token). Idempotent: a restart does not stack it."""
        value = _plain_value(secret)
        if value is None or value in self._kept:
            return
        with self._lock:
            self._kept.add(value)
            self._rebuild()

    def add(self, secret: str | SecretStr | None) -> None:
        """Redact this value from now on. Adding the same value twice needs two `forget`s."""
        value = _plain_value(secret)
        if value is None:
            return
        with self._lock:
            self._held[value] += 1
            self._rebuild()

    def forget(self, secret: str | SecretStr | None) -> None:
        """The value is no longer in use (a claim ended); it stays redacted among the recent few."""
        value = _plain_value(secret)
        if value is None:
            return
        with self._lock:
            if self._held[value] <= 1:
                del self._held[value]
                self._recent.append(value)
            else:
                self._held[value] -= 1
            self._rebuild()

    @contextmanager
    def holding(self, secret: str | SecretStr | None) -> Iterator[None]:
        """Redact `secret` for the duration of the block (e.g. while a claim token is held)."""
        self.add(secret)
        try:
            yield
        finally:
            self.forget(secret)

    def _rebuild(self) -> None:
        values = tuple(sorted(self._kept | set(self._held) | set(self._recent), key=len, reverse=True))
        self._values = values

    def redact(self, text: str) -> str:
        """`text` with every known secret replaced by `[redacted]`."""
        values = self._values
        if not values or len(text) < len(values[-1]):
            return text
        for value in values:
            if value in text:
                text = text.replace(value, REDACTED)
        return text

    def redact_value(self, value: Any) -> Any:
        """A copy of a log value with secrets redacted: strings, containers, and anything rendered as text."""
        if not self._values or isinstance(value, _PLAIN):
            return value
        if isinstance(value, str):
            return self.redact(value)
        if isinstance(value, Mapping):
            return {key: self.redact_value(item) for key, item in value.items()}
        if isinstance(value, list | tuple | set | frozenset):
            return [self.redact_value(item) for item in value]
        # An exception or any object the renderer turns into text: redact that text if it needs it.
        text = str(value)
        redacted = self.redact(text)
        return value if redacted == text else redacted

    def processor(self, _logger: object, _name: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
        """A structlog processor: every value of the event, redacted. Place it after format_exc_info."""
        if not self._values:
            return event
        for key, value in event.items():
            event[key] = self.redact_value(value)
        return event
