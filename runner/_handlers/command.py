"""External commands as handlers (docs/design.md §5.6): the batch as JSON on stdin, the exit status as the verdict.

Exit 0 is success, 75 (EX_TEMPFAIL) asks for a retry, anything else fails the
batch for good; on cancellation the command gets SIGTERM, then SIGKILL after a
grace period, and so does everything it started.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

import trio

from ..errors import ConfigError, PermanentFailure
from .batch import Batch, HandlerResult

EX_TEMPFAIL: Final = 75

DEFAULT_OUTPUT_CAP: Final = 65_536
"""Bytes of a command's stdout, and of its stderr, that are kept (the tail)."""

WITHHELD_ENV: Final = ("PULLWAKE_TOKEN", "PULLWAKE_TOKEN_FILE", "CREDENTIALS_DIRECTORY")
"""Variables that lead to the service token; a command gets them only if it asks (env_passthrough)."""

RUN_MARKER: Final = "PULLWAKE_COMMAND_RUN"
"""Set, to a value unique to one run, in a command's environment: it finds every process of that run."""

_CHUNK = 65_536
# After the command is gone, a pipe is read for what is already in it, up to this much:
# a descendant that escaped and keeps writing must not hold the claim.
_LEFTOVER_BUDGET = 4 * _CHUNK
# How long to wait for SIGKILLed processes to be gone (only a process stuck in the kernel is slower).
_KILL_WAIT = 2.0


class CommandFailed(Exception):
    """An external command handler exited with a status asking for a retry."""

    def __init__(self, argv: Sequence[str], returncode: int, stderr: bytes) -> None:
        super().__init__(f"{argv[0]} exited with {returncode}" + _stderr_summary(stderr))
        self.returncode = returncode


# The error text quotes the end of stderr: a few lines, never more than this many characters.
_SUMMARY_LINES = 3
_SUMMARY_CHARS = 500


def _stderr_summary(stderr: bytes) -> str:
    tail = stderr[-_SUMMARY_CHARS * 4 :].decode(errors="replace").strip().splitlines()[-_SUMMARY_LINES:]
    text = " | ".join(tail)
    if len(text) > _SUMMARY_CHARS:
        text = "…" + text[-_SUMMARY_CHARS:]
    return f": {text}" if text else ""


class CommandHandler:
    """Runs an external program per batch.

    - The command's environment is the runner's without the service token's variables
      (`PULLWAKE_TOKEN`, `PULLWAKE_TOKEN_FILE`, `CREDENTIALS_DIRECTORY`), unless
      `env_passthrough` asks for them.
    - stdout and stderr are read while the command runs, so it never blocks on a full pipe;
      only the last `output_cap` bytes of each are kept (the error text quotes stderr's tail).
    - The command's exit decides the batch at once, even if a child still holds its output.
    - Whatever the command started is ended when it exits or is cancelled: its process group,
      its session, and descendants that left both (`setsid`), found by a marker variable
      (`PULLWAKE_COMMAND_RUN`) every descendant inherits. Only a descendant that leaves the
      session *and* clears its environment escapes.
    """

    def __init__(
        self,
        argv: Sequence[str],
        *,
        kill_grace: float = 5.0,
        output_cap: int = DEFAULT_OUTPUT_CAP,
        env_passthrough: bool = False,
    ) -> None:
        if not argv:
            raise ConfigError("a command handler needs a program to run")
        _require_pidfd()
        self.argv = tuple(argv)
        self.kill_grace = kill_grace
        self.output_cap = output_cap
        self.env_passthrough = env_passthrough

    def __repr__(self) -> str:
        return f"CommandHandler({list(self.argv)!r})"

    def environment(self, marker: str) -> dict[str, str]:
        """The command's environment: the runner's, less the token, plus this run's marker."""
        env = dict(os.environ)
        if not self.env_passthrough:
            for name in WITHHELD_ENV:
                env.pop(name, None)
        env[RUN_MARKER] = marker
        return env

    async def __call__(self, batch: Batch) -> HandlerResult:
        payload = json.dumps(batch.to_json()).encode()
        marker = secrets.token_hex(16)
        stdout, stderr = _Tail(self.output_cap), _Tail(self.output_cap)
        process = await trio.lowlevel.open_process(
            self.argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=self.environment(marker),
            start_new_session=True,
        )
        assert process.stdin is not None
        assert process.stdout is not None
        assert process.stderr is not None
        pipes = ((process.stdout, stdout), (process.stderr, stderr))
        # Our own handle on the command: it tells when the command exits without reaping it, so
        # its pid (and with it its group and session ids) cannot be reused until we are done.
        leader = os.pidfd_open(process.pid)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_feed, process.stdin, payload)
                for pipe, tail in pipes:
                    nursery.start_soon(_collect, pipe, tail)
                await trio.lowlevel.wait_readable(leader)
                # The command has exited: its status decides, whoever still holds its output.
                nursery.cancel_scope.cancel()
        finally:
            with trio.CancelScope(shield=True):
                async with trio.open_nursery() as nursery:
                    # Keep reading while the rest is ended, so nothing blocks on a full pipe meanwhile.
                    for pipe, tail in pipes:
                        nursery.start_soon(_collect, pipe, tail)
                    await _end_run(process.pid, marker, self.kill_grace)
                    nursery.cancel_scope.cancel()
                for pipe, tail in pipes:
                    _read_what_is_there(pipe, tail)
                    await pipe.aclose()
                await process.stdin.aclose()
                trio.lowlevel.notify_closing(leader)
                os.close(leader)
                returncode = await process.wait()
        if returncode == 0:
            return None
        if returncode == EX_TEMPFAIL:
            raise CommandFailed(self.argv, returncode, stderr.data())
        raise PermanentFailure(str(CommandFailed(self.argv, returncode, stderr.data())))


