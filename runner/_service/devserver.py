"""The pinned Durable Streams reference server, installed on first use and run on loopback.

`pullwake dev`, `pullwake demo`, the benchmarks and the test fixtures all start
the server through `DevServer`, so there is one way to get a real server.
"""

from __future__ import annotations

import json
import os
import selectors
import shutil
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import IO, Any

PACKAGE = "@durable-streams/server"
VERSION = "0.3.7"
_FILES = ("package.json", "package-lock.json", "serve.mjs")


class DevServerError(RuntimeError):
    """The reference server could not be installed or started."""


def cache_dir() -> Path:
    if explicit := os.environ.get("PULLWAKE_CACHE_DIR"):
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "pullwake-runner"


def install_dir() -> Path:
    return cache_dir() / f"reference-server-{VERSION}"


def _installed_version(directory: Path) -> str | None:
    try:
        manifest = json.loads((directory / "node_modules" / PACKAGE / "package.json").read_text())
    except (OSError, ValueError):
        return None
    version = manifest.get("version")
    return version if isinstance(version, str) else None


def _require(program: str) -> str:
    found = shutil.which(program)
    if found is None:
        raise DevServerError(f"'{program}' is not on PATH: install Node.js 18 or newer to run the reference server")
    return found


def install(*, quiet: bool = True) -> Path:
    """Install the pinned server into the cache (once); returns its directory."""
    target = install_dir()
    if _installed_version(target) == VERSION:
        return target
    npm = _require("npm")
    _require("node")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix="install-", dir=target.parent))
    try:
        source = resources.files("runner._service") / "devserver_files"
        for name in _FILES:
            (staging / name).write_bytes((source / name).read_bytes())
        # `npm install` with the lockfile, not `npm ci`: npm drops other platforms' optional
        # packages from lockfiles and then refuses `ci`. --ignore-scripts: the native
        # dependency ships prebuilt binaries.
        result = subprocess.run(
            [npm, "install", "--ignore-scripts", "--no-audit", "--no-fund", "--loglevel=error"],
            cwd=staging,
            capture_output=quiet,
            text=True,
            check=False,
        )
        if result.returncode != 0:
            raise DevServerError(f"npm install for {PACKAGE}@{VERSION} failed:\n{result.stderr or ''}")
        if _installed_version(staging) != VERSION:
            raise DevServerError(f"npm installed something other than {PACKAGE}@{VERSION}")
        try:
            staging.rename(target)
        except OSError:
            # Someone else finished first; theirs is as good as ours.
            if _installed_version(target) != VERSION:
                shutil.rmtree(target, ignore_errors=True)
                staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


_READ_SIZE = 65_536


def _announced_url(line: str) -> str | None:
    try:
        announced = json.loads(line)
    except ValueError:
        return None
    if isinstance(announced, dict) and isinstance(announced.get("url"), str):
        return str(announced["url"])
    return None


def _read_or_eof(fd: int) -> bytes:
    try:
        return os.read(fd, _READ_SIZE)
    except OSError:
        return b""  # closed under us by stop()


