"""Child processes in synchronous tests, with every wait bounded.

`subprocess.Popen` used as a context manager waits for the child without a limit on the
way out, and `stdout.readline()` blocks for ever on a child that never prints: a test
that goes wrong would hang the suite instead of failing. These helpers bound both.
"""

from __future__ import annotations

import queue
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import IO, Any


@contextmanager
def child(argv: list[str], **options: Any) -> Iterator[subprocess.Popen[str]]:
    """Run `argv`; on the way out, kill it if it still runs and wait for it (bounded)."""
    process: subprocess.Popen[str] = subprocess.Popen(argv, text=True, **options)
    try:
        yield process
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=30)
        for pipe in (process.stdin, process.stdout, process.stderr):
            if pipe is not None:
                pipe.close()


class Lines:
    """The lines of a child's pipe, each awaited for at most `timeout` seconds.

    A thread reads the pipe (a blocking read cannot be given a timeout portably);
    it ends when the pipe closes, which `child` does on the way out at the latest.
    """

    def __init__(self, pipe: IO[str] | None) -> None:
        assert pipe is not None
        self._lines: queue.Queue[str] = queue.Queue()
        self._reader = threading.Thread(target=self._read, args=(pipe,), daemon=True)
        self._reader.start()

    def _read(self, pipe: IO[str]) -> None:
        try:
            for line in pipe:
                self._lines.put(line)
        except ValueError:  # closed under us: the test is over
            pass
        self._lines.put("")

    def next(self, timeout: float = 30) -> str:
        """The next line without its newline ("" at the end of the pipe)."""
        try:
            return self._lines.get(timeout=timeout).rstrip("\n")
        except queue.Empty:
            raise AssertionError(f"the child printed no line within {timeout:g} s") from None

    def rest(self, timeout: float = 30) -> list[str]:
        """Every line left, once the pipe closes."""
        lines: list[str] = []
        while line := self.next(timeout):
            lines.append(line)
        return lines
