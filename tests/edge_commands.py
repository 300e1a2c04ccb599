"""Command handlers that misbehave on purpose, for tests/test_command_handler.py.

flood BYTES CODE         write BYTES to stdout and to stderr (interleaved), end stderr
                         with "the last words", exit CODE
env FILE                 write the environment to FILE as JSON, exit 0
setsid-and-hang PIDFILE  start a sleeper in a session of its own (setsid), then hang
setsid-stubborn PIDFILE  the same, with a sleeper that ignores SIGTERM
background PIDFILE CODE  start a sleeper that holds our stdout and stderr, exit CODE at once
background-setsid PIDFILE CODE
                         the same, with the sleeper in a session of its own
sleeper PIDFILE [stubborn]
                         write our pid to PIDFILE (atomically), then sleep
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

CHUNK = b"x" * 1023 + b"\n"


def flood(total: int, code: int) -> int:
    written = 0
    while written < total:
        sys.stdout.buffer.write(CHUNK)
        sys.stderr.buffer.write(CHUNK)
        written += len(CHUNK)
    sys.stdout.flush()
    sys.stderr.buffer.write(b"the last words\n")
    sys.stderr.flush()
    return code


def start_sleeper(pidfile: str, *, new_session: bool, stubborn: bool = False) -> None:
    """Start a sleeper and return once it is up (its pid file written)."""
    argv = [sys.executable, __file__, "sleeper", pidfile] + (["stubborn"] if stubborn else [])
    subprocess.Popen(argv, start_new_session=new_session, stdin=subprocess.DEVNULL)
    while not os.path.exists(pidfile):
        time.sleep(0.01)  # real-time: a helper script waiting for its own child to start


def sleeper(pidfile: str, stubborn: bool) -> int:
    if stubborn:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    with open(pidfile + ".tmp", "w") as out:
        out.write(str(os.getpid()))
    os.replace(pidfile + ".tmp", pidfile)
    time.sleep(600)  # real-time: a descendant that outlives its command
    return 0


def main(argv: list[str]) -> int:
    mode, args = argv[0], argv[1:]
    if mode == "flood":
        return flood(int(args[0]), int(args[1]))
    if mode == "env":
        with open(args[0], "w") as out:
            json.dump(dict(os.environ), out)
        return 0
    if mode in ("setsid-and-hang", "setsid-stubborn"):
        start_sleeper(args[0], new_session=True, stubborn=mode == "setsid-stubborn")
        time.sleep(600)  # real-time: a stuck command, ended by the runner
        return 0
    if mode in ("background", "background-setsid"):
        start_sleeper(args[0], new_session=mode == "background-setsid")
        print("the command is done; its child still holds this pipe", file=sys.stderr, flush=True)
        return int(args[1])
    if mode == "sleeper":
        return sleeper(args[0], stubborn=args[1:] == ["stubborn"])
    raise SystemExit(f"unknown mode {mode!r}")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
