"""The local control surface (docs/design.md §7.5): health, status, in-flight claims, abort, metrics.

Served by Hypercorn (trio worker) from a Starlette app, on a Unix socket that only
the runner's user can open, and optionally on a loopback TCP port for scrapers
(`/healthz` and `/metrics` only: no abort over TCP). Only the daemon imports this
module; it needs of the runner no more than `Controlled`.
"""

from __future__ import annotations

import logging
import os
import socket
import stat
from dataclasses import asdict
from pathlib import Path
from typing import Any, Protocol

import httpx
import structlog
import trio
from hypercorn.config import Config
from hypercorn.trio import serve
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ._exceptions import ConfigError, RunnerError
from ._health import Health


class Controlled(Protocol):
    """What the control surface needs of a runner."""

    def health(self) -> Health: ...

    def abort(self, subscription_id: str) -> bool: ...

    def metrics_exposition(self) -> tuple[bytes, str]: ...


log = structlog.get_logger("pullwake.control")

# Hypercorn logs through this logger as-is: passing a Logger keeps it from adding handlers
# (which would pile up across start/stop cycles).
_SERVER_LOG = logging.getLogger("pullwake.control.server")


def control_app(runner: Controlled, *, stuck_after: float, with_abort: bool = True) -> Starlette:
    async def health(request: Request) -> Response:
        snapshot = runner.health()
        ok, reason = snapshot.verdict(stuck_after=stuck_after)
        body = {"ok": ok, "reason": reason, "state": snapshot.state, "status": snapshot.status}
        return JSONResponse(body, status_code=200 if ok else 503)

    async def status(request: Request) -> Response:
        return JSONResponse(runner.health().to_dict())

    async def claims(request: Request) -> Response:
        return JSONResponse([asdict(claim) for claim in runner.health().in_flight])

    async def abort(request: Request) -> Response:
        subscription = request.path_params["subscription"]
        if runner.abort(subscription):
            return JSONResponse({"aborted": subscription}, status_code=202)
        return JSONResponse({"error": f"no claim of {subscription!r} is in flight"}, status_code=404)

    async def metrics(request: Request) -> Response:
        body, content_type = runner.metrics_exposition()
        return Response(body, media_type=content_type)

    routes = [
        Route("/health", health),
        Route("/healthz", health),
        Route("/metrics", metrics),
    ]
    if with_abort:
        routes += [
            Route("/status", status),
            Route("/claims", claims),
            Route("/claims/{subscription}/abort", abort, methods=["POST"]),
        ]
    return Starlette(routes=routes)


def bind_owner_only(path: Path) -> int:
    """A listening Unix socket at `path` that only this user can connect to; returns its fd."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        if stat.S_ISSOCK(path.lstat().st_mode):
            path.unlink()  # left behind by a runner that did not stop cleanly
        else:
            raise ConfigError(f"control_socket: {path} exists and is not a socket")
    except FileNotFoundError:
        pass
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        # On Linux the mode of the socket inode at bind() time becomes the file's mode.
        os.fchmod(sock.fileno(), 0o600)
        sock.bind(str(path))
        os.chmod(path, 0o600)
        sock.listen(64)
    except BaseException:
        sock.close()
        raise
    return sock.detach()


def _config(bind: str) -> Config:
    config = Config()
    config.bind = [bind]
    config.errorlog = _SERVER_LOG
    config.accesslog = None
    config.graceful_timeout = 1.0
    return config


async def serve_control(
    runner: Controlled, path: Path, *, stuck_after: float, task_status: trio.TaskStatus[None]
) -> None:
    """Serve the control app on a Unix socket until cancelled; the socket file goes with it."""
    fd = bind_owner_only(path)
    try:
        await _serve(control_app(runner, stuck_after=stuck_after), _config(f"fd://{fd}"), task_status)
    finally:
        path.unlink(missing_ok=True)  # noqa: ASYNC240 - a quick local unlink, also during cancellation


async def serve_metrics(
    runner: Controlled, listen: str, *, stuck_after: float, task_status: trio.TaskStatus[str]
) -> None:
    """Serve /healthz and /metrics on a loopback TCP port until cancelled; reports the bound URL."""
    await _serve(control_app(runner, stuck_after=stuck_after, with_abort=False), _config(listen), task_status)


async def _serve(app: Starlette, config: Config, task_status: trio.TaskStatus[Any]) -> None:
    never = trio.Event()

    async def serving(*, task_status: trio.TaskStatus[list[str]]) -> None:
        await serve(app, config, shutdown_trigger=never.wait, task_status=task_status)  # type: ignore[arg-type]

    async with trio.open_nursery() as nursery:
        bound = await nursery.start(serving)
        log.info("control.listening", on=bound)
        task_status.started(bound[0] if bound else None)


# -- the client side, for `pullwake status` and `pullwake abort` -------------------------


def _client(path: Path) -> httpx.Client:
    if not path.exists():
        raise RunnerError(f"no control socket at {path}: is the runner running with control_socket set?")
    return httpx.Client(transport=httpx.HTTPTransport(uds=str(path)), base_url="http://pullwake", timeout=5.0)


def request(path: Path, method: str, url: str) -> tuple[int, Any]:
    try:
        with _client(path) as client:
            response = client.request(method, url)
    except httpx.TransportError as exc:
        raise RunnerError(f"cannot reach the runner at {path}: {exc}") from exc
    return response.status_code, response.json()
