"""OpenAIServer: the FastAPI app on uvicorn, its lifecycle, and watching the engine.

    server = OpenAIServer(engine, "my-model", ServerSettings(api_key="..."))
    host, port = await server.start("127.0.0.1", 8000)
    reason = await server.wait()          # a shutdown request (SIGTERM) or a dead engine
    await server.shutdown()               # drain, then stop

Shutdown drains: new connections are refused and new requests get 503, in-flight requests may
finish within ``shutdown_timeout_s``; then what is left is aborted (streams get an error event
and ``[DONE]``, others 503) and uvicorn closes the connections. A dead engine core ends
``wait()`` at once, so that ``minivllm serve`` exits non-zero and a supervisor restarts it.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import socket
import time
from typing import Any

import uvicorn

from minivllm.entrypoints.openai.api import build_app
from minivllm.entrypoints.openai.connections import (
    GuardedH11Protocol,
    RateLimitedLog,
    install_repeat_filter,
)
from minivllm.entrypoints.openai.metrics import ServerMetrics, StatsLogger
from minivllm.entrypoints.openai.serving import OpenAIServing
from minivllm.entrypoints.openai.settings import ServerSettings

logger = logging.getLogger("minivllm.server")

SHUTDOWN_REQUESTED = "shutdown requested"
ENGINE_DEAD = "engine core died"
_EXPIRED_GRACE_S = 5.0  # after aborting leftovers: time for their error events to go out


class _Uvicorn(uvicorn.Server):
    """uvicorn without its own signal handling: SIGTERM means drain here, which uvicorn's
    handler (stop at once, then wait or cancel) cannot do."""

    @contextlib.contextmanager
    def capture_signals(self):  # type: ignore[override]
        yield


class OpenAIServer:
    """Serves one ``AsyncLLM`` under one model name, on the caller's event loop."""

    def __init__(self, engine: Any, served_model_name: str, settings: ServerSettings | None = None) -> None:
        self.engine = engine
        self.served_model_name = served_model_name
        self.settings = settings or ServerSettings()
        self.metrics = ServerMetrics()
        self.serving = OpenAIServing(engine, served_model_name, self.settings, self.metrics)
        self.app = build_app(self.serving, self.metrics)
        self._uvicorn: _Uvicorn | None = None
        self._serve_task: asyncio.Task | None = None
        self._watch_task: asyncio.Task | None = None
        self._stop: asyncio.Event | None = None
        self.stop_reason: str | None = None
        self._shutdown_done = False

    # ---- lifecycle ----------------------------------------------------------------------------
    async def start(self, host: str = "127.0.0.1", port: int = 8000) -> tuple[str, int]:
        """Listen on ``host:port`` (port 0: any free port) and serve in the background;
        returns the bound address once requests are being accepted."""
        s = self.settings
        sock = socket.create_server((host, port), family=socket.AF_INET6 if ":" in host else socket.AF_INET,
                                    reuse_port=False, backlog=2048)
        bound = sock.getsockname()
        protocol = functools.partial(GuardedH11Protocol, max_connections=s.max_open_connections,
                                     timeout_request_read_s=s.timeout_request_read_s, log=RateLimitedLog())
        config = uvicorn.Config(self.app, http=protocol, lifespan="off", access_log=False, log_config=None,
                                timeout_keep_alive=s.timeout_keep_alive_s,  # type: ignore[arg-type]
                                timeout_graceful_shutdown=int(_EXPIRED_GRACE_S),
                                server_header=False, proxy_headers=False,
                                h11_max_incomplete_event_size=64 * 1024)
        install_repeat_filter()
        self._uvicorn = _Uvicorn(config)
        self._stop = asyncio.Event()
        self._serve_task = asyncio.ensure_future(self._uvicorn.serve(sockets=[sock]))
        while not self._uvicorn.started:
            if self._serve_task.done():
                self._serve_task.result()  # raises what failed
                raise RuntimeError("the HTTP server stopped during start-up")
            await asyncio.sleep(0.01)
        self._watch_task = asyncio.ensure_future(self._watch())
        return bound[0], bound[1]

    def request_shutdown(self) -> None:
        """Ask ``wait()`` to return (safe to call from a signal handler on the loop)."""
        self._finish(SHUTDOWN_REQUESTED)

    def _finish(self, reason: str) -> None:
        if self.stop_reason is None:
            self.stop_reason = reason
        if self._stop is not None:
            self._stop.set()

    async def wait(self) -> str:
        """Until a shutdown is requested or the engine core dies; returns which."""
        if self._stop is None:
            raise RuntimeError("call start() first")
        await self._stop.wait()
        return self.stop_reason or SHUTDOWN_REQUESTED

    async def _watch(self) -> None:
        """Poll the engine (it dies without telling the event loop) and log stats now and then."""
        s = self.settings
        stats_logger = StatsLogger(self.metrics, logger)
        next_log = time.monotonic() + s.log_stats_interval_s
        while True:
            await asyncio.sleep(s.engine_poll_interval_s)
            if getattr(self.engine, "errored", False):
                logger.error("the engine core died; stopping the server")
                self._finish(ENGINE_DEAD)
                return
            if time.monotonic() >= next_log:
                next_log = time.monotonic() + s.log_stats_interval_s
                try:
                    stats_logger.log(await self.engine.stats(timeout_s=s.log_stats_interval_s))
                except Exception as e:  # a dead or hung core shows up in /health and the poll above
                    logger.debug("no engine stats for the log line: %r", e)

    async def shutdown(self, drain_timeout_s: float | None = None) -> None:
        """Drain (up to ``drain_timeout_s``, default ``shutdown_timeout_s``; see module
        docstring), then stop the HTTP server. Does not stop the engine."""
        if self._shutdown_done or self._uvicorn is None:
            return
        self._shutdown_done = True
        self._finish(SHUTDOWN_REQUESTED)
        timeout = self.settings.shutdown_timeout_s if drain_timeout_s is None else drain_timeout_s
        serving, uv = self.serving, self._uvicorn
        serving.draining = True
        for srv in getattr(uv, "servers", []):
            srv.close()  # no new connections; open ones get 503 for new requests
        if self.stop_reason != ENGINE_DEAD and serving.num_in_flight:
            logger.info("draining %d request(s) for up to %g s", serving.num_in_flight, timeout)
        deadline = time.monotonic() + (timeout if self.stop_reason != ENGINE_DEAD else 0.0)
        while serving.num_in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if serving.num_in_flight:
            logger.warning("aborting %d request(s) still running at shutdown", serving.num_in_flight)
            await serving.expire_all()
            deadline = time.monotonic() + _EXPIRED_GRACE_S
            while serving.num_in_flight and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
        uv.should_exit = True
        if self._watch_task is not None:
            self._watch_task.cancel()
            await asyncio.gather(self._watch_task, return_exceptions=True)
        if self._serve_task is not None:
            await asyncio.gather(self._serve_task, return_exceptions=True)
        serving.close()

    async def close(self) -> None:
        """Stop now: in-flight requests are aborted (streams end with an error event)."""
        await self.shutdown(drain_timeout_s=0.0)


async def serve(engine: Any, served_model_name: str, host: str = "127.0.0.1", port: int = 8000,
                settings: ServerSettings | None = None) -> int:
    """Run until SIGTERM / SIGINT (drain, exit status 0) or the engine core's death (status 1)."""
    import signal

    server = OpenAIServer(engine, served_model_name, settings)
    bound_host, bound_port = await server.start(host, port)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, server.request_shutdown)
    print(f"minivllm: serving {served_model_name!r} on http://{bound_host}:{bound_port}", flush=True)
    try:
        reason = await server.wait()
        logger.info("stopping: %s", reason)
        await server.shutdown()
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
    return 1 if reason == ENGINE_DEAD else 0
