"""An asyncio service with a pullwake runner on its own loop (`runner.AsyncioHost`).

It follows the subscription `orders` (streams `orders/*`), keeps running totals in
memory with an asyncio handler, serves them and the runner's health as JSON over a
tiny HTTP endpoint on loopback, and drains on SIGINT/SIGTERM without blocking the loop.

    pullwake dev &                                   # the reference server on 127.0.0.1:4437
    python -m examples.asyncio_service --server http://127.0.0.1:4437
    curl -s http://127.0.0.1:8081/health
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
from typing import Any

from runner import AsyncioHost, Batch, Ended, Runner, Settings, SubscriptionSpec, asyncio_handler


class OrderService:
    """The service: a runner hosted on the asyncio loop, plus the app's own asyncio code."""

    def __init__(self, settings: Settings, *, work_delay: float = 0.0) -> None:
        self.work_delay = work_delay
        self.handled: list[Any] = []
        """Every message handled, in order (at least once: a redelivery appends again)."""
        self.totals: dict[str, float] = {}
        self.states: list[str] = []
        self.endings: list[Ended] = []
        self.in_handler = asyncio.Event()
        handlers = {spec.id: self.handle for spec in settings.subscriptions}
        self.runner = Runner(settings, handlers=handlers)
        self.host = AsyncioHost(self.runner, on_state=self.states.append, on_ended=self.ended)

    @asyncio_handler
    async def handle(self, batch: Batch) -> None:
        """asyncio code (marked): awaited as a task on the service's own loop."""
        self.in_handler.set()
        try:
            if self.work_delay:
                await asyncio.sleep(self.work_delay)  # stands for a call to another asyncio service
        finally:
            self.in_handler.clear()
        for message in batch.messages:
            self.handled.append(message)
            self.totals[batch.stream] = self.totals.get(batch.stream, 0) + float(message.get("amount", 0))

    def ended(self, ended: Ended) -> None:
        self.endings.append(ended)
        if not ended.requested:
            print(f"the runner ended on its own: {ended.error}")

    async def serve_http(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        request = await reader.readline()
        path = request.split()[1].decode() if len(request.split()) > 1 else "/"
        health = self.host.health()
        body: dict[str, Any] = health.to_dict() if path == "/health" else {"totals": self.totals}
        status = "200 OK" if path != "/health" or health.status == "ok" else "503 Service Unavailable"
        payload = json.dumps(body, default=str).encode()
        writer.write(f"HTTP/1.1 {status}\r\ncontent-type: application/json\r\n".encode())
        writer.write(f"content-length: {len(payload)}\r\nconnection: close\r\n\r\n".encode() + payload)
        await writer.drain()
        writer.close()

    async def run(self, stop: asyncio.Event, *, listen: tuple[str, int] = ("127.0.0.1", 8081)) -> None:
        """Serve until `stop` is set, then drain the runner and close."""
        server = await asyncio.start_server(self.serve_http, *listen)
        try:
            async with self.host:  # start() now, stop() (drain) on the way out
                await asyncio.wait(
                    [asyncio.create_task(stop.wait()), asyncio.create_task(self.host.wait_ended())],
                    return_when=asyncio.FIRST_COMPLETED,
                )
        finally:
            server.close()
            await server.wait_closed()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--server", default="http://127.0.0.1:4437")
    parser.add_argument("--port", type=int, default=8081)
    arguments = parser.parse_args()
    settings = Settings(
        server_url=arguments.server,
        wake_stream="wake/orders",
        subscriptions=(SubscriptionSpec(id="orders", pattern="orders/*"),),
    )
    service = OrderService(settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    service.runner.add_state_listener(lambda state: print(f"runner: {state.value}"))
    await service.run(stop, listen=("127.0.0.1", arguments.port))
    print(f"stopped; handled {len(service.handled)} events; totals {service.totals}")


if __name__ == "__main__":
    asyncio.run(main())
