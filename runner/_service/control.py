"""The local control surface (docs/design.md §7.5): health, status, in-flight claims, abort, reload, metrics.

Served by Hypercorn (trio worker) from a Starlette app, on a Unix socket that only
the runner's user can open, and optionally on a loopback TCP port for scrapers
(`/healthz` and `/metrics` only: no abort over TCP). Only the daemon imports this
module; it needs of the runner no more than `Controlled`.
"""

from __future__ import annotations

import fcntl
import logging
import os
import socket
import stat
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import httpx
import structlog
import trio
from hypercorn.config import Config
from hypercorn.trio import serve
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from .._config import unix_socket_path_problem
from .._health import Health
from ..errors import ConfigError, RunnerError

if TYPE_CHECKING:
    from .._wake.reload import Reloaded


class Controlled(Protocol):
    """What the control surface needs of a runner."""

    def health(self) -> Health: ...

    def abort(self, subscription_id: str) -> bool: ...

    def metrics_exposition(self) -> tuple[bytes, str]: ...


log = structlog.get_logger("pullwake.control")

# Hypercorn logs through this logger as-is: passing a Logger keeps it from adding handlers
# (which would pile up across start/stop cycles).
_SERVER_LOG = logging.getLogger("pullwake.control.server")

# How long a connect() to an existing socket file may take before the runner refuses to replace it.
_PROBE_TIMEOUT = 1.0


def control_app(
    runner: Controlled,
    *,
    stuck_after: float,
    with_abort: bool = True,
    reload: Callable[[], Awaitable[Reloaded]] | None = None,
) -> Starlette:
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

    async def reloading(request: Request) -> Response:
        if reload is None:
            return JSONResponse({"error": "this runner has no configuration file to re-read"}, status_code=409)
        try:
            reloaded = await reload()
        except ConfigError as error:
            return JSONResponse({"error": str(error)}, status_code=422)
        except RunnerError as error:
            return JSONResponse({"error": str(error)}, status_code=409)
        return JSONResponse(reloaded.to_dict())

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
            Route("/reload", reloading, methods=["POST"]),
        ]
    return Starlette(routes=routes)


def _reason(error: BaseException) -> str:
    return (error.strerror if isinstance(error, OSError) and error.strerror else str(error)) or type(error).__name__


