"""`python -m bench.transport`: httpx's default transport against LeanTransport, same requests.

The runner's critical path is small requests to one server on kept-alive connections: an
append (POST) and a read (GET) stand in for claim, read and ack. Both transports send the same
requests through the same `httpx.AsyncClient` API against the pinned reference server, in
interleaved rounds (so drift of a shared machine hits both alike). Reported per transport: wall
time per request (p50, p99) and this process's CPU time per request (the server's CPU is its
own process and not counted); and the time to construct a client for an http:// URL.

A third row, "Lean, no client", hands the same requests straight to the transport: the gap
between it and "LeanTransport" is what the `httpx.AsyncClient` layer itself costs per request.
"""

from __future__ import annotations

import argparse
import statistics
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

import httpx
import trio

from runner._service.devserver import DevServer
from runner._wire.transport import LeanTransport

TIMEOUT = httpx.Timeout(10.0)
WARMUP_PAIRS = 100
CONSTRUCTIONS = 30


@dataclass
class Sample:
    name: str
    post: list[float] = field(default_factory=list)
    get: list[float] = field(default_factory=list)
    cpu: float = 0.0

    @property
    def wall(self) -> list[float]:
        return self.post + self.get

    @property
    def requests(self) -> int:
        return len(self.post) + len(self.get)


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


class ViaClient:
    """Requests the way the runner sends them: through `httpx.AsyncClient`."""

    def __init__(self, http: httpx.AsyncClient) -> None:
        self.http = http

    async def append(self, path: str, number: int) -> httpx.Response:
        return await self.http.post(path, json={"n": number})

    async def read(self, path: str, offset: str) -> httpx.Response:
        return await self.http.get(path, params={"offset": offset})

    async def aclose(self) -> None:
        await self.http.aclose()


class Direct:
    """The same requests handed straight to the transport: what the httpx client layer costs."""

    def __init__(self, url: str, transport: LeanTransport) -> None:
        self.base = httpx.URL(url)
        self.transport = transport
        self.extensions = {"timeout": TIMEOUT.as_dict()}

    async def append(self, path: str, number: int) -> httpx.Response:
        body = b'{"n":%d}' % number
        return await self._send("POST", self.base.join(path), body)

    async def read(self, path: str, offset: str) -> httpx.Response:
        return await self._send("GET", self.base.join(path).copy_merge_params({"offset": offset}), None)

    async def _send(self, method: str, url: httpx.URL, body: bytes | None) -> httpx.Response:
        headers = {"content-type": "application/json"} if body is not None else None
        request = httpx.Request(method, url, content=body, headers=headers, extensions=self.extensions)
        response = await self.transport.handle_async_request(request)
        await response.aread()
        await response.aclose()
        return response

    async def aclose(self) -> None:
        await self.transport.aclose()


Sender = ViaClient | Direct


async def pairs(sender: Sender, path: str, offset: str, count: int, sample: Sample | None) -> str:
    """`count` appends each followed by a read of what it appended; returns the next offset."""
    for number in range(count):
        started = time.perf_counter()
        appended = await sender.append(path, number)
        posted = time.perf_counter()
        read = await sender.read(path, offset)
        done = time.perf_counter()
        if appended.status_code != 204 or read.status_code != 200 or len(read.json()) != 1:
            raise RuntimeError(f"unexpected answers {appended.status_code} / {read.status_code}: {read.text}")
        offset = appended.headers["stream-next-offset"]
        if sample is not None:
            sample.post.append(posted - started)
            sample.get.append(done - posted)
    return offset


async def measure(url: str, total_requests: int, rounds: int) -> list[Sample]:
    per_round = max(1, total_requests // 2 // rounds)
    senders: dict[str, Sender] = {
        "httpx default": ViaClient(httpx.AsyncClient(base_url=url, timeout=TIMEOUT)),
        "LeanTransport": ViaClient(httpx.AsyncClient(base_url=url, timeout=TIMEOUT, transport=LeanTransport())),
        "Lean, no client": Direct(url, LeanTransport()),
    }
    samples = {name: Sample(name) for name in senders}
    offsets: dict[str, str] = {}
    paths = {name: f"/v1/stream/bench-transport-{uuid.uuid4().hex[:8]}-{index}" for index, name in enumerate(senders)}
    try:
        async with httpx.AsyncClient(base_url=url, timeout=TIMEOUT) as setup:
            for path in paths.values():
                (await setup.put(path, headers={"content-type": "application/json"})).raise_for_status()
        for name, sender in senders.items():
            offsets[name] = await pairs(sender, paths[name], "-1", WARMUP_PAIRS, None)
        names = list(senders)
        for round_number in range(rounds):
            for name in names if round_number % 2 == 0 else reversed(names):
                cpu = time.process_time()
                offsets[name] = await pairs(senders[name], paths[name], offsets[name], per_round, samples[name])
                samples[name].cpu += time.process_time() - cpu
    finally:
        for sender in senders.values():
            await sender.aclose()
    return list(samples.values())


def construction_ms(build: Callable[[], httpx.AsyncClient]) -> float:
    """Median time to construct a client (not counting the first, which pays for imports)."""
    build()
    times = []
    for _ in range(CONSTRUCTIONS):
        started = time.perf_counter()
        build()
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1000


def report(samples: list[Sample], construction: dict[str, float]) -> str:
    def ms(seconds: float) -> str:
        return f"{seconds * 1000:8.3f}"

    rows = [f"{'':16} {'requests':>8} {'p50 ms':>8} {'p99 ms':>8} {'POST p50':>8} {'GET p50':>8} {'CPU ms/req':>10}"]
    for sample in samples:
        rows.append(
            f"{sample.name:16} {sample.requests:8d} {ms(percentile(sample.wall, 0.5))}"
            f" {ms(percentile(sample.wall, 0.99))} {ms(percentile(sample.post, 0.5))} {ms(percentile(sample.get, 0.5))}"
            f" {ms(sample.cpu / sample.requests):>10}"
        )
    base, lean = samples[:2]  # the third row shows the client layer's share; it is not what would be adopted

    def ratio(of: Callable[[Sample], float]) -> str:
        return f"{of(lean) / of(base):8.2f}"

    rows.insert(
        3,
        f"{'lean / default':16} {'':8} {ratio(lambda s: percentile(s.wall, 0.5))}"
        f" {ratio(lambda s: percentile(s.wall, 0.99))} {ratio(lambda s: percentile(s.post, 0.5))}"
        f" {ratio(lambda s: percentile(s.get, 0.5))} {ratio(lambda s: s.cpu / s.requests):>10}",
    )
    rows.append("")
    rows.append(f"AsyncClient construction for an http:// URL (median of {CONSTRUCTIONS}):")
    rows.extend(f"  {name:16} {value:8.3f} ms" for name, value in construction.items())
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--requests", type=int, default=2000, help="measured requests per transport")
    parser.add_argument("--rounds", type=int, default=10, help="interleaved rounds")
    args = parser.parse_args(argv)
    construction = {
        "httpx default": construction_ms(lambda: httpx.AsyncClient(base_url="http://127.0.0.1:1")),
        "LeanTransport": construction_ms(
            lambda: httpx.AsyncClient(base_url="http://127.0.0.1:1", transport=LeanTransport())
        ),
    }
    with DevServer() as server:
        assert server.url is not None
        samples = trio.run(measure, server.url, args.requests, args.rounds)
    print(report(samples, construction))


if __name__ == "__main__":
    main()