def _require_pidfd() -> None:
    """Command handlers follow their processes through pidfds and /proc: Linux 5.3 or newer.

    Checked when the handler is configured, so a platform without them is one configuration
    error at start, not a failed batch later.
    """
    try:
        os.close(os.pidfd_open(os.getpid()))
    except (AttributeError, OSError) as exc:
        raise ConfigError(
            "command handlers need Linux 5.3 or newer (pidfd_open) to end everything a command starts"
        ) from exc


class _Tail:
    """The last `cap` bytes written to it; older bytes are dropped."""

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self._buffer = bytearray()

    def add(self, chunk: bytes | bytearray) -> None:
        self._buffer += chunk[-self.cap :]
        if (excess := len(self._buffer) - self.cap) > 0:
            del self._buffer[:excess]

    def data(self) -> bytes:
        return bytes(self._buffer)


async def _feed(stdin: trio.abc.SendStream, payload: bytes) -> None:
    # A command may exit without reading its input; that is its business, not an error here.
    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
        await stdin.send_all(payload)
        await stdin.aclose()


async def _collect(pipe: trio.abc.ReceiveStream, tail: _Tail) -> None:
    # Cancelling a receive loses nothing: unread bytes stay in the pipe for the next reader.
    while chunk := await pipe.receive_some(_CHUNK):
        tail.add(chunk)


def _read_what_is_there(pipe: trio.abc.ReceiveStream, tail: _Tail) -> None:
    """Take what is in the pipe now, without waiting for more (a pipe of trio's is non-blocking)."""
    if not isinstance(pipe, trio.lowlevel.FdStream):
        return
    budget = _LEFTOVER_BUDGET
    while budget > 0:
        try:
            chunk = os.read(pipe.fileno(), _CHUNK)
        except OSError:  # BlockingIOError: empty for now, and nobody is waited for
            return
        if not chunk:
            return
        tail.add(chunk)
        budget -= len(chunk)


async def _end_run(leader: int, marker: str, grace: float) -> None:
    """End every process of one command run: SIGTERM, then SIGKILL what is left after `grace`.

    Call it while the leader is not yet reaped: its group and session ids then still name this run.
    """
    for signum, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, _KILL_WAIT)):
        members = await trio.to_thread.run_sync(_run_members, leader, marker)
        if not members:
            return
        try:
            for member in members:
                with contextlib.suppress(ProcessLookupError):
                    signal.pidfd_send_signal(member, signum)
            with trio.move_on_after(wait):
                for member in members:
                    await trio.lowlevel.wait_readable(member)  # readable: that process has exited
        finally:
            for member in members:
                trio.lowlevel.notify_closing(member)
                os.close(member)


def _run_members(leader: int, marker: str) -> list[int]:
    """pidfds of the live processes of one command run: its group, its session, and its marker.

    A pidfd pins the process it was opened for; membership is checked again after opening,
    so a pid reused in between can never be signalled by mistake.
    """
    tag = f"\0{RUN_MARKER}={marker}\0".encode()
    leader_stat = _stat(str(leader))
    # Only a process started after the command can descend from it: no need to read the rest's environment.
    born_after = leader_stat.started if leader_stat is not None else 0
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid() or not _is_member(entry, leader, born_after, tag):
            continue
        try:
            pidfd = os.pidfd_open(int(entry))
        except OSError:
            continue  # gone already
        if _is_member(entry, leader, born_after, tag):
            found.append(pidfd)
        else:
            os.close(pidfd)
    return found


@dataclass(frozen=True)
class _Stat:
    state: bytes
    group: int
    session: int
    started: int
    """Clock ticks after boot."""


def _stat(pid: str) -> _Stat | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            # The command name is in parentheses and may contain anything: fields follow the last ')'.
            fields = stat.read().rsplit(b")", 1)[1].split()
        return _Stat(state=fields[0], group=int(fields[2]), session=int(fields[3]), started=int(fields[19]))
    except (OSError, IndexError, ValueError):
        return None  # gone


def _is_member(pid: str, leader: int, born_after: int, tag: bytes) -> bool:
    stat = _stat(pid)
    if stat is None or stat.state in (b"Z", b"X"):
        return False  # gone, or dead and only waiting to be reaped
    if leader in (stat.group, stat.session):
        return True
    if stat.started < born_after:
        return False
    try:
        with open(f"/proc/{pid}/environ", "rb") as environ:
            return tag in b"\0" + environ.read() + b"\0"
    except OSError:
        return False  # gone, or not ours to read