@contextmanager
def _binding_lock(directory: Path) -> Iterator[None]:
    """Hold an exclusive flock on `directory` while a runner checks and binds its socket there.

    Two runners starting at once on one path then take turns: the second finds the first serving.
    A directory that cannot be opened for reading goes unlocked (the probe still guards it).
    """
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        yield
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _clear_stale(path: Path) -> None:
    """Remove a socket left at `path` by a runner that is gone; refuse one that someone serves on."""
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        return
    except OSError as exc:
        raise ConfigError(f"control_socket {path}: {_reason(exc)}") from None
    if not stat.S_ISSOCK(mode):
        raise ConfigError(f"control_socket: {path} exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(_PROBE_TIMEOUT)
    try:
        probe.connect(str(path))
    except ConnectionRefusedError:
        path.unlink(missing_ok=True)  # left behind by a runner that did not stop cleanly
        log.info("control.stale_socket_removed", path=str(path))
        return
    except OSError as exc:  # permission denied, a full backlog: someone may be there, so never take it over
        raise ConfigError(
            f"control_socket {path}: cannot tell whether another runner is serving on it ({_reason(exc)}); "
            "remove it if none is"
        ) from None
    finally:
        probe.close()
    raise ConfigError(
        f"control_socket: another runner is serving on {path}; stop it, or give this runner its own control_socket"
    )


def bind_owner_only(path: Path) -> int:
    """A listening Unix socket at `path` that only this user can connect to; returns its fd.

    A socket file nobody answers on (a runner that did not stop cleanly) is replaced; one that
    answers is another runner's, and is never taken over. Every failure is one `ConfigError` line.
    """
    if problem := unix_socket_path_problem(path):
        raise ConfigError(f"control_socket: {problem}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise ConfigError(f"control_socket {path}: {path.parent} exists and is not a directory") from None
    except OSError as exc:
        raise ConfigError(f"control_socket {path}: cannot create the directory {path.parent}: {_reason(exc)}") from None
    with _binding_lock(path.parent):
        _clear_stale(path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            # On Linux the mode of the socket inode at bind() time becomes the file's mode.
            os.fchmod(sock.fileno(), 0o600)
            sock.bind(str(path))
            os.chmod(path, 0o600)
            sock.listen(64)
        except OSError as exc:
            sock.close()
            raise ConfigError(f"control_socket {path}: cannot listen: {_reason(exc)}") from None
        except BaseException:
            sock.close()
            raise
    return sock.detach()


def bind_loopback(listen: str) -> int:
    """A listening TCP socket on `listen` (a loopback host:port); returns its fd.

    Bound here rather than by Hypercorn so that a port in use is one `ConfigError` line.
    """
    host, _, port = listen.rpartition(":")
    host = host.strip("[]")
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.bind((host, int(port)))
        sock.listen(64)
    except (OSError, OverflowError, ValueError) as exc:
        sock.close()
        raise ConfigError(f"metrics_listen {listen}: cannot listen: {_reason(exc)}") from None
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
    runner: Controlled,
    path: Path,
    *,
    stuck_after: float,
    reload: Callable[[], Awaitable[Reloaded]] | None = None,
    task_status: trio.TaskStatus[None],
) -> None:
    """Serve the control app on a Unix socket until cancelled; the socket file goes with it.

    Raises `ConfigError` (before reporting started) if the socket cannot be bound.
    """
    fd = bind_owner_only(path)
    ours = os.stat(path).st_ino
    try:
        app = control_app(runner, stuck_after=stuck_after, reload=reload)
        await _serve(app, _config(f"fd://{fd}"), task_status)
    finally:
        with suppress(FileNotFoundError):  # only our own socket file: never one that replaced it
            if os.stat(path).st_ino == ours:
                path.unlink(missing_ok=True)  # noqa: ASYNC240 - a quick local unlink, also during cancellation


async def serve_metrics(
    runner: Controlled, listen: str, *, stuck_after: float, task_status: trio.TaskStatus[str]
) -> None:
    """Serve /healthz and /metrics on a loopback TCP port until cancelled; reports the bound URL.

    Raises `ConfigError` (before reporting started) if the port cannot be bound, e.g. is in use.
    """
    fd = bind_loopback(listen)
    await _serve(control_app(runner, stuck_after=stuck_after, with_abort=False), _config(f"fd://{fd}"), task_status)


async def _serve(app: Starlette, config: Config, task_status: trio.TaskStatus[Any]) -> None:
    never = trio.Event()

    async def serving(*, task_status: trio.TaskStatus[list[str]]) -> None:
        await serve(app, config, shutdown_trigger=never.wait, task_status=task_status)  # type: ignore[arg-type]

    async with trio.open_nursery() as nursery:
        bound = await nursery.start(serving)
        log.info("control.listening", on=bound)
        task_status.started(bound[0] if bound else None)


# -- the client side, for `pullwake status`, `pullwake abort` and `pullwake reload` ------


def _client(path: Path, timeout: float) -> httpx.Client:
    if not path.exists():
        raise RunnerError(f"no control socket at {path}: is the runner running with control_socket set?")
    return httpx.Client(transport=httpx.HTTPTransport(uds=str(path)), base_url="http://pullwake", timeout=timeout)


def _os_error(error: BaseException) -> OSError | None:
    """The OSError under an httpx error (httpcore and httpx chain it), if any."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        if isinstance(current, OSError):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


def _unreachable(path: Path, error: httpx.TransportError, timeout: float) -> str:
    if isinstance(error, httpx.TimeoutException):
        return (
            f"the runner at {path} did not answer within {timeout:g} s: it is wedged, or something other "
            "than a runner holds this socket"
        )
    cause = _os_error(error)
    if isinstance(cause, ConnectionRefusedError):
        return (
            f"nobody is answering on {path} (connection refused): the runner is not running, "
            "or it stopped without removing its socket"
        )
    if isinstance(cause, PermissionError):
        return f"cannot connect to {path}: permission denied; run this as the runner's user"
    if cause is not None:
        return f"cannot connect to {path}: {_reason(cause)}"
    return f"the runner at {path} gave no answer: {type(error).__name__}: {' '.join(str(error).split())}"


def request(path: Path, method: str, url: str, *, timeout: float = 5.0) -> tuple[int, Any]:
    """Ask the runner on the control socket at `path`; its status code and JSON answer.

    Raises `RunnerError` with one line when there is no runner to ask, or no usable answer.
    """
    try:
        with _client(path, timeout) as client:
            response = client.request(method, url)
    except httpx.TransportError as exc:
        raise RunnerError(_unreachable(path, exc, timeout)) from exc
    try:
        return response.status_code, response.json()
    except ValueError:
        raise RunnerError(
            f"{path} answered HTTP {response.status_code} without JSON: it is not a pullwake control socket"
        ) from None