@dataclass
class DevServer:
    """One reference server process on 127.0.0.1.

    `port=0` picks a free port; `restart()` keeps the port and the data directory,
    like an operator restarting the service.
    """

    port: int = 0
    data_dir: Path | None = None
    long_poll_timeout: float = 30.0
    log_file: Path | None = None
    command: tuple[str, ...] | None = None
    """Run this instead of the pinned server (tests): it gets the options JSON as its last argument
    and must print `{"url": ...}` on a line of its stdout."""

    def __post_init__(self) -> None:
        self._process: subprocess.Popen[bytes] | None = None
        self._pump: threading.Thread | None = None
        self._log: IO[bytes] | None = None
        self.url: str | None = None

    def __enter__(self) -> DevServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    @property
    def pid(self) -> int | None:
        """The server process's id while it runs (for what it costs in CPU)."""
        return self._process.pid if self.running and self._process is not None else None

    def start(self, *, timeout: float = 30.0) -> str:
        if self.running:
            raise DevServerError("the reference server is already running")
        options: dict[str, Any] = {"port": self.port, "host": "127.0.0.1"}
        options["longPollTimeout"] = int(self.long_poll_timeout * 1000)
        if self.data_dir is not None:
            self.data_dir.mkdir(parents=True, exist_ok=True)
            options["dataDir"] = str(self.data_dir)
        if self.command is not None:
            argv, cwd = [*self.command, json.dumps(options)], None
        else:
            directory = install()
            argv, cwd = [_require("node"), str(directory / "serve.mjs"), json.dumps(options)], directory
        if self.log_file is not None:
            self._log = self.log_file.open("ab")
        self._process = subprocess.Popen(
            argv,
            cwd=cwd,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log if self._log is not None else subprocess.DEVNULL,
        )
        self.url = self._wait_for_url(timeout)
        self.port = int(self.url.rsplit(":", 1)[1])
        return self.url

    def _wait_for_url(self, timeout: float) -> str:
        """Read the server's stdout until it announces its address, then hand the pipe to the pump.

        Reads the raw pipe with os.read and splits lines here: a buffered reader could hold the
        address line in its buffer while select() waits on an empty pipe (issue 12).
        """
        assert self._process is not None
        assert self._process.stdout is not None
        fd = self._process.stdout.fileno()
        deadline = time.monotonic() + timeout
        with selectors.DefaultSelector() as selector:
            selector.register(fd, selectors.EVENT_READ)
            return self._read_until_url(fd, selector, deadline, timeout)

    def _read_until_url(self, fd: int, selector: selectors.BaseSelector, deadline: float, timeout: float) -> str:
        pending = b""
        seen: list[str] = []
        while (left := deadline - time.monotonic()) > 0:
            if not selector.select(left):
                continue
            chunk = os.read(fd, _READ_SIZE)
            self._write_log(chunk)
            if not chunk:
                self.stop()
                said = [*seen, pending.decode(errors="replace").strip()] if pending else seen
                raise DevServerError("the reference server exited at start:\n" + "\n".join(said))
            *lines, pending = (pending + chunk).split(b"\n")
            for line in lines:
                seen.append(line.decode(errors="replace").strip())
                if (url := _announced_url(seen[-1])) is not None:
                    # Keep draining its stdout (server logs) so it never blocks on a full pipe.
                    self._drain(fd)
                    return url
        self.stop()
        raise DevServerError(f"the reference server did not start within {timeout} s:\n" + "\n".join(seen))

    def _write_log(self, data: bytes) -> None:
        log = self._log
        if data and log is not None and not log.closed:
            log.write(data)
            log.flush()

    def _drain(self, fd: int) -> None:
        # Everything read so far is already in the log; the pump goes on from the same raw fd.
        def pump() -> None:
            while chunk := _read_or_eof(fd):
                self._write_log(chunk)

        self._pump = threading.Thread(target=pump, name="devserver-stdout", daemon=True)
        self._pump.start()

    def stop(self, *, timeout: float = 10.0) -> None:
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if self._pump is not None:
            self._pump.join(timeout=5)  # the pipe reaches EOF once the server is gone
            self._pump = None
        if process is not None:
            for pipe in (process.stdin, process.stdout):
                if pipe is not None:
                    pipe.close()
        if self._log is not None:
            self._log.close()
            self._log = None

    def kill(self) -> None:
        """Stop abruptly (SIGKILL), as a crash would."""
        if self._process is not None:
            self._process.kill()
            self._process.wait()
        self.stop()

    def restart(self) -> str:
        self.stop()
        return self.start()

    def wait(self) -> int:
        """Block until the server exits (for `pullwake dev`)."""
        assert self._process is not None
        return self._process.wait()
