"""systemd integration for `pullwake run`: the sd_notify(3) protocol and the watchdog.

The protocol is one datagram of `KEY=value` lines to the socket named by
$NOTIFY_SOCKET; it is written here directly, so no libsystemd is needed.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable

import structlog
import trio

log = structlog.get_logger("pullwake.systemd")

Progress = Callable[[], tuple[bool, str]]


class Notifier:
    """Sends notifications to systemd; does nothing when not started by systemd.

    `redact` (e.g. `Redactor.redact`) is applied to every line: `systemctl status` shows
    STATUS= to every user of the machine, and a status can quote a server's error text.
    """

    def __init__(self, address: str | None, redact: Callable[[str], str] | None = None) -> None:
        self.address = address
        self.redact = redact
        self._socket: socket.socket | None = None
        if address:
            self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)

    @classmethod
    def from_environment(cls, redact: Callable[[str], str] | None = None) -> Notifier:
        return cls(os.environ.get("NOTIFY_SOCKET"), redact)

    @property
    def enabled(self) -> bool:
        return self._socket is not None

    def send(self, *lines: str) -> None:
        if self._socket is None or self.address is None:
            return
        # A leading '@' names a socket in the abstract namespace.
        target = "\0" + self.address[1:] if self.address.startswith("@") else self.address
        # One KEY=value per line: a newline inside a value (an error text) must not start a new key.
        message = "\n".join(" ".join(line.splitlines()) for line in lines)
        if self.redact is not None:
            message = self.redact(message)
        try:
            self._socket.sendto(message.encode(), target)
        except OSError as exc:
            log.warning("systemd.notify_failed", error=str(exc))

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None


def watchdog_interval() -> float | None:
    """Half of WatchdogSec= (from $WATCHDOG_USEC), if systemd asked this process for pings."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        return int(usec) / 1_000_000 / 2
    except ValueError:
        return None


async def keep_watchdog(notifier: Notifier, progressing: Progress, interval: float) -> None:
    """Ping WATCHDOG=1 every `interval` while the runner makes progress; withhold it when it does not.

    Withholding is the point: systemd then restarts a runner that is alive but wedged.
    """
    withheld = False
    while True:
        ok, reason = progressing()
        if ok:
            notifier.send("WATCHDOG=1")
            if withheld:
                log.warning("watchdog.resumed")
            withheld = False
        elif not withheld:
            withheld = True
            log.error("watchdog.withheld", reason=reason, detail="systemd will restart the runner")
            notifier.send(f"STATUS=wedged: {reason}")
        await trio.sleep(interval)
