"""What a claim costs the journal (issue 21 item 7, issue 22 item 5), at M = 10 and 1,000 subscriptions.

Per claim, with the journal of M subscriptions (one stream each, an acked offset
each) in the bench's scratch directory on the real disk:

- *claimed → on disk*: from `Journal.claimed` to the moment the record is written
  (`after`: appended and fsynced with its directory's entry, what a claim waits for
  before its first batch);
- *loop CPU*: CPU time of the event loop's thread per claim (building records,
  encoding, the hop to the worker thread), a claim being `claimed`, then `acked`
  and `ended` as a real claim is;
- *bytes*: written per claim (`after`: the records appended, plus the snapshots
  of the compactions amortized: one of M subscriptions per log of
  max(256 KiB, snapshot size)).

`before` is the old journal: the whole document encoded on the event loop at
every granted claim and replaced in a worker thread without fsync (what the runner
did until issue 21 item 7); `before+fsync` is that same rewrite made durable
(file and directory fsynced), what item 7 would have cost without the log.
"""

from __future__ import annotations

import json
import math
import statistics
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Any

import trio
from pydantic import SecretStr

from bench.core import Bench
from runner._state.files import write_atomically
from runner._state.journal import Journal
from runner._state.journal_files import LOG_MIN_BYTES
from runner._wire.protocol import Ack, Claim, ClaimedStream

SERVER = "http://127.0.0.1:1"
SIZES = (10, 1_000)
INTERVAL = 1.0


def _claim(n: int, subscription: str) -> Claim:
    offset = f"{n:016d}_{n:016d}"
    return Claim(
        subscription,
        f"wake-{n}",
        n,
        (ClaimedStream(f"jobs/{subscription}", offset, "9" * 33, True),),
        30_000,
        SecretStr("t" * 32),
    )


def _seeded(path: Path, subscriptions: int) -> Journal:
    journal = Journal(path / "journal.json", server_url=SERVER)
    for i in range(subscriptions):
        journal.linked(f"sub-{i:05d}", {f"jobs/sub-{i:05d}": f"{i:016d}_{i:016d}"}, created=False)
    journal.flush()
    return journal


async def _after(path: Path, subscriptions: int, claims: int) -> dict[str, float]:
    journal = _seeded(path, subscriptions)
    waits: list[float] = []
    async with trio.open_nursery() as nursery:
        await nursery.start(lambda task_status: journal.keep(interval=INTERVAL, task_status=task_status))
        await trio.sleep(0.05)  # the first compaction (of what was loaded) is not a claim's
        assert journal._writer is not None
        journal._writer.bound = 2**62  # no compaction while timed: its bytes are counted apart, amortized
        logs_before = _log_bytes(path)
        cpu = time.thread_time()
        for n in range(claims):
            claim = _claim(n, f"sub-{n % subscriptions:05d}")
            started = time.perf_counter()
            written = journal.claimed(claim)
            await written.wait()
            waits.append(time.perf_counter() - started)
            journal.acked(claim, [Ack(claim.streams[0].path, claim.streams[0].tail_offset)])
            journal.ended(claim.subscription, claim.wake_id)
        loop_cpu = time.thread_time() - cpu
        await trio.sleep(INTERVAL + 0.1)  # the acks' append, for the byte count
        appended = (_log_bytes(path) - logs_before) / claims
        nursery.cancel_scope.cancel()
    # A snapshot (of M subscriptions) is written each time the log grows by max(bound, snapshot size).
    snapshot = _snapshot_bytes(path)
    compaction = snapshot * appended / max(LOG_MIN_BYTES, snapshot)
    return _figures(waits, loop_cpu, claims, appended + compaction)


def _log_bytes(path: Path) -> int:
    return sum(log.stat().st_size for log in path.glob("journal.*.log"))


def _snapshot_bytes(path: Path) -> int:
    return (path / "journal.json").stat().st_size


async def _before(path: Path, subscriptions: int, claims: int, *, sync: bool) -> dict[str, float]:
    """The old journal's write path, reproduced: encode everything on the loop, replace the file in a thread."""
    acked = {f"sub-{i:05d}": {f"jobs/sub-{i:05d}": f"{i:016d}_{i:016d}"} for i in range(subscriptions)}
    claims_held: dict[str, dict[str, Any]] = {}
    target = path / "journal.json"
    waits: list[float] = []
    written_bytes = 0
    cpu = time.thread_time()
    for n in range(claims):
        claim = _claim(n, f"sub-{n % subscriptions:05d}")
        started = time.perf_counter()
        claims_held[claim.subscription] = {"wake_id": claim.wake_id, "token": claim.token.get_secret_value()}
        acked[claim.subscription][claim.streams[0].path] = claim.streams[0].acked_offset
        document = {"version": 1, "server_url": SERVER, "claims": claims_held, "acked": acked, "gaps": {}}
        encoded = json.dumps(document, separators=(",", ":")).encode()
        await trio.to_thread.run_sync(partial(write_atomically, target, encoded, sync=sync))
        waits.append(time.perf_counter() - started)
        written_bytes += len(encoded)
        # The ack and the end: in memory, written with the next claim (the old interval write).
        acked[claim.subscription][claim.streams[0].path] = claim.streams[0].tail_offset
        del claims_held[claim.subscription]
    loop_cpu = time.thread_time() - cpu
    return _figures(waits, loop_cpu, claims, written_bytes / claims)


def _figures(waits: list[float], loop_cpu: float, claims: int, bytes_per_claim: float) -> dict[str, float]:
    ordered = sorted(waits)
    return {
        "to_disk_p50_ms": statistics.median(ordered) * 1000,
        "to_disk_p99_ms": ordered[min(len(ordered) - 1, math.ceil(0.99 * len(ordered)) - 1)] * 1000,
        "loop_cpu_ms_per_claim": loop_cpu / claims * 1000,
        "bytes_per_claim": bytes_per_claim,
    }


async def measure(claims: int) -> dict[str, Any]:
    rows: list[dict[str, Any]] = []
    for subscriptions in SIZES:
        for variant in ("before", "before+fsync", "after"):
            with tempfile.TemporaryDirectory(prefix="pullwake-journal-") as scratch:
                path = Path(scratch)
                if variant == "after":
                    figures = await _after(path, subscriptions, claims)
                else:
                    figures = await _before(path, subscriptions, claims, sync=variant == "before+fsync")
            rows.append({"subscriptions": subscriptions, "variant": variant, **figures})
    return {"claims": claims, "rows": rows}


async def journal(bench: Bench) -> None:
    bench.results["journal"] = await measure(50 if bench.scale.repeats == 1 else 400)


def render(results: dict[str, Any]) -> str:
    section = results.get("journal")
    if not section:
        return ""
    lines = [
        "",
        f"Journal cost per claim ({section['claims']} claims each; real disk; 'after' waits for its fsync)",
        f"  {'M':>5}  {'variant':<13} {'claimed→on disk p50':>20} {'p99':>8} {'loop CPU/claim':>15}"
        f" {'bytes/claim':>12}",
    ]
    for row in section["rows"]:
        lines.append(
            f"  {row['subscriptions']:>5}  {row['variant']:<13} {row['to_disk_p50_ms']:>17.3f} ms "
            f"{row['to_disk_p99_ms']:>8.3f} {row['loop_cpu_ms_per_claim']:>12.3f} ms {row['bytes_per_claim']:>12.0f}"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    import sys

    result = trio.run(measure, int(sys.argv[1]) if len(sys.argv) > 1 else 400)
    print(render({"journal": result}), end="")
